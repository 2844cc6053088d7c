"""The tables of the generalisation protocols (``train_jax.protocols``) in Markdown, CSV and JSON.

A base-to-new run folder gets ``base_to_new.{md,csv,json}``; a cross-dataset run folder ``cross_dataset.{md,csv,
json}``. ``combined`` renders the sections of ``python -m train_jax.report``'s summary from several run folders:
the base-to-new average over datasets (CoCoOp's "Average over 11 datasets") and per-dataset table, and the
cross-dataset table, each beside the published averages (``data.published_protocols``).
"""

from __future__ import annotations

import csv
import json
from pathlib import Path
from typing import Any, Iterable, Mapping, Sequence

from data.published_protocols import load as load_published
from train_jax.errors import TrainError
from train_jax.records import BASE_TO_NEW_STEM, CROSS_DATASET_STEM
from train_jax.protocols import BASE_TO_NEW, CROSS_DATASET, SCORED_BY, BaseNewRow, Stat, TransferRow, base_new_average

SCHEMA_VERSION = 1  # of base_to_new.json and cross_dataset.json
BASE_NEW, CROSS = BASE_TO_NEW_STEM, CROSS_DATASET_STEM  # file stems in a run folder (records)
DASH = "—"
BASE_NEW_CSV = ("dataset", "shots", "method", "seeds", "base_mean", "base_std", "new_mean", "new_std", "hm",
                "scored_by")
CROSS_CSV = ("source", "shots", "method", "seeds", "dataset", "role", "mean", "std")
_SHORT = {"zero-shot": "reference (zero-shot)", "map": "learned map", "none": f"{DASH} (per-class weights)"}
_NOTE_MAP = ("CMM and CE-only score new classes with the map learned on the base classes applied to the new classes' "
             "frozen prompt prototypes; learned prototype offsets (learn_text's ΔT) exist for the base classes only.")
_NOTE_NONE = f"{DASH}: methods with per-class weights (those listed as not scored) have none for other classes."


def _stat(s: Stat | None) -> str:
    return DASH if s is None else f"{s.mean:.2f} ± {s.std:.2f}"


def _num(x: float | None) -> str:
    return DASH if x is None else f"{x:.2f}"


def _table(header: Sequence[str], rows: Iterable[Sequence[str]]) -> str:
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    return "\n".join(lines + ["| " + " | ".join(r) + " |" for r in rows])


def _shots(rows: Sequence[Any]) -> list[int]:
    return sorted({r.shots for r in rows})


def _notes(rows: Sequence[Any]) -> str:
    kinds = {r.scored_by for r in rows}
    lines = [f"- {SCORED_BY[k]}: {', '.join(dict.fromkeys(r.method for r in rows if r.scored_by == k))}"
             for k in SCORED_BY if k in kinds]
    extra = [_NOTE_MAP] * ("map" in kinds) + [_NOTE_NONE] * ("none" in kinds)
    return "\nScored by:\n" + "\n".join(lines) + ("\n\n" + " ".join(extra) if extra else "") + "\n"


def base_new_markdown(rows: Sequence[BaseNewRow], classes: Mapping[str, Sequence[str]] | None = None) -> str:
    """One dataset's base-to-new tables (one per shot count: rows = methods; base, new, HM, scored by)."""
    dataset = rows[0].dataset if rows else ""
    counts = f" ({len(classes['base'])} base, {len(classes['new'])} new classes)" if classes else ""
    text = (f"# Base-to-new generalisation: {dataset}{counts}\n\nCoCoOp's protocol: trained on the base classes "
            "(the first ceil(C/2) labels) only; base = the base classes' test images against the base "
            "prototypes, new = the new classes' test images against the new classes' prototypes, HM = "
            "2·base·new / (base + new) of the means. Test accuracy (%), mean ± std over seeds.\n")
    for k in _shots(rows):
        mine = [r for r in rows if r.shots == k]
        text += f"\n## {k}-shot\n\n" + _table(
            ["Method", "Base", "New", "HM", "New classes"],
            ([r.method, _stat(r.base), _stat(r.new), _num(r.hm), _SHORT[r.scored_by]] for r in mine)) + "\n"
    return text + _notes(rows)


