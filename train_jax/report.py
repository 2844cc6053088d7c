"""Renderings of a run folder's results (``records``): Markdown tables, accuracy-vs-shots and training-loss
plots; plus a combine mode over run directories:

    python -m train_jax.report RUN_DIR [RUN_DIR ...] --out DIR

writes DIR/summary.md (the average over the benchmark datasets present, one table per shot count with rows =
methods and columns = datasets, a distribution-shift table, a modality-gap line, the paired differences against
``--compare-to``, and the base-to-new and cross-dataset sections of run folders of those protocols,
``protocol_report``), DIR/summary.json, DIR/compare.csv, DIR/compare.json, DIR/accuracy_vs_shots.png and
DIR/loss_curves.png. Base-to-new folders (trained on half of the classes) appear in their section only.
"""

from __future__ import annotations

import argparse
import json
import re
import sys
from pathlib import Path
from typing import Any, Iterable, Mapping, Sequence

import numpy as np

from data.registry import dataset_names, display_order, find_dataset
from train_jax import choices, compare_report, protocol_report, published
from train_jax.errors import TrainError
from train_jax.evaluate import VALIDATION_FREE
from train_jax.protocols import BASE_TO_NEW
from train_jax.records import (ACCURACY_PNG, CSV_FIELDS, LOSS_PNG, RESULTS_MD, SUMMARY_JSON, SUMMARY_MD, GapFile,
                               RunRecord, SummaryRow, load_params, method_rank, read_gap, read_results, save_params,
                               write_results)
from train_jax.records import summarize as summary_rows

__all__ = ["CSV_FIELDS", "load_params", "save_params"]  # re-exported from records, where they live

BENCHMARK = tuple(dataset_names("benchmark"))
TIE_MARK = "†"  # results.md / summary.md: a cell whose setting was chosen by the tie-break for some seed
_SELECTION = {"seed": "setting selected per seed on validation",
              "mean": "one setting per method selected on the mean validation accuracy over seeds",
              VALIDATION_FREE: "VALIDATION-FREE: each method at its fixed default setting, no validation rows used"}


def _key(name: str) -> str:
    """A dataset's registry name (any spelling or alias of it), else its lower-case letters and digits."""
    info = find_dataset(name)
    return info.name if info else re.sub(r"[^a-z0-9]", "", name.lower())


def weights_line(identities: Mapping[str, Mapping[str, Any] | None]) -> str:
    """The line of a table that says which datasets' runs used a model with random weights (no weights file or
    tag: ``weights_sha256`` empty in the training cache's identity), by dataset -> identity; "" when none did."""
    random = [d for d in display_order(identities) if (identities[d] or {}).get("weights_sha256", "x") == ""]
    if not random:
        return ""
    which = "" if len(random) == len(identities) else f" ({', '.join(random)})"
    return (f"**Random weights**{which}: the CLIP model had no pretrained weights, so these numbers test the "
            "pipeline; they are not CLIP accuracy.\n")


def _under_title(markdown: str, line: str) -> str:
    """`line` as a paragraph right under the first (title) line of `markdown`."""
    title, _, rest = markdown.partition("\n")
    return f"{title}\n\n{line}{rest}" if line else markdown


def _cell(row: Mapping[str, Any] | None) -> str:
    if row is None or "test_mean" not in row:
        return "—"
    mark = f" {TIE_MARK}" if any(row.get("tie_breaks", ())) else ""
    return f"{row['test_mean']:.2f} ± {row['test_std']:.2f}{mark}"


def _tie_note(summary: Sequence[Mapping[str, Any]]) -> str:
    """Footnote for the cells marked ``TIE_MARK``: which seeds' settings the tie-break chose, and how."""
    cells = []
    for r in summary:
        by = {kind: [str(s) for s, t in zip(r["seeds"], r.get("tie_breaks", ())) if t == kind]
              for kind in ("score", "order")}
        parts = [f"seed{'s' * (len(seeds) > 1)} {', '.join(seeds)} by {kind}" for kind, seeds in by.items() if seeds]
        if parts:
            cells.append(f"{r['dataset']} {r['method']} {r['shots']}-shot: {' and '.join(parts)}")
    if not cells:
        return ""
    return (f"\n{TIE_MARK} Setting chosen among those tied on validation accuracy, by the validation score (mean "
            "log-probability of the true class) or, where the scores were equal too, by grid order: "
            + "; ".join(cells) + "\n")


