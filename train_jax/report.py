"""Results files: JSON, CSV, Markdown tables, learned parameters (.npz, see ``load_params``), accuracy-vs-shots
and training-loss plots; plus a combine mode over run directories:

    python -m train_jax.report RUN_DIR [RUN_DIR ...] --out DIR

writes DIR/summary.md (the average over the benchmark datasets present, one table per shot count with rows =
methods and columns = datasets, a distribution-shift table, a modality-gap line, the paired differences against
``--compare-to``), DIR/summary.json, DIR/compare.csv, DIR/compare.json, DIR/accuracy_vs_shots.png and
DIR/loss_curves.png.
"""

from __future__ import annotations

import argparse
import csv
import json
import re
import sys
import zipfile
from pathlib import Path
from typing import Any, Iterable, Mapping, Sequence

import numpy as np

from data.registry import dataset_names, display_order, find_dataset
from train_jax import compare_report
from train_jax.config import Settings
from train_jax.errors import TrainError
from train_jax.evaluate import mean_std
from train_jax.records import SCHEMA_VERSION, Learned, RunRecord

BENCHMARK = tuple(dataset_names("benchmark"))
CSV_FIELDS = ("dataset", "shots", "method", "seed", "setting", "val_acc", "val_score", "test_acc", "selected",
              "tie_break", "failed")
TIE_MARK = "†"  # results.md / summary.md: a cell whose setting was chosen by the tie-break for some seed
_SELECTION = {"seed": "setting selected per seed on validation",
              "mean": "one setting per method selected on the mean validation accuracy over seeds"}
METHOD_ORDER = ("zeroshot", "linear_probe", "tip_adapter", "tip_adapter_f", "gda", "cmm_ce", "cmm")
STILL_FALLING = 0.05  # a mean loss curve whose last quarter of epochs (at least 2) lowers it by more is flagged


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


def _method_sort(methods: Iterable[str]) -> list[str]:
    return sorted(set(methods), key=lambda m: (METHOD_ORDER.index(m) if m in METHOD_ORDER else 99, m))


def summarize(records: Sequence[RunRecord], select: str = "seed") -> list[dict[str, Any]]:
    """Per (dataset, method, shots): test accuracy of the validation-selected setting, mean +- std over seeds,
    and the same for every shift set. Seeds whose runs all failed count in ``failed_seeds``; ``tie_breaks``
    (per selected seed: None, "score" or "order") say what decided a selection; ``select`` is the --select mode."""
    out = []
    rank = {m: i for i, m in enumerate(_method_sort(r.method for r in records))}
    keys = sorted({(r.dataset, r.method, r.shots) for r in records}, key=lambda k: (k[0], k[2], rank[k[1]]))
    for dataset, method, shots in keys:
        runs = [r for r in records if (r.dataset, r.method, r.shots) == (dataset, method, shots)]
        chosen = sorted((r for r in runs if r.selected), key=lambda r: r.seed)
        seeds = sorted({r.seed for r in runs})
        row: dict[str, Any] = {
            "dataset": dataset, "method": method, "shots": shots, "seeds": [r.seed for r in chosen],
            "failed_seeds": [s for s in seeds if s not in {r.seed for r in chosen}],
            "failed_runs": sum(r.failed for r in runs), "settings": [r.setting for r in chosen],
            "tie_breaks": [r.tie_break for r in chosen], "select": select,
            "notes": sorted({r.note for r in runs if r.note}), "shift": {},
        }
        if chosen:
            row["test_mean"], row["test_std"] = mean_std([r.test_acc for r in chosen])
            row["val_mean"], _ = mean_std([r.val_acc for r in chosen])
            for target in chosen[0].shift:
                mean, std = mean_std([r.shift[target] for r in chosen])
                row["shift"][target] = {"mean": mean, "std": std}
            curve = curve_stats([r.loss_curve for r in chosen])
            if curve is not None:
                row["loss_mean"], row["loss_std"] = curve
                row["loss_still_falling"] = still_falling(row["loss_mean"])
                parts = {name: curve_stats([r.loss_parts.get(name, ()) for r in chosen])
                         for name in chosen[0].loss_parts}
                row["loss_parts_mean"] = {name: stats[0] for name, stats in parts.items() if stats is not None}
        out.append(row)
    return out


def curve_stats(curves: Sequence[Sequence[float | None]]) -> tuple[list[float | None], list[float | None]] | None:
    """Per-epoch mean and population std (as ``evaluate.mean_std``) over seeds of loss curves (None: no such
    epoch), padded to the longest; None when no curve has a point (methods with their own trainer record none)."""
    length = max((len(c) for c in curves), default=0)
    grid = np.full((len(curves), length), np.nan)
    for i, c in enumerate(curves):
        grid[i, :len(c)] = [np.nan if v is None else v for v in c]
    seen = np.isfinite(grid)
    if not seen.any():
        return None
    count = np.maximum(seen.sum(axis=0), 1)
    mean = np.nansum(grid, axis=0) / count
    std = np.sqrt(np.nansum((grid - mean) ** 2, axis=0) / count)
    full = lambda x: [float(v) if ok else None for v, ok in zip(x, seen.any(axis=0))]  # noqa: E731
    return full(mean), full(std)


