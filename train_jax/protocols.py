"""The generalisation protocols' results: base-to-new (CoCoOp) and cross-dataset transfer, as typed rows.

- **base-to-new**: a run trains on the base classes of a dataset (``data.class_split``); its records' test
  accuracy is on the base classes' test images against the base prototypes, and ``RunRecord.transfer[NEW]`` the
  accuracy of the same model on the new classes' test images against the new classes' prototypes.
- **cross-dataset**: a run trains on a source cache as usual; ``RunRecord.transfer[name]`` is the accuracy of
  the selected model on target cache ``name``'s test images against that cache's own prototypes.

Only a model that scores classes by their prototypes can take part (``Head.class_free``: CMM and CE-only apply
the learned map to the new classes' frozen prompt prototypes; learned prototype offsets exist only for the
training classes). Methods with per-class weights (linear probe, Tip-Adapter-F) have no transfer accuracies:
their rows hold None, shown as "—". Zero-shot CLIP is the reference row. numpy only (no JAX).
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Any, Iterable, Mapping, Protocol, Sequence

import numpy as np

from train_jax.evaluate import mean_std
from train_jax.errors import TrainError

PROTOCOLS = ("few-shot", "base-to-new", "cross-dataset")
FEW_SHOT, BASE_TO_NEW, CROSS_DATASET = PROTOCOLS
NEW = "new"  # ``RunRecord.transfer`` key of the new classes in base-to-new
REFERENCE = "zeroshot"  # the reference row: zero-shot CLIP, scored on every class set with its prototypes
# how a row's new classes / targets were scored: the reference, the learned map, or not at all (per-class weights)
SCORED_BY = {"zero-shot": "zero-shot CLIP on the classes' prototypes (reference)",
             "map": "the learned map on the classes' frozen prompt prototypes",
             "none": "not scored: per-class weights exist only for the training classes"}


class Scored(Protocol):
    """What the summaries read of a ``records.RunRecord``."""

    dataset: str
    shots: int
    method: str
    seed: int
    selected: bool
    test_acc: float
    transfer: Mapping[str, float]


def harmonic_mean(base: float, new: float) -> float:
    """HM = 2 * base * new / (base + new), CoCoOp's summary of base and new accuracy (0 when both are 0)."""
    return 0.0 if base + new == 0 else 2.0 * base * new / (base + new)


def scored_by(method: str, has_transfer: bool) -> str:
    """The ``SCORED_BY`` key of a method's row: its transfer accuracies exist (``has_transfer``) or not."""
    return "zero-shot" if method == REFERENCE else ("map" if has_transfer else "none")


@dataclass(frozen=True)
class Stat:
    """Mean and population std (%) over seeds."""

    mean: float
    std: float

    @classmethod
    def of(cls, values: Sequence[float]) -> "Stat":
        return cls(*mean_std(values))


@dataclass(frozen=True)
class BaseNewRow:
    """One (dataset, shots, method) of base-to-new over its selected seeds: base and new accuracy (new None when
    the method cannot score new classes) and their harmonic mean (of the means, as CoCoOp reports it)."""

    dataset: str
    shots: int
    method: str
    seeds: tuple[int, ...]
    base: Stat
    new: Stat | None
    hm: float | None
    scored_by: str

    def to_json(self) -> dict[str, Any]:
        return _to_json(self)

    @classmethod
    def from_json(cls, data: Mapping[str, Any]) -> "BaseNewRow":
        return _from_json(cls, data)


@dataclass(frozen=True)
class TransferRow:
    """One (source dataset, shots, method) of cross-dataset transfer over its selected seeds: accuracy on the
    source, on each target (None when the method cannot score other classes) and the mean of the targets'
    means."""

    source: str
    shots: int
    method: str
    seeds: tuple[int, ...]
    source_acc: Stat
    targets: Mapping[str, Stat | None]
    average: float | None
    scored_by: str

    def to_json(self) -> dict[str, Any]:
        return _to_json(self)

    @classmethod
    def from_json(cls, data: Mapping[str, Any]) -> "TransferRow":
        return _from_json(cls, data)


@dataclass(frozen=True)
class AverageRow:
    """Base-to-new over datasets for one (shots, method): the mean of the datasets' base and new means (new None
    unless every dataset has one) and the HM of those means; ``datasets`` says which."""

    shots: int
    method: str
    datasets: tuple[str, ...]
    base: float
    new: float | None
    hm: float | None
    scored_by: str

    def to_json(self) -> dict[str, Any]:
        return _to_json(self)

    @classmethod
    def from_json(cls, data: Mapping[str, Any]) -> "AverageRow":
        return _from_json(cls, data)