def _selection(summary: Sequence[Mapping[str, Any]]) -> str:
    """How the table's settings were chosen (the --select mode of its rows); mixed modes name the validation-free
    datasets."""
    modes = {r.get("select", "seed") for r in summary}
    if len(modes) == 1:
        return _SELECTION[modes.pop()]
    free = sorted({r["dataset"] for r in summary if r.get("select") == VALIDATION_FREE})
    if free:
        return (f"MIXED PROTOCOLS: validation-free (fixed defaults) for {', '.join(free)}; settings selected on "
                "validation for the other datasets")
    return "settings selected on validation"


def _fixed_note(summary: Sequence[Mapping[str, Any]]) -> str:
    """The line of a validation-free table naming each method's fixed setting (none shown for a method that has
    no settings of its own or runs its recipe's)."""
    rows = [r for r in summary if r.get("select") == VALIDATION_FREE]
    if not rows:
        return ""
    shown = {r["method"]: next((s for s in r.get("settings", ()) if s != "-"), None) for r in rows}
    parts = [f"{m} at {shown[m]}" if shown[m] else m for m in method_rank(shown)]
    return ("\nValidation-free (--select none): no validation rows were read; each method ran at its fixed default "
            "(README \"Validation-free protocol\"): " + "; ".join(parts) + ".\n")


def _table(header: Sequence[str], rows: Iterable[Sequence[str]]) -> str:
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    return "\n".join(lines + ["| " + " | ".join(r) + " |" for r in rows])


def shift_table(summary: Sequence[Mapping[str, Any]]) -> str:
    """Markdown: rows = (source dataset, method, shots), columns = source test + every shift set."""
    rows = [r for r in summary if r["shift"]]
    if not rows:
        return ""
    targets = display_order(t for r in rows for t in r["shift"])
    body = []
    for r in rows:
        cells = [f"{r['shift'][t]['mean']:.2f} ± {r['shift'][t]['std']:.2f}" if t in r["shift"] else "—"
                 for t in targets]
        body.append([r["dataset"], r["method"], str(r["shots"]), _cell(r), *cells])
    return _table(["Source", "Method", "Shots", "Source test", *targets], body)


def _notes(summary: Sequence[Mapping[str, Any]]) -> str:
    """Markdown lines of the runs' notes (a recipe that could not be followed), each once."""
    return "".join(f"\nNote: {n}\n" for n in sorted({n for r in summary for n in r.get("notes", ())}))


def _falling_note(summary: Sequence[Mapping[str, Any]]) -> str:
    """The line naming the selected settings whose training loss was still falling fast at the end."""
    falling = [r for r in summary if r.get("loss_still_falling")]
    if not falling:
        return ""
    return ("\nTraining loss of the selected setting still falling fast at the end (see loss_curves.png): "
            + ", ".join(f"{r['dataset']} {r['method']} {r['shots']}-shot" for r in falling) + "\n")


def run_markdown(dataset: str, summary: Sequence[Mapping[str, Any]]) -> str:
    """Markdown for one run directory: rows = methods, columns = shots (test accuracy, mean ± std over seeds)."""
    shots = sorted({r["shots"] for r in summary})
    methods = method_rank(r["method"] for r in summary)
    cell = {(r["method"], r["shots"]): r for r in summary}
    table = _table(["Method", *[f"{k}-shot" for k in shots]],
                   ([m, *[_cell(cell.get((m, k))) for k in shots]] for m in methods))
    text = f"# {dataset}: test accuracy (%), {_selection(summary)}\n\n{table}\n" + _tie_note(summary)
    text += _fixed_note(summary)
    failed = [r for r in summary if r["failed_runs"]]
    if failed:
        text += "\nRuns stopped by a non-finite loss: " + ", ".join(
            f"{r['method']} {r['shots']}-shot: {r['failed_runs']}" for r in failed) + "\n"
    text += _notes(summary)
    text += _falling_note(summary)
    text += choices.markdown(summary) + published.markdown(summary)
    shift = shift_table(summary)
    return text + (f"\n## Distribution shift\n\n{shift}\n" if shift else "")


