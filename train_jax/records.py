"""Every file a run folder holds, typed and versioned, and how each is written and read back.

- ``run_config.json``: ``ConfigRecord``, what the results were made with (checked when a folder is resumed);
- ``shots/<K>shot.json``: one ``RunRecord`` per trained (method, seed, setting) run of one shot count;
- ``shots/<K>shot_test_correct.npz``: per selected run, which test images it classified correctly (``write_correct``
  / ``read_correct``, for the paired comparisons of ``train_jax.compare``);
- ``params/<K>shot.npz``: one ``Learned`` per selected model (``save_params`` / ``load_params``);
- ``results.json``: the config, one ``SummaryRow`` per (dataset, method, shots) and every ``RunRecord``, under
  ``schema_version``; ``results.csv``: one line per run (``CSV_FIELDS``);
- ``gap.json`` / ``gap.md``: ``GapFile`` (``write_gap`` / ``read_gap``), the modality gap before and after each map;
- ``compare.json`` / ``compare.csv``: ``CompareFile`` (``write_compare`` / ``read_compare``), the paired comparisons
  of a run folder or of the combine mode's folder.

Every file name is declared once below (``RUN_CONFIG`` ... ``SUMMARY_JSON``). ``report`` and ``compare_report``
render these into tables and plots, ``gap`` computes the modality-gap statistics and draws gap.png.
"""

from __future__ import annotations

import csv
import dataclasses
import json
import os
import zipfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterable, Mapping, Sequence

import numpy as np

from data.cache import identity_diff
from train_jax import choices, published
from train_jax.compare import LEVEL as COMPARE_LEVEL
from train_jax.compare import POWER as COMPARE_POWER
from train_jax.compare import Comparison, Interval
from train_jax.config import Settings
from train_jax.errors import TrainError
from train_jax.evaluate import mean_std
from train_jax.protocols import FEW_SHOT

# 1: a plain JSON list of record dicts (no version); 2: {"schema_version": 2, "records": [...]} of RunRecord.to_json;
# 3: as 2, records with ``loss_curve`` (absent in 2: read as no curve); 4: as 3, records with ``loss_parts``
# (absent in 2 and 3: read as none); 5: as 4, records with ``transfer`` (absent before: read as none); 6: as 5,
# ``val_acc`` None in a validation-free run (--select none).
SCHEMA_VERSION = 6


@dataclass(frozen=True)
class RunRecord:
    """One run's results. ``setting``: the label of the grid fields it varies ("-" if none; validation-free: its
    method's fixed fields); accuracies in % (``val_acc`` None: a validation-free run, no validation rows);
    ``val_score``: mean log-probability of the true class on its validation rows (None if not finite);
    ``fail_step``: the step a non-finite loss or update stopped it (None unless ``failed``); ``final_loss``: None if
    not finite; ``loss_curve``: its mean training loss per epoch of the program (None: an epoch past its own or its
    failure; empty for a method with its own trainer); ``loss_parts``: part name (``Head.part_names``, e.g. CMM's
    "ce" and "triplet") -> its mean per epoch as ``loss_curve`` (empty for a head without parts); ``selected``:
    chosen on validation (validation-free: every run that did not fail); ``tie_break``: what decided that choice
    (None, "score", "order"); ``shift``: shift set name -> accuracy (selected runs only); ``note``: its trainer's
    remark; ``transfer``: target -> accuracy on classes it was not trained on, with their own prototypes (selected
    runs of a head with ``class_free`` only; ``protocols``: base-to-new's new classes, cross-dataset targets)."""

    dataset: str
    shots: int
    method: str
    seed: int
    setting: str
    settings: Settings
    val_acc: float | None
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
    transfer: Mapping[str, float] = dataclasses.field(default_factory=dict)

    def to_json(self) -> dict[str, Any]:
        """A JSON-able dict, one key per field (``settings`` as ``Settings.to_dict``)."""
        out = {f.name: getattr(self, f.name) for f in dataclasses.fields(self)}
        return {**out, "settings": self.settings.to_dict(), "shift": dict(self.shift), "loss_curve": list(self.loss_curve),
                "loss_parts": {k: list(v) for k, v in self.loss_parts.items()}, "transfer": dict(self.transfer)}

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
                      "loss_parts": {k: tuple(v) for k, v in dict(data.get("loss_parts", {})).items()},
                      "transfer": dict(data.get("transfer", {}))})


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
    """Inverse of ``records_to_json``; also reads versions 1 (a plain list), 2 (no loss curves), 3 (no loss parts),
    4 (no transfer) and 5 (a validation accuracy in every record). TrainError naming ``source`` for anything else."""
    if isinstance(data, Mapping) and data.get("schema_version") in (2, 3, 4, 5, SCHEMA_VERSION):
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