def still_falling(mean: Sequence[float | None]) -> bool:
    """Whether a loss curve (None: no point) still drops by more than ``STILL_FALLING`` of its value over its last
    quarter of epochs (at least 2 points): an under-trained setting rather than a converged one."""
    points = [v for v in mean if v is not None]
    if len(points) < 2:
        return False
    start = points[-max(2, len(points) // 4)]
    return start - points[-1] > STILL_FALLING * abs(start)


def write_csv(path: Path, records: Sequence[RunRecord]) -> None:
    """One row per run: ``CSV_FIELDS``."""
    with open(path, "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=CSV_FIELDS, extrasaction="ignore")
        writer.writeheader()
        for r in records:
            score = "" if r.val_score is None else f"{r.val_score:.6f}"
            writer.writerow({**r.to_json(), "val_acc": f"{r.val_acc:.2f}", "val_score": score,
                             "test_acc": f"{r.test_acc:.2f}", "tie_break": r.tie_break or ""})


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
    modes = {r.get("select", "seed") for r in summary}
    return _SELECTION[modes.pop()] if len(modes) == 1 else "settings selected on validation"


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
    methods = _method_sort(r["method"] for r in summary)
    cell = {(r["method"], r["shots"]): r for r in summary}
    table = _table(["Method", *[f"{k}-shot" for k in shots]],
                   ([m, *[_cell(cell.get((m, k))) for k in shots]] for m in methods))
    text = f"# {dataset}: test accuracy (%), {_selection(summary)}\n\n{table}\n" + _tie_note(summary)
    failed = [r for r in summary if r["failed_runs"]]
    if failed:
        text += "\nRuns stopped by a non-finite loss: " + ", ".join(
            f"{r['method']} {r['shots']}-shot: {r['failed_runs']}" for r in failed) + "\n"
    text += _notes(summary)
    text += _falling_note(summary)
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
        for method in _method_sort(r["method"] for r in rs):
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


def _flatten(tree: Mapping[str, Any], prefix: str) -> dict[str, np.ndarray]:
    out = {}
    for k, v in tree.items():
        if isinstance(v, Mapping):
            out.update(_flatten(v, f"{prefix}/{k}"))
        else:
            out[f"{prefix}/{k}"] = np.asarray(v)
    return out


def save_params(path: Path, learned: Mapping[str, Learned]) -> None:
    """Write ``{"method/seedK": Learned}`` to an .npz (keys ``method/seedK/params/...``, ``.../consts/...`` and
    ``.../settings`` as JSON text); read it back with ``load_params``."""
    arrays: dict[str, np.ndarray] = {}
    for run, item in learned.items():
        arrays[f"{run}/settings"] = np.array(json.dumps(item.settings.to_dict()))
        arrays.update(_flatten(item.params, f"{run}/params"))
        arrays.update(_flatten(item.consts, f"{run}/consts"))
    np.savez(path, **arrays)


def load_params(path: str | Path) -> dict[str, Learned]:
    """Inverse of ``save_params``: ``{"method/seedK": Learned}``; use with ``train_jax.methods.logits``.
    TrainError naming the file, and how to train it again, if it cannot be read."""
    path = Path(path)
    learned, why = _read_params(path)
    if why:
        raise TrainError(f"{why}; rerun the training command with --out {path.parent.parent}: it trains that shot "
                         "count again")
    return learned


def params_problem(path: Path) -> str:
    """'' when ``path`` (a run's ``params/<K>shot.npz``) reads back, else why not, naming the file."""
    return _read_params(path)[1] if path.is_file() else f"{path}: missing"


def _read_params(path: Path) -> tuple[dict[str, Learned], str]:
    """(``{"method/seedK": Learned}``, '') of a ``save_params`` file, or ({}, why not, naming the file)."""
    trees: dict[str, dict[str, Any]] = {}
    try:
        with np.load(path, allow_pickle=False) as data:
            for key in data.files:
                method, seed, kind, *rest = key.split("/")
                item = trees.setdefault(f"{method}/{seed}", {"params": {}, "consts": {}})
                if kind == "settings":
                    item["settings"] = Settings.from_dict(json.loads(str(data[key])))
                    continue
                node = item[kind]
                for part in rest[:-1]:
                    node = node.setdefault(part, {})
                node[rest[-1]] = data[key]
        return {run: Learned(t["settings"], t["params"], t["consts"]) for run, t in trees.items()}, ""
    except (OSError, ValueError, KeyError, TypeError, EOFError, TrainError, zipfile.BadZipFile) as e:
        why = str(e).splitlines()[0][:200] if str(e) else type(e).__name__
        return {}, f"{path}: the saved models cannot be read ({why})"


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
                  compare_to: str = "cmm") -> None:
    """results.json (``schema_version``, dataset, config, summary, ``runs``: the records' JSON), results.csv,
    results.md, accuracy_vs_shots.png and loss_curves.png of one run directory; the paired comparisons against
    ``compare_to`` (compare.csv, compare.json and a section of results.md, ``train_jax.compare_report``)."""
    summary = summarize(records, config["select"])
    payload = {"schema_version": SCHEMA_VERSION, "dataset": dataset, "config": dict(config), "summary": summary,
               "runs": [r.to_json() for r in records]}
    (out / "results.json").write_text(json.dumps(payload, indent=1))
    write_csv(out / "results.csv", records)
    paired = compare_report.run_section(out, records, compare_to, _method_sort(r.method for r in records))
    random = weights_line({dataset: config.get("identity")})
    (out / "results.md").write_text(_under_title(run_markdown(dataset, summary), random) + scale_line(config)
                                    + paired)
    plot(out / "accuracy_vs_shots.png", summary, dataset)
    plot_curves(out / "loss_curves.png", summary, dataset)


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
    methods = _method_sort(r["method"] for r in summary)
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
    text += _notes(summary)
    text += _falling_note(summary)
    shift = shift_table(summary)
    return text + (f"\n## Distribution shift\n\n{shift}\n" if shift else "") + _tie_note(summary)


def gap_line(gaps: Sequence[Mapping[str, Any]]) -> str:
    """One Markdown line from the runs' gap.json: per dataset, cmm (else the first method with a map) at its
    largest shot count; before -> after, averaged over the datasets. Empty when no run has a map."""
    pairs = []
    for g in gaps:
        if g["after"]:
            top = max(r["shots"] for r in g["after"])
            rows = [r for r in g["after"] if r["shots"] == top]
            pairs.append((g["before"], next((r for r in rows if r["method"] == "cmm"), rows[0])))
    if not pairs:
        return ""
    def change(key: str, fmt: str) -> str:
        before, after = (np.mean([b[key] for b, _ in pairs]), np.mean([a["mean"][key] for _, a in pairs]))
        return f"{before:{fmt}} → {after:{fmt}}"

    methods = ", ".join(sorted({f"{a['method']} {a['shots']}-shot" for _, a in pairs}))
    return (f"Modality gap on test ({methods}; mean over {len(pairs)} dataset(s); per run: gap.md): "
            f"‖mean image − mean prototype‖ {change('gap', '.3f')}, margin {change('margin', '.3f')}, "
            f"nearest-prototype accuracy (%) {change('nearest_acc', '.2f')}\n")


def combine(run_dirs: Sequence[str | Path], out: str | Path, compare_to: str = "cmm") -> Path:
    """Merge the results.json of several run directories into ``out`` (summary.md/.json, accuracy_vs_shots.png,
    loss_curves.png; the paired comparisons against ``compare_to``: compare.csv, compare.json and a section of
    summary.md)."""
    summary: list[dict[str, Any]] = []
    identities: dict[str, Mapping[str, Any] | None] = {}
    gaps = []
    for path in (Path(d) / "gap.json" for d in run_dirs):
        try:
            gaps += [json.loads(path.read_text())] if path.is_file() else []
        except (OSError, ValueError) as e:
            raise TrainError(f"{path}: cannot read it ({e}); rerun `python -m train_jax ... --out {path.parent}`") \
                from None
    for run_dir in run_dirs:
        path = Path(run_dir) / "results.json"
        try:
            results = json.loads(path.read_text())
            summary.extend(results["summary"])
            identities[results.get("dataset", str(run_dir))] = results.get("config", {}).get("identity")
        except (OSError, ValueError, KeyError) as e:
            raise TrainError(f"{path}: cannot read results ({e}); run `python -m train_jax ... --out {run_dir}` first")
    out = Path(out)
    line = gap_line(gaps)
    datasets = display_order(r["dataset"] for r in summary)
    benchmark = {_key(b) for b in BENCHMARK}
    try:
        out.mkdir(parents=True, exist_ok=True)
        paired = compare_report.combined_section(run_dirs, out, compare_to,
                                                 _method_sort(r["method"] for r in summary), datasets,
                                                 [d for d in datasets if _key(d) in benchmark], average_label(summary))
        markdown = _under_title(combined_markdown(summary), weights_line(identities))
        (out / "summary.md").write_text(markdown + (f"\n{line}" if line else "") + paired)
        (out / "summary.json").write_text(json.dumps({"summary": summary, "average": _average_rows(summary)},
                                                     indent=1))
        plot(out / "accuracy_vs_shots.png", summary)
        plot_curves(out / "loss_curves.png", summary)
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