def _to_json(row: Any) -> dict[str, Any]:
    out = {}
    for f in dataclasses.fields(row):
        value = getattr(row, f.name)
        if isinstance(value, Stat):
            value = dataclasses.asdict(value)
        elif isinstance(value, tuple):
            value = list(value)
        elif isinstance(value, Mapping):
            value = {k: None if v is None else dataclasses.asdict(v) for k, v in value.items()}
        out[f.name] = value
    return out


def _from_json(cls: type, data: Mapping[str, Any]) -> Any:
    """Inverse of ``_to_json`` for the row class ``cls``; TrainError naming missing or unknown keys."""
    names = [f.name for f in dataclasses.fields(cls)]
    if not isinstance(data, Mapping) or set(data) != set(names):
        got = sorted(data) if isinstance(data, Mapping) else data
        raise TrainError(f"a {cls.__name__} needs exactly the keys {names}, got {got!r}")
    stat = lambda v: None if v is None else Stat(float(v["mean"]), float(v["std"]))  # noqa: E731
    out = {}
    for f in dataclasses.fields(cls):
        value, kind = data[f.name], str(f.type)
        if kind.startswith("Stat"):
            value = stat(value)
        elif kind.startswith("Mapping[str, Stat"):
            value = {k: stat(v) for k, v in value.items()}
        elif kind.startswith("tuple"):
            value = tuple(value)
        out[f.name] = value
    return cls(**out)


def _selected(records: Iterable[Scored]) -> dict[tuple[str, int, str], list[Scored]]:
    """(dataset, shots, method) -> its selected records by seed, in first-seen order of the keys."""
    out: dict[tuple[str, int, str], list[Scored]] = {}
    for r in records:
        if r.selected:
            out.setdefault((r.dataset, r.shots, r.method), []).append(r)
    return {k: sorted(v, key=lambda r: r.seed) for k, v in out.items()}


def _target_stat(chosen: Sequence[Scored], name: str) -> Stat | None:
    """Mean/std of target ``name`` over the seeds; None unless every selected seed has it."""
    values = [r.transfer.get(name) for r in chosen]
    return None if any(v is None for v in values) else Stat.of(values)


def base_new_rows(records: Iterable[Scored]) -> list[BaseNewRow]:
    """The base-to-new rows of a base-to-new run's records (selected runs only), in record order."""
    rows = []
    for (dataset, shots, method), chosen in _selected(records).items():
        base, new = Stat.of([r.test_acc for r in chosen]), _target_stat(chosen, NEW)
        rows.append(BaseNewRow(dataset, shots, method, tuple(r.seed for r in chosen), base, new,
                               None if new is None else harmonic_mean(base.mean, new.mean),
                               scored_by(method, new is not None)))
    return rows


def transfer_rows(records: Iterable[Scored], targets: Sequence[str]) -> list[TransferRow]:
    """The cross-dataset rows of a run's records (selected runs only) for the target names ``targets``."""
    rows = []
    for (source, shots, method), chosen in _selected(records).items():
        stats = {t: _target_stat(chosen, t) for t in targets}
        means = [s.mean for s in stats.values() if s is not None]
        average = float(np.mean(means)) if targets and len(means) == len(targets) else None
        rows.append(TransferRow(source, shots, method, tuple(r.seed for r in chosen),
                                Stat.of([r.test_acc for r in chosen]), stats, average,
                                scored_by(method, bool(means))))
    return rows


def base_new_average(rows: Sequence[BaseNewRow]) -> list[AverageRow]:
    """Per (shots, method) present for every dataset of ``rows``: the mean over datasets of base and of new
    (None if a dataset has no new accuracy) and the HM of the two means (CoCoOp's "Average over 11 datasets")."""
    datasets = tuple(dict.fromkeys(r.dataset for r in rows))
    out = []
    for shots, method in dict.fromkeys((r.shots, r.method) for r in rows):
        mine = {r.dataset: r for r in rows if (r.shots, r.method) == (shots, method)}
        if set(mine) != set(datasets):
            continue
        base = float(np.mean([mine[d].base.mean for d in datasets]))
        news = [mine[d].new for d in datasets]
        new = None if any(n is None for n in news) else float(np.mean([n.mean for n in news]))
        out.append(AverageRow(shots, method, datasets, base, new, None if new is None else harmonic_mean(base, new),
                              scored_by(method, new is not None)))
    return out