def scale_line(config: Mapping[str, Any]) -> str:
    """The line of results.md that says which logit scale the runs used (see run_config.json)."""
    origin = config.get("logit_scale_from")
    if origin is None:
        return ""
    if origin == "grid":
        return "\nLogit scale: the grid's (setting `s`).\n"
    why = "the model's own, recorded in the cache" if origin == "cache" else "default; the cache records none"
    return f"\nLogit scale: {config['logit_scale']:g} ({why}).\n"


def plot(path: Path, summary: Sequence[Mapping[str, Any]], title: str = "") -> None:
    """PNG of test accuracy vs shots, one line per method, one panel per dataset (plus the benchmark average
    when there are several datasets)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    panels = {d: [r for r in summary if r["dataset"] == d] for d in display_order(r["dataset"] for r in summary)}
    if len(panels) > 1:
        average = _average_rows(summary)
        if average:
            panels["Average"] = average
    cols = min(4, len(panels))
    rows = -(-len(panels) // cols)
    fig, axes = plt.subplots(rows, cols, figsize=(4 * cols, 3.2 * rows), squeeze=False)
    for ax, (name, rs) in zip(axes.flat, panels.items()):
        for method in method_rank(r["method"] for r in rs):
            pts = sorted((r["shots"], r["test_mean"], r.get("test_std", 0.0)) for r in rs
                         if r["method"] == method and "test_mean" in r)
            if pts:
                x, y, e = zip(*pts)
                ax.errorbar(x, y, yerr=e, marker="o", capsize=3, label=method)
        ax.set_xscale("log", base=2)
        ticks = sorted({r["shots"] for r in rs})
        ax.set_xticks(ticks, [str(t) for t in ticks])
        ax.minorticks_off()
        ax.set_title(name)
        ax.set_xlabel("shots per class")
        ax.set_ylabel("test accuracy (%)")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7)
    for ax in list(axes.flat)[len(panels):]:
        ax.axis("off")
    if title and len(panels) > 1:
        fig.suptitle(title)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def plot_curves(path: Path, summary: Sequence[Mapping[str, Any]], title: str = "") -> None:
    """PNG of training loss vs epoch of each method's selected setting (mean ± std over seeds), one panel per
    (dataset, shots); a method whose loss was still falling fast at the end is marked "(still falling)"; the mean
    curves of its loss parts (CMM's CE and triplet), if any, are dashed lines of the same colour."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows_of = [r for r in summary if "loss_mean" in r]
    keys = [(d, k) for d in display_order(r["dataset"] for r in rows_of)
            for k in sorted({r["shots"] for r in rows_of if r["dataset"] == d})] or [(title, 0)]
    cols = min(4, len(keys))
    nrows = -(-len(keys) // cols)
    fig, axes = plt.subplots(nrows, cols, figsize=(4 * cols, 3.2 * nrows), squeeze=False)
    for ax, (dataset, shots) in zip(axes.flat, keys):
        for r in (r for r in rows_of if (r["dataset"], r["shots"]) == (dataset, shots)):
            mean = np.array([np.nan if v is None else v for v in r["loss_mean"]])
            std = np.array([np.nan if v is None else v for v in r["loss_std"]])
            epochs = np.arange(1, len(mean) + 1)
            label = r["method"] + (" (still falling)" if r["loss_still_falling"] else "")
            (line,) = ax.plot(epochs, mean, label=label)
            ax.fill_between(epochs, mean - std, mean + std, alpha=0.2)
            for style, (name, part) in zip(("--", ":"), r.get("loss_parts_mean", {}).items()):
                ax.plot(epochs, [np.nan if v is None else v for v in part], style, color=line.get_color(),
                        label=f"{r['method']} {name}")
        ax.set_title(f"{dataset} {shots}-shot" if shots else dataset)
        ax.set_xlabel("epoch")
        ax.set_ylabel("mean training loss")
        ax.grid(alpha=0.3)
        if rows_of:
            ax.legend(fontsize=7)
    for ax in list(axes.flat)[len(keys):]:
        ax.axis("off")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def write_run_dir(out: Path, dataset: str, config: Mapping[str, Any], records: Sequence[RunRecord],
                  compare_to: str = "cmm") -> list[SummaryRow]:
    """The files of one run folder: results.json and results.csv (``records.write_results``), their renderings
    results.md, accuracy_vs_shots.png and loss_curves.png, and the paired comparisons against ``compare_to``
    (compare.csv, compare.json and a section of results.md, ``train_jax.compare_report``); returns the summary
    rows."""
    rows = write_results(out, dataset, config, records)
    summary = [row.to_json() for row in rows]
    paired = compare_report.run_section(out, records, compare_to, method_rank(r.method for r in records))
    random = weights_line({dataset: config.get("identity")})
    (out / RESULTS_MD).write_text(_under_title(run_markdown(dataset, summary), random) + scale_line(config)
                                          + paired)
    plot(out / ACCURACY_PNG, summary, dataset)
    plot_curves(out / LOSS_PNG, summary, dataset)
    return rows


def summarize(records: Sequence[RunRecord], select: str = "seed") -> list[dict[str, Any]]:
    """The summary rows of ``records`` (``records.summarize``) as the JSON the renderers read."""
    return [row.to_json() for row in summary_rows(records, select)]


def _average_rows(summary: Sequence[Mapping[str, Any]]) -> list[dict[str, Any]]:
    """Mean over the benchmark datasets present, per (method, shots) present for all of them."""
    present = {_key(b) for b in BENCHMARK} & {_key(r["dataset"]) for r in summary}
    rows = []
    for method, shots in sorted({(r["method"], r["shots"]) for r in summary}):
        vals = [r["test_mean"] for r in summary if r["method"] == method and r["shots"] == shots
                and _key(r["dataset"]) in present and "test_mean" in r]
        if present and len(vals) == len(present):
            rows.append({"dataset": "Average", "method": method, "shots": shots, "test_mean": float(np.mean(vals)),
                         "test_std": 0.0})
    return rows


def average_label(summary: Sequence[Mapping[str, Any]]) -> str:
    """``Average (11 datasets)`` when all benchmark datasets are present, else ``Average (k of 11 datasets)``."""
    k = len({_key(b) for b in BENCHMARK} & {_key(r["dataset"]) for r in summary})
    return f"Average ({k} datasets)" if k == len(BENCHMARK) else f"Average ({k} of {len(BENCHMARK)} datasets)"


def combined_markdown(summary: Sequence[Mapping[str, Any]]) -> str:
    """The benchmark average (rows = methods, columns = shots), then one table per shot count (rows = methods,
    columns = datasets in benchmark order, then the average), then the distribution-shift table; a single
    dataset gets its run table (rows = methods, columns = shots)."""
    order = {_key(b): i for i, b in enumerate(BENCHMARK)}
    datasets = display_order(r["dataset"] for r in summary)
    if len(datasets) == 1:
        return run_markdown(datasets[0], summary)
    methods = method_rank(r["method"] for r in summary)
    shots = sorted({r["shots"] for r in summary})
    cell = {(r["dataset"], r["method"], r["shots"]): r for r in summary}
    has_average = any(_key(d) in order for d in datasets)
    average = {(r["method"], r["shots"]): f"{r['test_mean']:.2f}" for r in _average_rows(summary)}
    label = average_label(summary)
    text = f"# Test accuracy (%), mean ± std over seeds; {_selection(summary)}\n"
    if has_average:
        rows = ([m, *[average.get((m, k), "—") for k in shots]] for m in methods)
        text += f"\n## {label}\n\n" + _table(["Method", *[f"{k}-shot" for k in shots]], rows) + "\n"
    for k in shots:
        header = ["Method", *datasets, *([label] if has_average else [])]
        rows = ([m, *[_cell(cell.get((d, m, k))) for d in datasets], *([average.get((m, k), "—")] if has_average
                                                                        else [])] for m in methods)
        text += f"\n## {k}-shot\n\n" + _table(header, rows) + "\n"
    text += _fixed_note(summary)
    text += _notes(summary)
    text += _falling_note(summary)
    text += choices.markdown(summary) + published.markdown(summary)
    shift = shift_table(summary)
    return text + (f"\n## Distribution shift\n\n{shift}\n" if shift else "") + _tie_note(summary)


def gap_line(gaps: Sequence[GapFile]) -> str:
    """One Markdown line from the runs' gap.json (``read_gap``): per dataset, cmm (else the first method
    with a map) at its largest shot count; before -> after, averaged over the datasets. Empty when no run has a
    map."""
    pairs = []
    for g in gaps:
        if g.after:
            top = max(r.shots for r in g.after)
            rows = [r for r in g.after if r.shots == top]
            pairs.append((g.before, next((r for r in rows if r.method == "cmm"), rows[0])))
    if not pairs:
        return ""
    def change(key: str, fmt: str) -> str:
        before, after = (np.mean([b[key] for b, _ in pairs]), np.mean([a.mean[key] for _, a in pairs]))
        return f"{before:{fmt}} → {after:{fmt}}"

    methods = ", ".join(sorted({f"{a.method} {a.shots}-shot" for _, a in pairs}))
    return (f"Modality gap on test ({methods}; mean over {len(pairs)} dataset(s); per run: gap.md): "
            f"‖mean image − mean prototype‖ {change('gap', '.3f')}, margin {change('margin', '.3f')}, "
            f"nearest-prototype accuracy (%) {change('nearest_acc', '.2f')}\n")


def combine(run_dirs: Sequence[str | Path], out: str | Path, compare_to: str = "cmm") -> Path:
    """Merge the results.json of several run directories into ``out`` (summary.md/.json, accuracy_vs_shots.png,
    loss_curves.png; the paired comparisons against ``compare_to``: compare.csv, compare.json and a section of
    summary.md)."""
    summary: list[dict[str, Any]] = []
    identities: dict[str, Mapping[str, Any] | None] = {}
    few_shot = []  # base-to-new folders trained on half of the classes: in the base-to-new section only
    for run_dir in run_dirs:
        results = read_results(run_dir)
        if results.config.get("protocol") != BASE_TO_NEW:
            few_shot.append(run_dir)
            summary.extend(row.to_json() for row in results.summary)
            identities[results.dataset or str(run_dir)] = results.config.get("identity")
    gaps = [g for g in map(read_gap, few_shot) if g is not None]
    sections, protocol_json = protocol_report.combined(run_dirs)
    out = Path(out)
    line = gap_line(gaps)
    datasets = display_order(r["dataset"] for r in summary)
    benchmark = {_key(b) for b in BENCHMARK}
    try:
        out.mkdir(parents=True, exist_ok=True)
        paired = compare_report.combined_section(few_shot, out, compare_to,
                                                 method_rank(r["method"] for r in summary), datasets,
                                                 [d for d in datasets if _key(d) in benchmark],
                                                 average_label(summary)) if few_shot else ""
        markdown = _under_title(combined_markdown(summary), weights_line(identities)) if summary else "# Results\n"
        (out / SUMMARY_MD).write_text(markdown + (f"\n{line}" if line else "") + paired + sections)
        (out / SUMMARY_JSON).write_text(json.dumps({"summary": summary, "average": _average_rows(summary),
                                                    **protocol_json}, indent=1))
        if summary:
            plot(out / ACCURACY_PNG, summary)
            plot_curves(out / LOSS_PNG, summary)
    except OSError as e:
        raise TrainError(f"{e.filename or out}: cannot write there ({e.strerror or e}); choose a writable --out") \
            from None
    return out


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m train_jax.report", description=__doc__.split("\n\n")[0])
    parser.add_argument("run_dirs", nargs="+", metavar="RUN_DIR", help="output folders of `python -m train_jax`")
    parser.add_argument("--out", required=True, help="folder for summary.md, summary.json, accuracy_vs_shots.png")
    parser.add_argument("--compare-to", default="cmm", metavar="METHOD",
                        help="reference method of the paired comparisons (default: %(default)s)")
    args = parser.parse_args(argv)
    try:
        out = combine(args.run_dirs, args.out, args.compare_to)
    except TrainError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    print(f"wrote {out / 'summary.md'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
