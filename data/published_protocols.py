"""Published averages of the base-to-new and cross-dataset protocols: the ``base_to_new`` and ``cross_dataset``
sections of ``published.json`` (beside ``data.published``'s few-shot rows, with the same sources and model keys):
CoCoOp's 11-dataset averages (ViT-B/16, 16 shots), to set beside real runs. JSON only."""

from __future__ import annotations

import json
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path
from typing import Any, Mapping

from data.errors import DataError
from data.published import PATH


@dataclass(frozen=True)
class BaseNew:
    """A published base-to-new average (%) over ``datasets`` datasets; ``ours``: this project's method of the
    same model (None if none)."""

    method: str
    ours: str | None
    model: str
    shots: int
    datasets: int
    base: float
    new: float
    hm: float
    source: str


@dataclass(frozen=True)
class CrossDataset:
    """A published cross-dataset result (%): accuracy on the source and the average over ``datasets`` targets."""

    method: str
    ours: str | None
    model: str
    shots: int
    source_dataset: str
    source_acc: float
    datasets: int
    target_average: float
    source: str


@dataclass(frozen=True)
class Published:
    """The checked file: sources (key -> {"cite", "url"}) and the rows of each protocol."""

    sources: Mapping[str, Mapping[str, str]]
    base_to_new: tuple[BaseNew, ...]
    cross_dataset: tuple[CrossDataset, ...]


def _rows(path: Path, raw: Any, cls: type, sources: Mapping[str, Any], models: Mapping[str, Any]) -> tuple:
    names = set(cls.__dataclass_fields__)
    rows = []
    for i, r in enumerate(raw if isinstance(raw, list) else [None]):
        if not isinstance(r, dict) or set(r) != names or r["source"] not in sources or r["model"] not in models:
            raise DataError(f"{path}: {cls.__name__} row {i} is not an object with exactly {sorted(names)}, a "
                            "known source and a known model; restore the file from the repository")
        rows.append(cls(**r))
    return tuple(rows)


@lru_cache(maxsize=2)
def load(path: Path = PATH) -> Published:
    """Read and check the two sections of ``published.json``; DataError (one line naming it) if damaged."""
    try:
        data = json.loads(Path(path).read_text())
        sources = {k: {"cite": v["cite"], "url": v["url"]} for k, v in data["sources"].items()}
        models, raw_bn, raw_xd = dict(data["models"]), data["base_to_new"], data["cross_dataset"]
    except (OSError, ValueError, KeyError, TypeError, AttributeError) as e:
        raise DataError(f"{path}: cannot read it ({type(e).__name__}: {e}); restore the file from the "
                        "repository") from None
    return Published(sources, _rows(Path(path), raw_bn, BaseNew, sources, models),
                     _rows(Path(path), raw_xd, CrossDataset, sources, models))
