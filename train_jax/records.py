"""The results format: one ``RunRecord`` per trained (method, seed, setting) run, one ``Learned`` per selected model,
the versioned JSON files the records live in (``shots/<K>shot.json``, the ``runs`` of ``results.json``), and the
selected runs' per-test-image correctness (``shots/<K>shot_test_correct.npz``)."""

from __future__ import annotations

import dataclasses
import json
import os
import zipfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Mapping, Sequence

import numpy as np

from train_jax.config import Settings
from train_jax.errors import TrainError

# 1: a plain JSON list of record dicts (no version); 2: {"schema_version": 2, "records": [...]} of RunRecord.to_json;
# 3: as 2, records with ``loss_curve`` (absent in 2: read as no curve); 4: as 3, records with ``loss_parts``
# (absent in 2 and 3: read as none).
SCHEMA_VERSION = 4


@dataclass(frozen=True)
class RunRecord:
    """One run's results. ``setting``: the label of the grid fields it varies ("-" if none); accuracies in %;
    ``val_score``: mean log-probability of the true class on its validation rows (None if not finite);
    ``fail_step``: the step a non-finite loss or update stopped it (None unless ``failed``); ``final_loss``: None if
    not finite; ``loss_curve``: its mean training loss per epoch of the program (None: an epoch past its own or its
    failure; empty for a method with its own trainer); ``loss_parts``: part name (``Head.part_names``, e.g. CMM's "ce"
    and "triplet") -> its mean per epoch as ``loss_curve`` (empty for a head without parts); ``selected``: chosen on validation; ``tie_break``: what decided that choice (None, "score",
    "order"); ``shift``: shift set name -> accuracy (selected runs only); ``note``: its trainer's remark."""

    dataset: str
    shots: int
    method: str
    seed: int
    setting: str
    settings: Settings
    val_acc: float
    val_score: float | None
    test_acc: float
    failed: bool
    fail_step: int | None
    final_loss: float | None
    selected: bool
    tie_break: str | None
    shift: Mapping[str, float]
    note: str = ""
    loss_curve: tuple[float | None, ...] = ()
    loss_parts: Mapping[str, tuple[float | None, ...]] = dataclasses.field(default_factory=dict)

    def to_json(self) -> dict[str, Any]:
        """A JSON-able dict, one key per field (``settings`` as ``Settings.to_dict``)."""
        out = {f.name: getattr(self, f.name) for f in dataclasses.fields(self)}
        return {**out, "settings": self.settings.to_dict(), "shift": dict(self.shift), "loss_curve": list(self.loss_curve),
                "loss_parts": {k: list(v) for k, v in self.loss_parts.items()}}

    @classmethod
    def from_json(cls, data: Mapping[str, Any]) -> "RunRecord":
        """Inverse of ``to_json``; TrainError naming the missing or unknown keys."""
        names = {f.name for f in dataclasses.fields(cls)}
        required = {f.name for f in dataclasses.fields(cls)
                    if f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING}
        if not isinstance(data, Mapping) or not required <= set(data) or not set(data) <= names:
            keys = set(data) if isinstance(data, Mapping) else set()
            raise TrainError(f"a run record with missing keys {sorted(required - keys)} or unknown keys "
                             f"{sorted(keys - names)}")
        return cls(**{**data, "settings": Settings.from_dict(data["settings"]), "shift": dict(data["shift"]),
                      "loss_curve": tuple(data.get("loss_curve", ())),
                      "loss_parts": {k: tuple(v) for k, v in dict(data.get("loss_parts", {})).items()}})


@dataclass(frozen=True)
class Learned:
    """A selected model: its settings and parameter/constant trees (see ``train_jax.methods.logits``)."""

    settings: Settings
    params: Mapping[str, Any]
    consts: Mapping[str, Any]


def records_to_json(records: Sequence[RunRecord]) -> dict[str, Any]:
    """``{"schema_version": SCHEMA_VERSION, "records": [...]}``."""
    return {"schema_version": SCHEMA_VERSION, "records": [r.to_json() for r in records]}


