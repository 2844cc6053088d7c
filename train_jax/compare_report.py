"""The paired-comparison tables (``train_jax.compare``) of a run folder and of a combined summary: Markdown
sections for results.md / summary.md; ``compare.csv`` / ``compare.json`` beside them are written by
``train_jax.records.write_compare``.

Inputs are the selected runs' records (their test accuracy per seed) and, where the run folder has them, the
per-image correctness files ``shots/<K>shot_test_correct.npz`` (``train_jax.records.read_correct``).
"""

from __future__ import annotations

from pathlib import Path
from typing import Iterable, Mapping, Sequence

from train_jax.compare import LEVEL, POWER, SETTLE_CAP, Comparison, Interval, ShotInputs, compare_average, compare_shot
from train_jax.records import SHOTS_DIR, CompareFile, RunRecord, correct_path, read_correct, read_runs, write_compare

SEED_MARK = "*"  # the interval over seeds excludes 0
IMAGE_MARK = "°"  # the interval over test images excludes 0
SETTLE_BUCKETS = (5, 10, 20, SETTLE_CAP)  # the summary counts open comparisons by the seeds that would settle them


def shot_inputs(records: Iterable[RunRecord], shots_dir: Path | None) -> dict[tuple[str, int], ShotInputs]:
    """(dataset, shots) -> ShotInputs: the selected runs' test accuracy per (method, seed), and the per-image
    correctness from ``shots_dir`` (None, or no file for that shot count: none)."""
    accuracy: dict[tuple[str, int], dict[str, dict[int, float]]] = {}
    for r in records:
        if r.selected:
            accuracy.setdefault((r.dataset, r.shots), {}).setdefault(r.method, {})[r.seed] = r.test_acc
    return {key: ShotInputs(acc, None if shots_dir is None else read_correct(correct_path(shots_dir, key[1])))
            for key, acc in accuracy.items()}


def _signed(x: float) -> str:
    return f"{x:+.2f}"


def _ci(interval: Interval | None) -> str:
    if interval is None:
        return "—"
    return f"[{_signed(interval.low)}, {_signed(interval.high)}]" + (f" {SEED_MARK}" if interval.excludes_zero else "")


def _table(header: Sequence[str], rows: Iterable[Sequence[str]]) -> str:
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    return "\n".join(lines + ["| " + " | ".join(r) + " |" for r in rows])


def legend(reference: str) -> str:
    """The paragraph explaining the tables."""
    pct = f"{LEVEL:.0%}"
    return (f"Test accuracy of each method minus {reference}'s, in percentage points, paired on the same few-shot "
            f"draws (seeds) and test images. Δ: the mean over the seeds both have. {pct} intervals: *seeds*, a t "
            "interval over the per-seed differences (would the difference hold for other draws, on this test "
            "set?); *test images*, a t interval over the test images of each image's difference averaged over the "
            "seeds (is the difference of these draws' models more than test-image noise?). "
            f"`{SEED_MARK}`: the interval excludes 0. Seeds to settle: where the seed interval includes 0, the "
            f"seeds at which it would exclude 0 with {POWER:.0%} probability if the observed mean and seed spread "
            "were the true ones (a rough guide; `--seeds 1 2 ... n` runs them, vmapped).")


def long_table(rows: Sequence[Comparison], with_dataset: bool = False) -> str:
    """Markdown: one row per comparison ([Dataset,] Shots, Method, Seeds, Δ, both intervals, seeds to settle)."""
    header = [*(["Dataset"] if with_dataset else []), "Shots", "Method", "Seeds", "Δ", f"{LEVEL:.0%} CI, seeds",
              f"{LEVEL:.0%} CI, test images", "Seeds to settle"]
    body = [[*([c.dataset] if with_dataset else []), str(c.shots), c.method, str(len(c.seeds)),
             "—" if c.mean is None else _signed(c.mean), _ci(c.over_seeds), _ci(c.over_images),
             "—" if c.settle == "settled" else c.settle] for c in rows]
    return _table(header, body)


def _cell(c: Comparison | None) -> str:
    if c is None or c.mean is None:
        return "—"
    marks = (SEED_MARK if c.over_seeds is not None and c.over_seeds.excludes_zero else "") + (
        IMAGE_MARK if c.over_images is not None and c.over_images.excludes_zero else "")
    return _signed(c.mean) + marks


def matrix(rows: Sequence[Comparison], columns: Sequence[str], methods: Sequence[str], shots: int) -> str:
    """Markdown for one shot count: rows = methods, columns = datasets (and the average), cells = Δ with
    ``SEED_MARK`` / ``IMAGE_MARK`` where the interval over seeds / test images excludes 0."""
    cell = {(c.dataset, c.method): c for c in rows if c.shots == shots}
    present = [m for m in methods if any((d, m) in cell for d in columns)]
    return _table(["Method", *columns], ([m, *[_cell(cell.get((d, m))) for d in columns]] for m in present))


def _notes(rows: Sequence[Comparison]) -> str:
    """One Markdown line per distinct note, naming the comparisons it concerns."""
    by_note: dict[str, list[str]] = {}
    for c in rows:
        for note in filter(None, c.note.split("; ")):
            by_note.setdefault(note, []).append(f"{c.dataset} {c.method} {c.shots}-shot")
    return "".join(f"\nNote ({len(who)} comparison{'s' * (len(who) > 1)}, e.g. {who[0]}): {note}.\n"
                   for note, who in by_note.items())


