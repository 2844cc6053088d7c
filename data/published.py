"""Published accuracies with their sources (``published.json``), and which published model a cache's encoder is.

``load()`` reads and checks the file once: ``models`` (a key such as ``"RN50/openai"`` -> the open_clip names and
the weights, by pretrained tag or by the weights file's sha256), ``sources`` (key -> citation and URL) and the
``few_shot`` rows (dataset, model key, method, prompt choice, accuracy, source). ``model_key(attrs)`` names the
published model of a cache's root attributes; ``Published.lookup`` finds the row a measured result is compared
with. Other protocols (base-to-new, cross-dataset) are further top-level sections that their own readers check
(``data.published_protocols``).
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path
from typing import Any, Mapping

from data.errors import DataError
from data.registry import dataset_names

PATH = Path(__file__).resolve().parent / "published.json"
# the dataset's own template, CLIP's 7 ImageNet ones, CLIP's own sets; "any": a method that uses no prompt
PROMPTS = ("single", "ensemble", "openai", "any")
SHOTS = (1, 2, 4, 8, 16)


@dataclass(frozen=True)
class Model:
    """A published model: the open_clip names it is built under, its pretrained tags and weight files' sha256."""

    key: str
    open_clip: tuple[str, ...]
    pretrained: tuple[str, ...]
    weights_sha256: tuple[str, ...]

    def matches(self, attrs: Mapping[str, Any]) -> bool:
        """Whether a cache's root attributes (``model``, ``pretrained``, ``weights_sha256``) name this model."""
        weights = attrs.get("pretrained") in self.pretrained or attrs.get("weights_sha256") in self.weights_sha256
        return attrs.get("model") in self.open_clip and bool(weights)


@dataclass(frozen=True)
class Row:
    """One published accuracy (%): ``shots`` None for zero-shot (it holds for every shot count)."""

    dataset: str
    model: str
    method: str
    prompt: str
    shots: int | None
    accuracy: float
    source: str


@dataclass(frozen=True)
class Published:
    """The checked contents of ``published.json``: models, sources (key -> {"cite", "url"}) and few-shot rows."""

    models: Mapping[str, Model]
    sources: Mapping[str, Mapping[str, str]]
    rows: tuple[Row, ...]

    def model_key(self, attrs: Mapping[str, Any]) -> str | None:
        """The key of the published model a cache's root attributes name, None if none."""
        return next((m.key for m in self.models.values() if m.matches(attrs)), None)

    def lookup(self, dataset: str, model: str, method: str, prompt: str, shots: int) -> Row | None:
        """The published row of a measured result (zero-shot rows hold for any shot count, rows of prompt "any"
        for any prompt choice), None if none; the first in file order when several match."""
        return next((r for r in self.rows if (r.dataset, r.model, r.method) == (dataset, model, method)
                     and r.prompt in (prompt, "any") and r.shots in (None, shots)), None)


def _fail(path: Path, what: str) -> DataError:
    return DataError(f"{path}: {what}; restore the file from the repository")


def _rows(path: Path, raw: Any, models: Mapping[str, Model], sources: Mapping[str, Any]) -> tuple[Row, ...]:
    known = set(dataset_names("benchmark")) | set(dataset_names("shift"))
    rows = []
    for i, r in enumerate(raw if isinstance(raw, list) else [None]):
        where = f"few_shot row {i}"
        if not isinstance(r, dict) or set(r) != {"dataset", "model", "method", "prompt", "accuracy", "source"}:
            raise _fail(path, f"{where} is not an object with dataset, model, method, prompt, accuracy, source")
        for key, valid in (("dataset", known), ("model", models), ("prompt", PROMPTS), ("source", sources)):
            if r[key] not in valid:
                raise _fail(path, f"{where}: unknown {key} {r[key]!r}")
        acc = r["accuracy"] if isinstance(r["accuracy"], dict) else {None: r["accuracy"]}
        for shots, value in acc.items():
            if shots is not None and (not str(shots).isdigit() or int(shots) not in SHOTS):
                raise _fail(path, f"{where}: shots {shots!r} is not one of {SHOTS}")
            if isinstance(value, bool) or not isinstance(value, (int, float)) or not 0 <= value <= 100:
                raise _fail(path, f"{where}: accuracy {value!r} is not a percentage")
            rows.append(Row(r["dataset"], r["model"], str(r["method"]), r["prompt"],
                            None if shots is None else int(shots), float(value), r["source"]))
    return tuple(rows)


@lru_cache(maxsize=4)
def load(path: Path = PATH) -> Published:
    """Read and check ``published.json``; DataError (one line naming the file) if it is damaged."""
    try:
        data = json.loads(Path(path).read_text())
        models = {k: Model(k, tuple(v["open_clip"]), tuple(v["pretrained"]), tuple(v["weights_sha256"]))
                  for k, v in data["models"].items()}
        sources = {k: {"cite": v["cite"], "url": v["url"]} for k, v in data["sources"].items()}
        raw = data["few_shot"]
    except (OSError, ValueError, KeyError, TypeError, AttributeError) as e:
        raise _fail(Path(path), f"cannot read it ({type(e).__name__}: {e})") from None
    return Published(models, sources, _rows(Path(path), raw, models, sources))