def records_from_json(data: Any, source: str | Path) -> list[RunRecord]:
    """Inverse of ``records_to_json``; also reads versions 1 (a plain list), 2 (no loss curves) and 3 (no loss parts). TrainError naming
    ``source`` for anything else."""
    if isinstance(data, Mapping) and data.get("schema_version") in (2, 3, SCHEMA_VERSION):
        data = data.get("records")
    if not isinstance(data, list):
        version = data.get("schema_version") if isinstance(data, Mapping) else None
        raise TrainError(f"{source}: not a run-records file of schema version 1 to {SCHEMA_VERSION} (found "
                         f"{version!r}); train into a new --out")
    try:
        return [RunRecord.from_json(r) for r in data]
    except (TrainError, TypeError, ValueError) as e:
        raise TrainError(f"{source}: {e}; train into a new --out") from None


def read_records(path: Path) -> list[RunRecord]:
    """The records of a ``shots/<K>shot.json``; TrainError if it is not readable JSON of a known schema."""
    try:
        data = json.loads(path.read_text())
    except (OSError, ValueError) as e:
        raise TrainError(f"{path}: unreadable ({e}); delete it to train that shot count again") from None
    return records_from_json(data, path)


# Per-test-image correctness of the selected runs, for the paired comparisons (train_jax.compare):
# shots/<K>shot_test_correct.npz holds "schema_version" (CORRECT_VERSION) and, per selected run,
# "method/seed<k>" -> bool [N_test] (the encoded test rows in cache order). Version 1.
CORRECT_VERSION = 1


def correct_path(shots_dir: Path, shots: int) -> Path:
    """Where the per-image correctness of a shot count's selected runs lives, beside ``<K>shot.json``."""
    return Path(shots_dir) / f"{shots}shot_test_correct.npz"


def write_correct(path: Path, correct: Mapping[str, Any]) -> None:
    """Write ``{"method/seed<k>": bool [N_test]}`` (compressed .npz, written to a temporary file and renamed)."""
    path = Path(path)
    tmp = path.with_name(path.name + ".tmp")
    try:
        with open(tmp, "wb") as f:
            np.savez_compressed(f, schema_version=np.array(CORRECT_VERSION),
                                **{k: np.asarray(v, bool) for k, v in correct.items()})
        os.replace(tmp, path)
    except OSError as e:
        raise TrainError(f"{path}: cannot write it ({e.strerror}); choose a writable --out") from None


def read_correct(path: Path) -> dict[tuple[str, int], np.ndarray] | None:
    """``{(method, seed): bool [N_test]}`` from a file of ``write_correct``; None when there is no file (a
    run folder from before it was written). TrainError naming the file when it is unreadable, of another
    version, or its arrays differ in length."""
    path = Path(path)
    if not path.is_file():
        return None
    try:
        with np.load(path, allow_pickle=False) as data:
            arrays = {k: data[k] for k in data.files}
    except (OSError, ValueError, zipfile.BadZipFile) as e:
        raise TrainError(f"{path}: unreadable ({e}); delete it (comparisons then use seeds only)") from None
    version = arrays.pop("schema_version", None)
    if version is None or version.shape != () or int(version) != CORRECT_VERSION:
        raise TrainError(f"{path}: not a per-image results file of schema version {CORRECT_VERSION}; delete "
                         "it (comparisons then use seeds only)")
    out = {}
    for key, value in arrays.items():
        method, _, seed = key.partition("/seed")
        if not seed.isdigit() or value.dtype != bool or value.ndim != 1:
            raise TrainError(f"{path}: entry {key!r} is not a 'method/seed<k>' -> bool [N] array; delete it "
                             "(comparisons then use seeds only)")
        out[(method, int(seed))] = value
    if len({v.shape for v in out.values()}) > 1:
        raise TrainError(f"{path}: its runs have different test-set sizes; delete it (comparisons then use seeds "
                         "only)")
    return out