def transfer_markdown(rows: Sequence[TransferRow], level: int = 1) -> str:
    """Cross-dataset tables (one per shot count: rows = (source, method); source, each target, target average);
    ``level``: the Markdown heading level of the title (the tables' headings are one below)."""
    targets = list(dict.fromkeys(t for r in rows for t in r.targets))
    sources = list(dict.fromkeys(r.source for r in rows))
    text = (f"{'#' * level} Cross-dataset transfer from {', '.join(sources)}\n\nThe model selected on the source's validation "
            "rows, per seed, scored on each target's test images against the target's own prototypes. Test "
            "accuracy (%), mean ± std over seeds; target average = mean of the targets' means.\n")
    for k in _shots(rows):
        mine = [r for r in rows if r.shots == k]
        header = ["Method", *(["Source"] if len(sources) > 1 else []), "Source accuracy", *targets, "Target average"]
        body = ([r.method, *([r.source] if len(sources) > 1 else []), _stat(r.source_acc),
                 *[_stat(r.targets.get(t)) for t in targets], _num(r.average)] for r in mine)
        text += f"\n{'#' * (level + 1)} {k}-shot\n\n" + _table(header, body) + "\n"
    return text + _notes(rows)


def _write(out: Path, stem: str, markdown: str, payload: Mapping[str, Any], fields: Sequence[str],
           lines: Iterable[Mapping[str, Any]]) -> None:
    (out / f"{stem}.md").write_text(markdown)
    (out / f"{stem}.json").write_text(json.dumps({"schema_version": SCHEMA_VERSION, **payload}, indent=1))
    with open(out / f"{stem}.csv", "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=fields)
        writer.writeheader()
        writer.writerows(lines)


def _csv_num(x: float | None) -> str:
    return "" if x is None else f"{x:.2f}"


def write_base_new(out: Path, rows: Sequence[BaseNewRow], classes: Mapping[str, Sequence[str]]) -> None:
    """``base_to_new.{md,csv,json}`` in run folder ``out``; ``classes``: "base"/"new" -> class names."""
    payload = {"protocol": BASE_TO_NEW, "classes": {k: list(v) for k, v in classes.items()},
               "rows": [r.to_json() for r in rows]}
    lines = ({"dataset": r.dataset, "shots": r.shots, "method": r.method, "seeds": " ".join(map(str, r.seeds)),
              "base_mean": _csv_num(r.base.mean), "base_std": _csv_num(r.base.std),
              "new_mean": _csv_num(r.new and r.new.mean), "new_std": _csv_num(r.new and r.new.std),
              "hm": _csv_num(r.hm), "scored_by": r.scored_by} for r in rows)
    _write(out, BASE_NEW, base_new_markdown(rows, classes), payload, BASE_NEW_CSV, lines)


def write_transfer(out: Path, rows: Sequence[TransferRow]) -> None:
    """``cross_dataset.{md,csv,json}`` in run folder ``out`` (CSV: one line per row and dataset; role source,
    target or average)."""
    def lines() -> Iterable[dict[str, Any]]:
        for r in rows:
            head = {"source": r.source, "shots": r.shots, "method": r.method, "seeds": " ".join(map(str, r.seeds))}
            yield {**head, "dataset": r.source, "role": "source", "mean": _csv_num(r.source_acc.mean),
                   "std": _csv_num(r.source_acc.std)}
            for name, s in r.targets.items():
                yield {**head, "dataset": name, "role": "target", "mean": _csv_num(s and s.mean),
                       "std": _csv_num(s and s.std)}
            yield {**head, "dataset": "", "role": "average", "mean": _csv_num(r.average), "std": ""}

    payload = {"protocol": CROSS_DATASET, "rows": [r.to_json() for r in rows]}
    _write(out, CROSS, transfer_markdown(rows), payload, CROSS_CSV, lines())


def _read(run_dir: Path, stem: str) -> dict[str, Any] | None:
    path = Path(run_dir) / f"{stem}.json"
    if not path.is_file():
        return None
    try:
        data = json.loads(path.read_text())
    except (OSError, ValueError) as e:
        raise TrainError(f"{path}: unreadable ({e}); run `python -m train_jax ... --out {run_dir}` again") from None
    if not isinstance(data, dict) or data.get("schema_version") != SCHEMA_VERSION:
        raise TrainError(f"{path}: not a {stem} file of schema version {SCHEMA_VERSION}; run `python -m train_jax "
                         f"... --out {run_dir}` again")
    return data


def read_base_new(run_dir: str | Path) -> list[BaseNewRow] | None:
    """The rows of a run folder's ``base_to_new.json`` (None: the folder has none)."""
    data = _read(Path(run_dir), BASE_NEW)
    return None if data is None else [BaseNewRow.from_json(r) for r in data["rows"]]


def read_transfer(run_dir: str | Path) -> list[TransferRow] | None:
    """The rows of a run folder's ``cross_dataset.json`` (None: the folder has none)."""
    data = _read(Path(run_dir), CROSS)
    return None if data is None else [TransferRow.from_json(r) for r in data["rows"]]


def _cite(pub: Any, source: str) -> str:
    """A source's short citation (its text up to the first colon) and URL."""
    return f"{pub.sources[source]['cite'].split(':')[0]}, {pub.sources[source]['url']}"


def _published_base_new() -> str:
    pub = load_published()
    rows = [[p.method, f"{p.base:.2f}", f"{p.new:.2f}", f"{p.hm:.2f}"] for p in pub.base_to_new]
    first = pub.base_to_new[0]
    return (f"\nPublished ({_cite(pub, first.source)}; {first.model}, {first.shots} shots, average over "
            f"{first.datasets} datasets):\n\n" + _table(["Method", "Base", "New", "HM"], rows) + "\n")


def _published_cross() -> str:
    pub = load_published()
    rows = [[p.method, f"{p.source_acc:.2f}", f"{p.target_average:.2f}"] for p in pub.cross_dataset]
    first = pub.cross_dataset[0]
    return (f"\nPublished ({_cite(pub, first.source)}; {first.model}, {first.shots} shots, source "
            f"{first.source_dataset}, average over {first.datasets} targets):\n\n"
            + _table(["Method", f"{first.source_dataset}", "Target average"], rows) + "\n")


def base_new_section(rows: Sequence[BaseNewRow]) -> str:
    """Markdown: per shot count, the average over datasets (rows = methods; base, new, HM) and the per-dataset
    table (cells "base / new / HM"), then the published averages."""
    datasets = list(dict.fromkeys(r.dataset for r in rows))
    average = base_new_average(rows)
    text = ("## Base-to-new generalisation (CoCoOp's protocol)\n\nTrained on each dataset's base classes only; "
            "test accuracy (%), mean over seeds; HM of the means; average over the datasets present "
            f"({', '.join(datasets)}); per run: base_to_new.md.\n")
    cell = {(r.dataset, r.shots, r.method): r for r in rows}
    for k in _shots(rows):
        methods = list(dict.fromkeys(r.method for r in rows if r.shots == k))
        mine = {a.method: a for a in average if a.shots == k}
        text += f"\n### {k}-shot, average over {len(datasets)} dataset(s)\n\n" + _table(
            ["Method", "Base", "New", "HM"],
            ([m, _num(mine[m].base), _num(mine[m].new), _num(mine[m].hm)] for m in methods if m in mine)) + "\n"
        if len(datasets) > 1:
            def one(r: BaseNewRow | None) -> str:
                return DASH if r is None else f"{r.base.mean:.2f} / {_num(r.new and r.new.mean)} / {_num(r.hm)}"
            text += f"\n{k}-shot per dataset (base / new / HM):\n\n" + _table(
                ["Method", *datasets], ([m, *[one(cell.get((d, k, m))) for d in datasets]] for m in methods)) + "\n"
    return text + _notes(rows) + _published_base_new()


def cross_section(rows: Sequence[TransferRow]) -> str:
    """Markdown: the cross-dataset table(s) of several run folders, then the published averages."""
    return transfer_markdown(rows, level=2) + _published_cross()


def combined(run_dirs: Sequence[str | Path]) -> tuple[str, dict[str, Any]]:
    """The protocol sections of a summary from run folders (Markdown, "" if none has a protocol table) and their
    JSON: ``{"base_to_new": {"rows", "average"}, "cross_dataset": {"rows"}}`` (keys only for those present)."""
    base_new = [r for d in run_dirs for r in (read_base_new(d) or [])]
    cross = [r for d in run_dirs for r in (read_transfer(d) or [])]
    text, payload = "", {}
    if base_new:
        text += "\n" + base_new_section(base_new)
        payload["base_to_new"] = {"rows": [r.to_json() for r in base_new],
                                  "average": [a.to_json() for a in base_new_average(base_new)]}
    if cross:
        text += "\n" + cross_section(cross)
        payload["cross_dataset"] = {"rows": [r.to_json() for r in cross]}
    return text, payload