# --- the run folder: every file ``python -m train_jax`` writes, and how it is read back ---

RUN_CONFIG = "run_config.json"  # ConfigRecord
RESULTS_JSON, RESULTS_CSV = "results.json", "results.csv"  # write_results / read_results
RESULTS_MD, ACCURACY_PNG, LOSS_PNG = "results.md", "accuracy_vs_shots.png", "loss_curves.png"  # train_jax.report
COMPILE_JSON = "compile.json"  # train_jax.compile_cache's counts of one run
GAP_JSON, GAP_MD, GAP_PNG = "gap.json", "gap.md", "gap.png"  # GapFile (write_gap / read_gap), train_jax.gap
COMPARE_JSON, COMPARE_CSV = "compare.json", "compare.csv"  # CompareFile (write_compare / read_compare)
SUMMARY_MD, SUMMARY_JSON = "summary.md", "summary.json"  # the combine mode's folder (train_jax.report.combine)
SHOTS_DIR, PARAMS_DIR = "shots", "params"  # shot_path, correct_path; params_path
# .md/.csv/.json of the protocols' tables (train_jax.protocol_report: BaseNewRow / TransferRow, schema there)
BASE_TO_NEW_STEM, CROSS_DATASET_STEM = "base_to_new", "cross_dataset"

PATH_KEYS = ("cache", "eval_caches", "transfer_caches")  # recorded for information; folders are matched by cache identity
CSV_FIELDS = ("dataset", "shots", "method", "seed", "setting", "val_acc", "val_score", "test_acc", "selected",
              "tie_break", "failed", "select")  # select: the --select mode, "none" for a validation-free run


def write_json(path: Path, data: Any) -> None:
    """Write ``data`` as indented JSON through a temporary file renamed into place (never a partial file)."""
    tmp = path.with_suffix(path.suffix + ".tmp")
    try:
        tmp.write_text(json.dumps(data, indent=1))
        os.replace(tmp, path)
    except OSError as e:
        raise TrainError(f"{path}: cannot write it ({e.strerror}); choose a writable --out") from None


def prepare_out(out: Path) -> None:
    """Create the run folder and its sub-folders (shots/, params/); one-line errors for a file in the way or no
    write access."""
    if out.exists() and not out.is_dir():
        raise TrainError(f"{out}: is a file, not a folder; give --out a folder (new or of an earlier run)")
    try:
        for folder in (out, out / SHOTS_DIR, out / PARAMS_DIR):
            folder.mkdir(parents=True, exist_ok=True)
        probe = out / ".write-test"
        probe.touch()
        probe.unlink()
    except OSError as e:
        raise TrainError(f"{e.filename or out}: cannot write there ({e.strerror}); choose a writable --out") from None