def settle_line(rows: Sequence[Comparison]) -> str:
    """One line counting the comparisons whose seed interval includes 0 by the seeds that would likely settle
    them (``SETTLE_BUCKETS``)."""
    open_ = [c for c in rows if c.settle != "settled" and c.mean is not None]
    if not rows or not open_:
        return ""
    seeds = sorted({n for c in rows for n in [len(c.seeds)]})
    counts, low = [], max(seeds) + 1
    for high in SETTLE_BUCKETS:
        k = sum(1 for c in open_ if c.seeds_to_settle is not None and low <= c.seeds_to_settle <= high)
        if k:
            counts.append(f"{low}–{high} seeds: {k}")
        low = high + 1
    rest = sum(1 for c in open_ if c.seeds_to_settle is None)
    if rest:
        counts.append(f"more than {SETTLE_CAP} seeds or no difference seen: {rest}")
    return (f"\nOpen at {'/'.join(map(str, seeds))} seeds (seed interval includes 0): {len(open_)} of {len(rows)} "
            f"per-dataset comparisons; seeds that would likely settle them: {'; '.join(counts)} (each: "
            "compare.csv).\n")


def _missing(reference: str, inputs: Mapping[tuple[str, int], ShotInputs]) -> str:
    """The note when the reference has no selected run anywhere ("" otherwise)."""
    methods = sorted({m for i in inputs.values() for m in i.accuracy})
    if not inputs or any(reference in i.accuracy for i in inputs.values()):
        return ""
    return (f"{reference} has no selected run here; compare to one of {', '.join(methods)} "
            "(--compare-to METHOD)")


def run_section(out: Path, records: Sequence[RunRecord], reference: str, methods: Sequence[str]) -> str:
    """Write ``out``/compare.csv and compare.json of one run folder (per-image files from ``out``/shots) and return
    its Markdown section for results.md; ``methods``: the display order."""
    inputs = shot_inputs(records, out / SHOTS_DIR)
    rows = [c for (dataset, shots), one in sorted(inputs.items(), key=lambda kv: kv[0][1])
            for c in compare_shot(dataset, shots, one, reference, methods)]
    missing = _missing(reference, inputs)
    write_compare(out, CompareFile(reference, tuple(rows), notes=(missing,) if missing else ()))
    head = f"\n## Paired differences vs {reference} (percentage points)\n\n"
    if not rows:
        return head + (missing or "No other method to compare.") + "\n"
    return head + legend(reference) + "\n\n" + long_table(rows) + "\n" + _notes(rows)


def combined_section(run_dirs: Sequence[str | Path], out: Path, reference: str, methods: Sequence[str],
                     datasets: Sequence[str], average_over: Sequence[str], average_label: str) -> str:
    """Write ``out``/compare.csv and compare.json over several run folders and return the Markdown section for
    summary.md: the average over ``average_over`` (dataset names of the benchmark present, labelled
    ``average_label``) as a long table, then per shot count a matrix (rows = methods, columns = ``datasets`` in
    order, then the average), then how many seeds would settle the open comparisons."""
    inputs: dict[tuple[str, int], ShotInputs] = {}
    skipped = []
    for run_dir in map(Path, run_dirs):
        records = read_runs(run_dir)
        if records is None:
            skipped.append(str(run_dir))
            continue
        inputs.update(shot_inputs(records, run_dir / SHOTS_DIR))
    notes = [f"{d}: results.json has no per-run records; not compared" for d in skipped]
    rows = [c for (dataset, shots), one in sorted(inputs.items(), key=lambda kv: kv[0][1])
            for c in compare_shot(dataset, shots, one, reference, methods)]
    shots_all = sorted({k for _, k in inputs})
    average = [c for k in shots_all if average_over and all((d, k) in inputs for d in average_over)
               for c in compare_average(average_label, k, {d: inputs[(d, k)] for d in average_over}, reference,
                                        methods)]
    missing = _missing(reference, inputs)
    notes += [missing] if missing else []
    write_compare(out, CompareFile(reference, tuple(rows), tuple(average), tuple(notes)))
    text = f"\n## Paired differences vs {reference} (percentage points)\n\n"
    if not rows:
        return text + "".join(f"{n}.\n" for n in notes) if notes else text + "No other method to compare.\n"
    text += legend(reference) + f" In the tables per shot count, `{SEED_MARK}` / `{IMAGE_MARK}` mark a Δ whose " \
        "interval over seeds / test images excludes 0; every interval is in compare.csv and compare.json, and per " \
        "dataset in each run's results.md.\n"
    if average:
        text += f"\n### Paired differences vs {reference}: {average_label}\n\n" + long_table(average) + "\n"
    columns = [d for d in datasets if any(c.dataset == d for c in rows)]
    columns += [average_label] if average else []
    for k in shots_all:
        text += (f"\n### Paired differences vs {reference}, {k}-shot\n\n"
                 + matrix([*rows, *average], columns, methods, k) + "\n")
    return text + settle_line(rows) + _notes([*rows, *average]) + "".join(f"\nNote: {n}.\n" for n in notes)
