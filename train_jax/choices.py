"""What validation chose among searched on/off settings: ``learn_text`` (learned class prototypes T + ΔT instead of
the frozen prompt embeddings) and ``use_aug`` (training on the cached augmented views). ``chosen_on`` gives, for
one (dataset, method, shots), the seeds whose selected setting turned each on; ``markdown`` counts them per
method and shot count (summed over datasets in a combined report)."""

from __future__ import annotations

from typing import Any, Mapping, Sequence

from train_jax.config import FIELDS

BOOL_SETTINGS = tuple(name for name, f in FIELDS.items() if f.type == "bool")
LABELS = {"learn_text": "learned prototypes (learn_text=1)", "use_aug": "augmented views (use_aug=1)"}


def chosen_on(runs: Sequence[Any]) -> dict[str, tuple[int, ...]]:
    """For each boolean setting the runs (``records.RunRecord``: seed, selected, settings) of one (dataset, method,
    shots) searched (both values trained): the seeds whose selected run has it on, sorted."""
    return {name: tuple(sorted(r.seed for r in runs if r.selected and getattr(r.settings, name)))
            for name in BOOL_SETTINGS if len({getattr(r.settings, name) for r in runs}) > 1}


def markdown(summary: Sequence[Mapping[str, Any]]) -> str:
    """Markdown: rows = (method, setting), columns = shots, cells "k/n" = k of the n selected seeds chose the
    setting on (summed over the datasets present); "" when no on/off setting was searched."""
    counts: dict[tuple[str, str], dict[int, list[int]]] = {}
    for r in summary:
        for name, seeds in r.get("chose", {}).items():
            cell = counts.setdefault((r["method"], name), {}).setdefault(r["shots"], [0, 0])
            cell[0] += len(seeds)
            cell[1] += len(r["seeds"])
    if not counts:
        return ""
    shots = sorted({k for cells in counts.values() for k in cells})
    datasets = len({r["dataset"] for r in summary if r.get("chose")})
    lines = ["| Method | Setting | " + " | ".join(f"{k}-shot" for k in shots) + " |", "|---|---|" + "---|" * len(shots)]
    for (method, name), cells in counts.items():
        row = [f"{cells[k][0]}/{cells[k][1]}" if k in cells else "—" for k in shots]
        lines.append(f"| {method} | {LABELS.get(name, f'{name}=1')} | " + " | ".join(row) + " |")
    over = f", summed over {datasets} datasets" if datasets > 1 else ""
    return (f"\n## Chosen on validation\n\nSeeds whose selected setting has it on / selected seeds{over}:\n\n"
            + "\n".join(lines) + "\n")