@dataclass(frozen=True)
class ConfigRecord:
    """``run_config.json``: what a run folder's results were made with. cache, eval_caches: resolved paths (for
    information); seeds, methods: as run; grid: the searched grid as JSON (``config.grid_to_json``); prompt:
    "single" or "ensemble"; select: the --select mode; logit_scale and where it came from ("cache", "default" or
    "grid"); identity: the training cache's ``data.cache.cache_identity``; caches: ``{"cache": identity,
    "eval_caches": [identity, ...]}`` (``data.cache.file_identity``), what a resumed run must match; protocol:
    one of ``protocols.PROTOCOLS``; transfer_caches: the cross-dataset targets' resolved paths (their identities
    in ``caches["transfer_caches"]``). Written without protocol and transfer_caches when they are the few-shot
    defaults, as before they existed."""

    cache: str
    dataset: str
    eval_caches: tuple[str, ...]
    seeds: tuple[int, ...]
    methods: tuple[str, ...]
    grid: Mapping[str, Any]
    prompt: str
    select: str
    logit_scale: float
    logit_scale_from: str
    identity: Mapping[str, Any]
    caches: Mapping[str, Any]
    protocol: str = FEW_SHOT
    transfer_caches: tuple[str, ...] = ()

    def to_json(self) -> dict[str, Any]:
        """A JSON-able dict, one key per field in field order (protocol and transfer_caches only when set)."""
        out = {f.name: getattr(self, f.name) for f in dataclasses.fields(self)}
        out = {**out, "eval_caches": list(self.eval_caches), "seeds": list(self.seeds), "methods": list(self.methods),
               "grid": dict(self.grid), "identity": dict(self.identity), "caches": dict(self.caches),
               "transfer_caches": list(self.transfer_caches)}
        return {k: v for k, v in out.items() if k not in _DEFAULTS or v != _DEFAULTS[k]}


_DEFAULTS = {"protocol": FEW_SHOT, "transfer_caches": []}  # left out of run_config.json (folders made before)


def check_config(out: Path, config: ConfigRecord) -> None:
    """Write ``run_config.json``, or check that a resumed folder was made with the same configuration (same
    settings and caches of the same identity, wherever they are now)."""
    path = out / RUN_CONFIG
    new = config.to_json()
    if not path.exists():
        write_json(path, new)
        return
    old = json.loads(path.read_text())
    if "caches" not in old:
        raise TrainError(f"{path}: this folder was made before runs recorded their caches' identity; use "
                         "another --out")
    was, now = old["caches"], new["caches"]
    pairs = [("cache", was["cache"], now["cache"])] + [
        (f"eval cache {i + 1}", was["eval_caches"][i] if i < len(was["eval_caches"]) else {}, ident)
        for i, ident in enumerate(now["eval_caches"])]
    old_targets = was.get("transfer_caches", [])
    pairs += [(f"transfer cache {i + 1}", old_targets[i] if i < len(old_targets) else {}, ident)
              for i, ident in enumerate(now.get("transfer_caches", []))]
    for role, old_id, new_id in pairs:
        diff = identity_diff(old_id, new_id)
        if diff:
            raise TrainError(f"{path}: this folder holds results of a {role} made with {diff}; mixing them "
                             "would put two feature sets in one table: use another --out")
    for key in {**_DEFAULTS, **new}:
        if key not in PATH_KEYS and old.get(key, _DEFAULTS.get(key)) != new.get(key, _DEFAULTS.get(key)):
            raise TrainError(f"{path}: this folder holds results with a different {key} ({old.get(key)!r}); "
                             "use another --out")


def shot_path(out: Path, shots: int) -> Path:
    """``shots/<K>shot.json``: the records of one finished shot count (its presence means: skip it when rerun)."""
    return out / SHOTS_DIR / f"{shots}shot.json"


def params_path(out: Path, shots: int) -> Path:
    """``params/<K>shot.npz``: the selected models of one shot count (``save_params``)."""
    return out / PARAMS_DIR / f"{shots}shot.npz"


def write_shot(out: Path, shots: int, records: Sequence[RunRecord], learned: Mapping[str, Learned],
               correct: Mapping[str, Any]) -> None:
    """Write one finished shot count: its models (``params_path``), its selected runs' per-image correctness
    (``correct_path``), then its records (``shot_path``, written last: its presence marks the shot count done)."""
    save_params(params_path(out, shots), learned)
    write_correct(correct_path(out / SHOTS_DIR, shots), correct)
    write_json(shot_path(out, shots), records_to_json(records))


def read_shots(out: Path) -> list[RunRecord]:
    """The records of every finished shot count of a run folder, in file-name order."""
    return [r for f in sorted((out / SHOTS_DIR).glob("*shot.json")) for r in read_records(f)]


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


# --- the summary: one row per (dataset, method, shots), in results.json (versioned by its schema_version) ---

