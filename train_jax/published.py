"""Measured accuracies beside published ones (``data/published.json``), and the zero-shot check.

``for_row`` gives the ``published`` entry of a summary row (``records.SummaryRow``) whose dataset, model (name and
weights, from the run's cache identity), method, prompt choice and shot count match a published row: {"accuracy",
"delta", "source", "model", "url", "suspect"}. Zero-shot accuracy depends only on the weights, the preprocessing,
the templates and the class names, so a zero-shot Δ beyond ``ZEROSHOT_TOLERANCE`` points marks it ``suspect``: a
likely extraction problem. ``markdown`` renders the comparison table and ``warnings`` the terminal lines, from the
summary rows' JSON (``results.json`` carries the entries to the combined report).
"""

from __future__ import annotations

import json
from typing import Any, Mapping, MutableMapping, Sequence

from data.published import load

ZEROSHOT_TOLERANCE = 1.0  # percentage points; the peers' own zero-shot numbers for one model differ by < 0.5
FLAG = "⚠"


def for_row(dataset: str, method: str, shots: int, measured: float | None, identity: Mapping[str, Any],
            prompt: str) -> dict[str, Any] | None:
    """The ``"published"`` entry of one summary row: {"accuracy", "delta", "source", "model", "url", "suspect"
    (and "check", the diagnosis, when suspect)}, or None without a published match or a measured accuracy.
    ``identity``: the run's ``data.cache.cache_identity``; ``prompt``: its prototype choice."""
    published = load()
    model = published.model_key(identity)
    match = None if model is None or measured is None else published.lookup(dataset, model, method, prompt, shots)
    if match is None:
        return None
    delta = measured - match.accuracy
    entry = {"accuracy": match.accuracy, "delta": delta, "source": match.source, "model": model,
             "url": published.sources[match.source]["url"],
             "suspect": match.shots is None and abs(delta) > ZEROSHOT_TOLERANCE}
    if entry["suspect"]:
        entry["check"] = check_line(dataset, measured, entry, identity)
    return entry


def annotate(summary: Sequence[MutableMapping[str, Any]], identity: Mapping[str, Any], prompt: str) -> None:
    """Add ``"published"`` (``for_row``) to each summary row (JSON dict) with a published match."""
    for row in summary:
        entry = for_row(row["dataset"], row["method"], row["shots"], row.get("test_mean"), identity, prompt)
        if entry is not None:
            row["published"] = entry


def _zeroshot_once(summary: Sequence[Mapping[str, Any]]) -> list[Mapping[str, Any]]:
    """The annotated rows, zero-shot rows once per dataset (they hold for every shot count)."""
    seen: set[tuple[str, str]] = set()
    rows = []
    for r in summary:
        if "published" not in r:
            continue
        key = (r["dataset"], r["method"])
        if r["method"] == "zeroshot" and key in seen:
            continue
        seen.add(key)
        rows.append(r)
    return rows


def check_line(dataset: str, measured: float, p: Mapping[str, Any], identity: Mapping[str, Any]) -> str:
    """The one-line diagnosis of a suspect zero-shot result (``p``: its published entry): what to check, with the
    cache's own values."""
    weights = identity.get("pretrained") or "?"
    sha = str(identity.get("weights_sha256") or "")[:12]
    preprocess = identity.get("preprocess") or ""
    try:
        pre = json.loads(preprocess) if preprocess else {}
        preprocess = ", ".join(f"{k} {v}" for k, v in pre.items()) if isinstance(pre, dict) else preprocess
    except ValueError:
        pass
    return (f"{dataset} zero-shot {measured:.2f}% is {p['delta']:+.2f} points from the published "
            f"{p['accuracy']:.2f}% ({p['model']}, {p['source']}): zero-shot accuracy is fixed by the weights, so this "
            f"is likely an extraction problem; check the weights file and activation (pretrained {weights}"
            f"{f', sha256 {sha}…' if sha else ''}, activation {identity.get('activation') or '?'}), the preprocessing"
            f"{f' ({preprocess})' if preprocess else ''}, the templates and the class names")


def markdown(summary: Sequence[Mapping[str, Any]]) -> str:
    """A Markdown section: Dataset | Method | Shots | measured | published | Δ | source, for the annotated rows
    (zero-shot once per dataset, "any" shots), ``FLAG`` on a suspect Δ and its diagnosis below; "" if none."""
    rows = _zeroshot_once(summary)
    if not rows:
        return ""
    lines = ["| Dataset | Method | Shots | measured | published | Δ | source |", "|---|---|---|---|---|---|---|"]
    for r in rows:
        p = r["published"]
        shots = "any" if r["method"] == "zeroshot" else str(r["shots"])
        delta = f"{p['delta']:+.2f}" + (f" {FLAG}" if p["suspect"] else "")
        lines.append(f"| {r['dataset']} | {r['method']} | {shots} | {r['test_mean']:.2f} | {p['accuracy']:.2f} | "
                     f"{delta} | [{p['source']}]({p['url']}) |")
    suspect = [r for r in rows if r["published"]["suspect"]]
    notes = "".join(f"\n{FLAG} {r['published']['check']}.\n" for r in suspect)
    models = ", ".join(sorted({r["published"]["model"] for r in rows}))
    return (f"\n## Published ({models})\n\nMeasured (mean over seeds) beside the published "
            "accuracy of the same dataset, model, method, template choice and shots (`data/published.json`); "
            f"published few-shot numbers use the authors' own draws and selection (README, Methods).\n\n"
            + "\n".join(lines) + "\n" + notes)


def warnings(summary: Sequence[Mapping[str, Any]]) -> list[str]:
    """One terminal line per suspect zero-shot result (once per dataset)."""
    return [r["published"]["check"] for r in _zeroshot_once(summary) if r["published"]["suspect"]]