STILL_FALLING = 0.05  # a mean loss curve whose last quarter of epochs (at least 2) lowers it by more is flagged


@dataclass(frozen=True)
class SummaryRow:
    """Test accuracy of the validation-selected setting (validation-free: the fixed default) of one (dataset,
    method, shots), over seeds.

    seeds: the seeds with a selected run; failed_seeds: those whose runs all failed; failed_runs: how many runs
    failed; settings, tie_breaks: per selected seed, its setting label and what decided it (None, "score",
    "order"); select: the --select mode ("none": validation-free); notes: the runs' trainer remarks; shift: shift
    set name -> {"mean", "std"}; test_mean, test_std, val_mean: accuracies (%) (None when every seed failed;
    val_mean also when validation-free); loss_mean, loss_std [E]: the selected runs' loss curve (None: no curve, a
    method with its own trainer); loss_still_falling; loss_parts_mean: part name -> its mean curve [E]; chose: each
    on/off setting the runs searched -> the seeds whose selected setting has it on (``train_jax.choices``);
    published: the published accuracy it is compared with (``train_jax.published.for_row``)."""

    dataset: str
    method: str
    shots: int
    seeds: tuple[int, ...] = ()
    failed_seeds: tuple[int, ...] = ()
    failed_runs: int = 0
    settings: tuple[str, ...] = ()
    tie_breaks: tuple[str | None, ...] = ()
    select: str = "seed"
    notes: tuple[str, ...] = ()
    shift: Mapping[str, Mapping[str, float]] = dataclasses.field(default_factory=dict)
    test_mean: float | None = None
    test_std: float | None = None
    val_mean: float | None = None
    loss_mean: tuple[float | None, ...] | None = None
    loss_std: tuple[float | None, ...] | None = None
    loss_still_falling: bool | None = None
    loss_parts_mean: Mapping[str, tuple[float | None, ...]] | None = None
    chose: Mapping[str, tuple[int, ...]] | None = None
    published: Mapping[str, Any] | None = None

    _OPTIONAL = ("test_mean", "test_std", "val_mean", "loss_mean", "loss_std", "loss_still_falling",
                 "loss_parts_mean", "chose", "published")

    def to_json(self) -> dict[str, Any]:
        """A JSON-able dict: every field, the optional ones only when set."""
        out: dict[str, Any] = {}
        for f in dataclasses.fields(self):
            value = getattr(self, f.name)
            if f.name in self._OPTIONAL and value is None:
                continue
            if isinstance(value, tuple):
                value = list(value)
            elif f.name in ("shift", "loss_parts_mean", "chose"):
                value = {k: (list(v) if isinstance(v, tuple) else dict(v)) for k, v in value.items()}
            elif f.name == "published":
                value = dict(value)
            out[f.name] = value
        return out

    @classmethod
    def from_json(cls, data: Mapping[str, Any]) -> "SummaryRow":
        """Inverse of ``to_json``; missing fields take their defaults, unknown keys are a TrainError."""
        names = {f.name for f in dataclasses.fields(cls)}
        unknown = set(data) - names
        if unknown:
            raise TrainError(f"a summary row with unknown keys {sorted(unknown)}")
        tupled = {k: tuple(v) for k, v in data.items()
                  if k in ("seeds", "failed_seeds", "settings", "tie_breaks", "notes", "loss_mean", "loss_std")}
        parts = data.get("loss_parts_mean")
        chose = data.get("chose")
        return cls(**{**data, **tupled, "shift": {k: dict(v) for k, v in dict(data.get("shift", {})).items()},
                      "loss_parts_mean": None if parts is None else {k: tuple(v) for k, v in parts.items()},
                      "chose": None if chose is None else {k: tuple(v) for k, v in chose.items()}})


def method_rank(methods: Iterable[str]) -> list[str]:
    """The methods, each once, in the registry's order (``methods.METHODS``); names it lacks last, by name."""
    from train_jax.methods import METHODS  # here, not at the top: reading records needs no JAX

    order = list(METHODS)
    return sorted(set(methods), key=lambda m: (order.index(m) if m in order else len(order), m))


def summarize(records: Sequence[RunRecord], select: str = "seed") -> list[SummaryRow]:
    """Per (dataset, method, shots), ordered by dataset, shots and method order: test accuracy of the
    validation-selected setting, mean +- std over seeds, and the same for every shift set; ``select`` is the
    --select mode."""
    out = []
    rank = {m: i for i, m in enumerate(method_rank(r.method for r in records))}
    keys = sorted({(r.dataset, r.method, r.shots) for r in records}, key=lambda k: (k[0], k[2], rank[k[1]]))
    for dataset, method, shots in keys:
        runs = [r for r in records if (r.dataset, r.method, r.shots) == (dataset, method, shots)]
        chosen = sorted((r for r in runs if r.selected), key=lambda r: r.seed)
        seeds = sorted({r.seed for r in runs})
        row: dict[str, Any] = {
            "dataset": dataset, "method": method, "shots": shots, "seeds": tuple(r.seed for r in chosen),
            "failed_seeds": tuple(s for s in seeds if s not in {r.seed for r in chosen}),
            "failed_runs": sum(r.failed for r in runs), "settings": tuple(r.setting for r in chosen),
            "tie_breaks": tuple(r.tie_break for r in chosen), "select": select,
            "notes": tuple(sorted({r.note for r in runs if r.note})), "shift": {},
            "chose": choices.chosen_on(runs) or None,
        }
        if chosen:
            row["test_mean"], row["test_std"] = mean_std([r.test_acc for r in chosen])
            if all(r.val_acc is not None for r in chosen):  # validation-free runs have none
                row["val_mean"], _ = mean_std([r.val_acc for r in chosen])
            for target in chosen[0].shift:
                mean, std = mean_std([r.shift[target] for r in chosen])
                row["shift"][target] = {"mean": mean, "std": std}
            curve = curve_stats([r.loss_curve for r in chosen])
            if curve is not None:
                row["loss_mean"], row["loss_std"] = tuple(curve[0]), tuple(curve[1])
                row["loss_still_falling"] = still_falling(curve[0])
                parts = {name: curve_stats([r.loss_parts.get(name, ()) for r in chosen])
                         for name in chosen[0].loss_parts}
                row["loss_parts_mean"] = {name: tuple(stats[0]) for name, stats in parts.items() if stats is not None}
        out.append(SummaryRow(**row))
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


def write_results(out: Path, dataset: str, config: Mapping[str, Any], records: Sequence[RunRecord]) -> list[SummaryRow]:
    """``results.json`` (``schema_version``, dataset, config, summary rows, ``runs``: the records' JSON) and
    ``results.csv`` (one row per run: ``CSV_FIELDS``; validation-free runs with empty ``val_acc`` and ``val_score``
    and ``select`` "none"); returns the summary rows, each with its published
    accuracy where one matches (``published.for_row``, from the config's cache identity and prompt)."""
    identity, prompt = config.get("identity") or {}, config.get("prompt") or ""
    summary = [dataclasses.replace(r, published=published.for_row(r.dataset, r.method, r.shots, r.test_mean,
                                                                  identity, prompt))
               for r in summarize(records, config["select"])]
    payload = {"schema_version": SCHEMA_VERSION, "dataset": dataset, "config": dict(config),
               "summary": [row.to_json() for row in summary], "runs": [r.to_json() for r in records]}
    (out / RESULTS_JSON).write_text(json.dumps(payload, indent=1))
    with open(out / RESULTS_CSV, "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=CSV_FIELDS, extrasaction="ignore")
        writer.writeheader()
        for r in records:
            score = "" if r.val_score is None else f"{r.val_score:.6f}"
            acc = "" if r.val_acc is None else f"{r.val_acc:.2f}"
            writer.writerow({**r.to_json(), "val_acc": acc, "val_score": score, "test_acc": f"{r.test_acc:.2f}",
                             "tie_break": r.tie_break or "", "select": config["select"]})
    return summary


@dataclass(frozen=True)
class Results:
    """What ``results.json`` holds for the combine mode: its dataset (None if unnamed), config (``run_config.json``'s
    JSON) and summary rows."""

    dataset: str | None
    config: Mapping[str, Any]
    summary: list[SummaryRow]


def read_results(run_dir: str | Path) -> Results:
    """A run folder's ``results.json`` (a file without ``schema_version`` is read as current); TrainError naming
    the file when it is missing, unreadable or of a newer schema."""
    path = Path(run_dir) / RESULTS_JSON
    try:
        data = json.loads(path.read_text())
        rows = data["summary"]
    except (OSError, ValueError, KeyError, TypeError) as e:
        raise TrainError(f"{path}: cannot read results ({e}); run `python -m train_jax ... --out {run_dir}` first")
    version = data.get("schema_version", SCHEMA_VERSION)
    if not isinstance(version, int) or version > SCHEMA_VERSION:
        raise TrainError(f"{path}: results of schema version {version!r}; this code reads up to {SCHEMA_VERSION}")
    try:
        summary = [SummaryRow.from_json(r) for r in rows]
    except (TrainError, TypeError, ValueError, AttributeError) as e:
        raise TrainError(f"{path}: {e}; run `python -m train_jax ... --out {run_dir}` again") from None
    return Results(data.get("dataset"), dict(data.get("config") or {}), summary)


def read_summary(run_dir: str | Path) -> list[SummaryRow]:
    """The summary rows of a run folder's ``results.json`` (``read_results``)."""
    return read_results(run_dir).summary


def read_runs(run_dir: str | Path) -> list[RunRecord] | None:
    """The ``runs`` of a run folder's ``results.json`` (None when it has none); TrainError naming the file when it
    is missing or unreadable."""
    path = Path(run_dir) / RESULTS_JSON
    try:
        runs = json.loads(path.read_text()).get("runs")
    except (OSError, ValueError, AttributeError) as e:
        raise TrainError(f"{path}: cannot read results ({e}); run `python -m train_jax ... --out {run_dir}` first")
    if not isinstance(runs, list):
        return None
    try:
        return [RunRecord.from_json(r) for r in runs]
    except (TrainError, TypeError, ValueError) as e:
        raise TrainError(f"{path}: {e}; rerun `python -m train_jax ... --out {run_dir}`") from None


def saved_params(out: Path) -> list[tuple[int, Path]]:
    """(shot count, ``params_path``) of every ``params/<K>shot.npz`` in a run folder, by shot count."""
    found = [(int(p.name.removesuffix("shot.npz")), p) for p in (Path(out) / PARAMS_DIR).glob("*shot.npz")
             if p.name.removesuffix("shot.npz").isdigit()]
    return sorted(found)


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
    """``{(method, seed): bool [N_test]}`` from a file of ``write_correct``; None when there is no file (the
    comparisons then use seeds only). TrainError naming the file when it is unreadable, of another version, or
    its arrays differ in length."""
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


# --- gap.json / gap.md: the modality-gap diagnostics of a run folder (computed and rendered by train_jax.gap) ---

# 1: {"schema_version": 1, "dataset", "before": GAP stats, "after": [GapRow.to_json]}.
GAP_VERSION = 1


@dataclass(frozen=True)
class GapRow:
    """One method at one shot count after its learned map: ``seeds``: the seeds of its selected models;
    ``per_seed``: each seed's statistics (name -> value, ``train_jax.gap.STATS``); ``mean``, ``std``: their mean and
    population std over seeds."""

    method: str
    shots: int
    seeds: tuple[int, ...]
    per_seed: tuple[Mapping[str, float], ...]
    mean: Mapping[str, float]
    std: Mapping[str, float]

    def to_json(self) -> dict[str, Any]:
        """A JSON-able dict, one key per field in field order."""
        return {"method": self.method, "shots": self.shots, "seeds": list(self.seeds),
                "per_seed": [dict(s) for s in self.per_seed], "mean": dict(self.mean), "std": dict(self.std)}

    @classmethod
    def from_json(cls, data: Mapping[str, Any]) -> "GapRow":
        """Inverse of ``to_json``."""
        return cls(data["method"], int(data["shots"]), tuple(data["seeds"]), tuple(dict(s) for s in data["per_seed"]),
                   dict(data["mean"]), dict(data["std"]))


@dataclass(frozen=True)
class GapFile:
    """``gap.json``: the test split's statistics against the prompt prototypes (``before``, name -> value) and one
    ``GapRow`` per (shot count, method with a map) after it."""

    dataset: str
    before: Mapping[str, float]
    after: tuple[GapRow, ...]

    def to_json(self) -> dict[str, Any]:
        """``{"schema_version": GAP_VERSION, "dataset", "before", "after"}``."""
        return {"schema_version": GAP_VERSION, "dataset": self.dataset, "before": dict(self.before),
                "after": [r.to_json() for r in self.after]}

    @classmethod
    def from_json(cls, data: Mapping[str, Any]) -> "GapFile":
        """Inverse of ``to_json``; a file without ``schema_version`` is read as version 1."""
        return cls(data["dataset"], dict(data["before"]), tuple(GapRow.from_json(r) for r in data["after"]))


def write_gap(out: Path, gap: GapFile, markdown: str) -> None:
    """Write ``gap.json`` (``gap.to_json``) and ``gap.md`` (``markdown``, its rendering) into a run folder."""
    try:
        (out / GAP_JSON).write_text(json.dumps(gap.to_json(), indent=1))
        (out / GAP_MD).write_text(markdown)
    except OSError as e:
        raise TrainError(f"{e.filename or out}: cannot write it ({e.strerror}); choose a writable --out") from None


def read_gap(run_dir: str | Path) -> GapFile | None:
    """A run folder's ``gap.json`` (None when it has none); TrainError naming the file when it is unreadable or of
    a newer schema."""
    path = Path(run_dir) / GAP_JSON
    if not path.is_file():
        return None
    try:
        data = json.loads(path.read_text())
        version = data.get("schema_version", 1)
        if not isinstance(version, int) or version > GAP_VERSION:
            raise TrainError(f"schema version {version!r}; this code reads up to {GAP_VERSION}")
        return GapFile.from_json(data)
    except (OSError, ValueError, KeyError, TypeError, AttributeError, TrainError) as e:
        raise TrainError(f"{path}: unreadable gap file ({e}); delete it or rerun `python -m train_jax ... --out "
                         f"{run_dir}`") from None


# --- compare.json / compare.csv: the paired comparisons (computed by train_jax.compare, rendered by
# train_jax.compare_report) of a run folder or of the combine mode's folder ---

# 1: {"schema_version": 1, "reference", "level", "power", "comparisons": [...], "average": [...], "notes": [...]},
# each comparison as ``comparison_json``.
COMPARE_VERSION = 1
COMPARE_FIELDS = ("dataset", "shots", "method", "reference", "n_seeds", "seeds", "mean", "sd", "seeds_low",
                  "seeds_high", "seeds_excludes_0", "images_low", "images_high", "images_excludes_0", "n_test",
                  "seeds_to_settle", "settle", "note")  # compare.csv's columns


@dataclass(frozen=True)
class CompareFile:
    """``compare.json``: ``comparisons`` of each method against ``reference`` per (dataset, shots), the
    ``average`` over the benchmark datasets (combine mode; empty otherwise), ``notes``, and the confidence
    ``level`` and ``power`` they were made with (``train_jax.compare``)."""

    reference: str
    comparisons: tuple[Comparison, ...]
    average: tuple[Comparison, ...] = ()
    notes: tuple[str, ...] = ()
    level: float = COMPARE_LEVEL
    power: float = COMPARE_POWER

    def to_json(self) -> dict[str, Any]:
        """``{"schema_version": COMPARE_VERSION, "reference", "level", "power", "comparisons", "average",
        "notes"}``."""
        return {"schema_version": COMPARE_VERSION, "reference": self.reference, "level": self.level,
                "power": self.power, "comparisons": [comparison_json(c) for c in self.comparisons],
                "average": [comparison_json(c) for c in self.average], "notes": list(self.notes)}

    @classmethod
    def from_json(cls, data: Mapping[str, Any]) -> "CompareFile":
        """Inverse of ``to_json``."""
        return cls(data["reference"], tuple(comparison_from_json(c) for c in data["comparisons"]),
                   tuple(comparison_from_json(c) for c in data["average"]), tuple(data["notes"]),
                   float(data["level"]), float(data["power"]))


def _interval_json(interval: Interval | None) -> dict[str, Any] | None:
    return None if interval is None else {"low": interval.low, "high": interval.high,
                                          "excludes_zero": interval.excludes_zero}


def comparison_json(c: Comparison) -> dict[str, Any]:
    """A JSON-able dict of one comparison (``datasets`` only for an average)."""
    return {"dataset": c.dataset, "shots": c.shots, "method": c.method, "reference": c.reference,
            "seeds": list(c.seeds), "diffs": list(c.diffs), "mean": c.mean, "sd": c.sd,
            "over_seeds": _interval_json(c.over_seeds), "over_images": _interval_json(c.over_images),
            "n_test": c.n_test, "seeds_to_settle": c.seeds_to_settle, "settle": c.settle, "note": c.note,
            **({"datasets": list(c.datasets)} if c.datasets else {})}


def comparison_from_json(data: Mapping[str, Any]) -> Comparison:
    """Inverse of ``comparison_json``."""
    interval = lambda d: None if d is None else Interval(d["low"], d["high"])  # noqa: E731
    return Comparison(data["dataset"], data["shots"], data["method"], data["reference"], tuple(data["seeds"]),
                      tuple(data["diffs"]), data["mean"], data["sd"], interval(data["over_seeds"]),
                      interval(data["over_images"]), data["n_test"], data["seeds_to_settle"], data["settle"],
                      data["note"], tuple(data.get("datasets", ())))


def _compare_csv_row(c: Comparison) -> dict[str, Any]:
    num = lambda x: "" if x is None else f"{x:.4f}"  # noqa: E731
    seeds, images = c.over_seeds, c.over_images
    return {"dataset": c.dataset, "shots": c.shots, "method": c.method, "reference": c.reference,
            "n_seeds": len(c.seeds), "seeds": " ".join(map(str, c.seeds)), "mean": num(c.mean), "sd": num(c.sd),
            "seeds_low": num(seeds and seeds.low), "seeds_high": num(seeds and seeds.high),
            "seeds_excludes_0": "" if seeds is None else int(seeds.excludes_zero),
            "images_low": num(images and images.low), "images_high": num(images and images.high),
            "images_excludes_0": "" if images is None else int(images.excludes_zero),
            "n_test": "" if c.n_test is None else c.n_test,
            "seeds_to_settle": "" if c.seeds_to_settle is None else c.seeds_to_settle, "settle": c.settle,
            "note": c.note}


def write_compare(out: Path, compare: CompareFile) -> None:
    """Write ``out``/compare.json (``compare.to_json``) and ``out``/compare.csv (``COMPARE_FIELDS``, one line per
    comparison, the average's last)."""
    try:
        (out / COMPARE_JSON).write_text(json.dumps(compare.to_json(), indent=1))
        with open(out / COMPARE_CSV, "w", newline="") as f:
            writer = csv.DictWriter(f, fieldnames=COMPARE_FIELDS)
            writer.writeheader()
            writer.writerows(_compare_csv_row(c) for c in [*compare.comparisons, *compare.average])
    except OSError as e:
        raise TrainError(f"{e.filename or out}: cannot write it ({e.strerror}); choose a writable --out") from None


def read_compare(folder: str | Path) -> CompareFile:
    """A folder's ``compare.json``; TrainError naming the file when it is missing, unreadable or of another
    version."""
    path = Path(folder) / COMPARE_JSON
    try:
        data = json.loads(path.read_text())
        if data.get("schema_version") != COMPARE_VERSION:
            raise TrainError(f"schema version {data.get('schema_version')!r}, not {COMPARE_VERSION}")
        return CompareFile.from_json(data)
    except (OSError, ValueError, KeyError, TypeError, AttributeError, TrainError) as e:
        raise TrainError(f"{path}: unreadable comparisons ({e}); rerun the run or the combine into it") from None
