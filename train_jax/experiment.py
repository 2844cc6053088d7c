"""The experiment driver: ``train_and_evaluate(config, out)`` runs a ``RunConfig`` into a run folder.

For every shot count: sample the shots of every seed, train every method's runs in vmapped groups (``train_group``:
runs sharing one compiled program), score each group with the evaluators on validation and test, select on
validation (per seed, or per method on the mean over seeds), evaluate the selected models on shift sets, and
record (``records``). ``run_shots`` is one shot count of that. The protocols (``RunConfig.protocol``,
``train_jax.protocols``) differ only in the task: base-to-new trains and tests on a view of the cache holding its
base classes and scores the selected models on the new classes too; cross-dataset scores them on other caches'
classes (``evaluators.on_targets``).
"""

from __future__ import annotations

import dataclasses
import gc
import json
import math
import shlex
import sys
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterator, Mapping, Sequence

import jax
import numpy as np

from data import fewshot
from data.cache import (BAD, MODEL_ATTRS, OK, UNLABELLED, CacheHead, CacheReader, Listing, Split, cache_identity,
                        file_identity, open_cache, read_cache)
from data.class_split import base_new_split
from data.class_subset import class_subset
from data.registry import in_imagenet_family
from data.vectors import l2_normalize, l2_normalize_rows_inplace
from train_jax import compile_cache, evaluate, evaluators, gap, protocol_report, protocols, published, records
from train_jax.compile_cache import CompileStats
from train_jax.config import Settings, expand_grid, grid_to_json
from train_jax.errors import TrainError
from train_jax.evaluators import EvalSet, Group, Placement, TargetSet
from train_jax.layout import Buckets, shot_buckets
from train_jax.methods import METHODS, Method
from train_jax.records import ConfigRecord, Learned, RunRecord
from train_jax.run_config import RunConfig
from train_jax.runner import Pool, Trained, hparam_arrays, host_array, train_runs
from train_jax.trainers import Job

TEST_BLOCK_ROWS = 16384  # test rows read and predicted at a time


@dataclass(frozen=True)
class Task:
    """What every shots value of one experiment shares: the training cache (read row by row; for base-to-new a view
    of its base classes), the listings of its splits, its prototypes [C,D], shift sets, the protocol, the class
    sets the selected models are scored on besides (``transfer``: base-to-new's new classes, cross-dataset
    targets) and base-to-new's new class names."""

    dataset: str
    cache: CacheReader
    listings: dict[str, Listing]
    text: np.ndarray
    prompt: str
    shift: tuple[EvalSet, ...] = ()
    protocol: str = protocols.FEW_SHOT
    transfer: tuple[TargetSet, ...] = ()
    new_classes: tuple[str, ...] = ()


@dataclass(frozen=True)
class ShotResult:
    """One shot count's results: records, one RunRecord per run (in run order); learned: "method/seed<k>" -> the
    model of the run selected for that method and seed; correct: "method/seed<k>" -> bool [N_test], which test
    images that selected run classified correctly (for the paired comparisons, ``train_jax.compare``)."""

    records: list[RunRecord] = field(default_factory=list)
    learned: dict[str, Learned] = field(default_factory=dict)
    correct: dict[str, np.ndarray] = field(default_factory=dict)


@dataclass(frozen=True)
class Experiment:
    """What ``train_and_evaluate`` did: the run folder, the dataset, every record in it (all shot counts, this
    invocation's and earlier ones'), the summary rows of results.json, and the compilations of this invocation."""

    out: Path
    dataset: str
    records: list[RunRecord]
    summary: list[records.SummaryRow]
    compiled: CompileStats


def default_prompt(dataset: str) -> str:
    """``ensemble`` (CLIP's 7 templates) for the ImageNet family, as Tip-Adapter/CoOp; ``single`` (the dataset's
    own template) otherwise."""
    return "ensemble" if in_imagenet_family(dataset) else "single"


def _dataset_name(cache: CacheHead) -> str:
    return str(cache.attrs.get("dataset") or Path(cache.path).stem)


def prototypes(cache: CacheHead, prompt: str) -> np.ndarray:
    """Class prototypes [C,D] of a prompt choice: ``ensemble`` (normalised mean over the templates) or the
    dataset's own template (``single``)."""
    return l2_normalize(cache.prototypes("ensemble" if prompt == "ensemble" else 0))


def refuse_unlabelled(path: Path, labels: dict[str, np.ndarray]) -> None:
    """TrainError if a split of the cache at `path` (its labels [N] by split) holds unlabelled images: they can be
    classified, not trained or scored on."""
    for name, split_labels in labels.items():
        if np.any(split_labels == UNLABELLED):
            raise TrainError(f"{path}: split {name!r} holds unlabelled images (label {UNLABELLED}); train and "
                             "score on a labelled cache, classify these with `python -m train_jax predict`")


def _same_model(cache: CacheHead, other: CacheHead) -> None:
    """TrainError (one line) unless ``other`` was extracted with the model of the training ``cache``."""
    for key in MODEL_ATTRS:
        if other.attrs.get(key) != cache.attrs.get(key):
            raise TrainError(
                f"{other.path}: {key}={other.attrs.get(key)!r} differs from the training cache's "
                f"{cache.attrs.get(key)!r}; extract both with the same model"
            )


def _target_set(name: str, cache: CacheReader, prompt: str) -> TargetSet:
    """The encoded test rows of ``cache`` (a file or a class view) with its own prototypes of ``prompt``."""
    test = cache.listing("test") if "test" in cache.split_names() else None
    if test is None or not np.any(test.status == OK):
        raise TrainError(f"{cache.path}: the cache has no encoded 'test' rows to score {name!r} on; extract its test "
                         "split")
    rows = np.flatnonzero(test.status == OK)
    refuse_unlabelled(cache.path, {"test": test.labels[rows]})
    return TargetSet(name, l2_normalize(cache.read("test", rows)[0]), test.labels[rows], prototypes(cache, prompt))


def load_task(cache_path: str | Path, eval_paths: Sequence[str | Path] = (), prompt: str | None = None, *,
              protocol: str = protocols.FEW_SHOT, transfer_paths: Sequence[str | Path] = ()) -> Task:
    """Open the training cache (needs train and test rows; features are read later, only the rows runs use) and
    read the shift caches (their test split). ``protocol`` "base-to-new": the task is the cache's base classes
    (``data.class_split``), its ``transfer`` the new classes' test rows; "cross-dataset": ``transfer`` holds the
    test rows of the caches ``transfer_paths`` (same model; each scored with its own prototypes, of ``prompt`` or
    its dataset's default)."""
    cache = open_cache(cache_path)
    listings = {name: cache.listing(name) for name in cache.split_names()}
    for split in ("train", "test"):
        if split not in listings or not np.any(listings[split].status == OK):
            raise TrainError(f"{cache.path}: the cache has no {split!r} rows; extract its {split} split")
    refuse_unlabelled(cache.path, {name: listing.labels for name, listing in listings.items()})
    dataset = _dataset_name(cache)
    asked, prompt = prompt, prompt or default_prompt(dataset)
    transfer, new_classes = [], ()
    if protocol == protocols.BASE_TO_NEW:
        split = base_new_split(listings["train"].labels)
        if not len(split.new):
            raise TrainError(f"{cache.path}: base-to-new needs at least 2 classes with train images")
        new = class_subset(cache, split.new)
        transfer.append(_target_set(protocols.NEW, new, prompt))
        cache, new_classes = class_subset(cache, split.base), tuple(new.classnames)
        listings = {name: cache.listing(name) for name in cache.split_names()}
    for path in transfer_paths:
        other = open_cache(path)
        _same_model(cache, other)
        transfer.append(_target_set(_dataset_name(other), other, asked or default_prompt(_dataset_name(other))))
    names = [t.name for t in transfer]
    if len(set(names)) < len(names):
        raise TrainError(f"--transfer-to: two target caches hold the same dataset ({names}); give each once")
    text = prototypes(cache, prompt)
    shift = []
    for path in eval_paths:
        other = read_cache(path, splits=["test"], with_aug=False)
        _same_model(cache, other)
        refuse_unlabelled(other.path, {name: split.labels for name, split in other.splits.items()})
        name = _dataset_name(other)
        test = other.splits["test"]
        classes = evaluate.class_map(cache.classnames, other.classnames, str(other.path), dataset, name)
        shift.append(EvalSet(name, l2_normalize(test.features), test.labels, classes, test.norms))
    return Task(dataset, cache, listings, text, prompt, tuple(shift), protocol, tuple(transfer), new_classes)


@dataclass(frozen=True)
class _Run:
    method: str
    seed: int
    settings: Settings


def _val_split(task: Task) -> str:
    """The split validation rows come from: val, or train when the cache has no val rows (ImageNet)."""
    return "val" if "val" in task.listings and len(task.listings["val"].labels) else "train"


def _draw(task: Task, shots: int, seeds: Sequence[int],
          validation: bool = True) -> tuple[dict[int, np.ndarray], dict[int, np.ndarray]]:
    """The few-shot draw (``data.fewshot``) over every listed row: train rows and validation rows of each seed
    (none without ``validation``)."""
    train, names = task.listings["train"], task.cache.classnames
    picks = {s: fewshot.sample_shots(train.labels, train.paths, names, shots, s) for s in seeds}
    if not validation:
        return picks, {}
    if _val_split(task) == "val":
        val = task.listings["val"]
        return picks, {s: fewshot.sample_val(val.labels, val.paths, names, shots, s) for s in seeds}
    return picks, {s: fewshot.sample_val_from_train(train.labels, train.paths, names, shots, s) for s in seeds}


def check_encoded(task: Task, shots: Sequence[int], seeds: Sequence[int], validation: bool = True) -> None:
    """TrainError (one line with the `extract` command that adds them) if a draw needs rows the cache does not
    encode (a pooled cache asked for more seeds or shots than it holds); validation rows only with
    ``validation``."""
    for k in sorted(shots, reverse=True):
        _check_draw(task, *_draw(task, k, seeds, validation), k, seeds, max(shots))


def _check_draw(task: Task, picks: dict[int, np.ndarray], val_rows: dict[int, np.ndarray], shots: int,
                seeds: Sequence[int], max_shots: int) -> None:
    """TrainError if a drawn row (train or validation) is listed but not encoded; see ``check_encoded``."""
    for split, rows in (("train", picks), (_val_split(task), val_rows)):
        if not rows:  # validation-free: no validation rows
            continue
        status = task.listings[split].status[np.unique(np.concatenate(list(rows.values())))]
        missing = int(np.sum((status != OK) & (status != BAD)))
        if missing:
            raise TrainError(_extend_hint(task, split, missing, shots, seeds, max_shots))


def _extend_hint(task: Task, split: str, missing: int, shots: int, seeds: Sequence[int], max_shots: int) -> str:
    """The one-line error for rows a run needs that the cache does not encode, with the command adding them: the
    stored `extract` argv with the pool widened to the cache's and the run's seeds and shots, written into the
    cache where it is now (``--out``: a copied or renamed cache grows, not the file it was made as)."""
    pool = json.loads(task.cache.attrs.get("pool") or "{}")
    all_seeds = " ".join(map(str, sorted(set(pool.get("seeds", [])) | set(seeds))))
    max_shots = max(int(pool.get("shots", 0)), max_shots)
    argv = json.loads(task.cache.attrs.get("command") or "[]")
    kept, skip = [], False
    for word in argv:
        skip = (skip and not word.startswith("--")) or word in ("--pool-seeds", "--pool-shots", "--shard", "--out")
        if not skip and not word.startswith("--out=") and word != "--overwrite":  # --overwrite would re-encode all
            kept.append(word)
    kept += ["--out", str(task.cache.path)] if kept else []
    base = shlex.join(kept) if kept else f"python -m extract run <the options that made {task.cache.path}>"
    holds = f"seeds {' '.join(map(str, pool['seeds']))} at <= {pool['shots']} shots" if pool else "other rows"
    return (f"{task.cache.path}: {shots}-shot draws of seeds {' '.join(map(str, seeds))} need {missing} {split} "
            f"rows that are not encoded (the cache pools {holds}); add them with `{base} --pool-seeds {all_seeds} "
            f"--pool-shots {max_shots}` (encodes only the missing rows)")


def _sample(task: Task, shots: int, seeds: Sequence[int],
            validation: bool = True) -> tuple[dict[int, np.ndarray], str, dict[int, np.ndarray]]:
    """Train rows and validation rows (none without ``validation``) of every seed and the validation split's
    name; drawn images that were unreadable at extraction (skipped) are left out, with a warning."""
    picks, val_rows = _draw(task, shots, seeds, validation)
    _check_draw(task, picks, val_rows, shots, seeds, shots)
    val_split = _val_split(task)
    for split, rows in (("train", picks), (val_split, val_rows)):
        ok = task.listings[split].status == OK
        dropped = sum(int(np.sum(~ok[r])) for r in rows.values())
        if dropped:
            warnings.warn(f"{task.cache.path}: {dropped} drawn {split} images were unreadable at extraction "
                          f"(skipped) and are left out of the {shots}-shot sample", stacklevel=2)
            rows.update({s: r[ok[r]] for s, r in rows.items()})
    return picks, val_split, val_rows


def _check_views(task: Task) -> None:
    """TrainError if the training cache has no augmented views (use_aug=1 needs them)."""
    if not task.cache.has_views("train"):
        raise TrainError(
            f"{task.cache.path}: use_aug=1 needs augmented views in the cache; extract it with augmented views "
            "or drop use_aug from --grid"
        )


def _pool(task: Task, rows: np.ndarray, use_aug: bool, size: int = 0) -> Pool:
    """Features [P,V,D] of the given train rows [M], read from the cache: the plain view, then the cached augmented
    views if needed; P = max(M, size), rows past M zero (``size``: the programs' padded pool, so the runner needs
    no padded copy). One host array, normalised in place: a CPU device uses it without a copy
    (``runner.host_array``)."""
    if use_aug:
        _check_views(task)
    views = 1 + (task.cache.aug_views("train") if use_aug else 0)
    stacked = host_array((max(len(rows), size), views, task.text.shape[1]))
    task.cache.read("train", rows, views=use_aug, out=stacked)
    l2_normalize_rows_inplace(stacked[: len(rows)])  # as l2_normalize, in place: no copy of the views
    labels = np.zeros(len(stacked), np.int32)
    labels[: len(rows)] = task.listings["train"].labels[rows]
    return Pool(stacked, labels)


def test_rows(task: Task) -> tuple[np.ndarray, np.ndarray]:
    """Normalised features [N,D] and labels [N] of every encoded test row (the diagnostics read them whole)."""
    rows = np.flatnonzero(task.listings["test"].status == OK)
    return l2_normalize(task.cache.read("test", rows)[0]), task.listings["test"].labels[rows]


def _pool_split(task: Task, rows: np.ndarray) -> Split:
    """Train rows [M] read as a Split (features [M,D], aug_features [M,A,D] when the cache has views), for the
    methods with their own trainer (``Job.split``; its ``pool_rows`` are then 0..M-1)."""
    views = task.cache.has_views("train")
    features, aug = task.cache.read("train", rows, views=views)
    norms = task.cache.norms("train", rows, views=views)
    listing = task.listings["train"]
    return Split(features, listing.labels[rows], listing.paths[rows], aug, norms[:, 0] if views else norms,
                 norms[:, 1:] if views else None)


def _test_blocks(task: Task) -> Iterator[tuple[np.ndarray, np.ndarray]]:
    """Features [n,D] of the encoded test rows and their norms before normalisation [n], TEST_BLOCK_ROWS at a time
    (in row order)."""
    rows = np.flatnonzero(task.listings["test"].status == OK)
    for start in range(0, len(rows), TEST_BLOCK_ROWS):
        block = rows[start : start + TEST_BLOCK_ROWS]
        yield l2_normalize(task.cache.read("test", block)[0]), task.cache.norms("test", block)


@dataclass(frozen=True)
class _Run:
    method: str
    seed: int
    settings: Settings


@dataclass(frozen=True)
class GroupResult:
    """One trained group of a shot count, scored: runs [S] (indices into the shot count's run list), the trained
    group (its settings: those the models are used with), the trainer's note, and per run accuracy (%) and score on
    its own validation rows and test accuracy (%), each [S], and which test images it classified correctly
    [S, N_test] bool."""

    key: tuple
    runs: tuple[int, ...]
    group: Group
    note: str
    val_acc: np.ndarray
    val_score: np.ndarray
    test_acc: np.ndarray
    test_correct: np.ndarray


def _take(trained: Trained, idx: np.ndarray) -> Trained:
    pick = lambda tree: jax.tree.map(lambda x: np.asarray(x)[idx], tree)  # noqa: E731
    return Trained(pick(trained.params), pick(trained.consts), trained.failed[idx], trained.fail_step[idx],
                   trained.final_loss[idx], trained.loss_curve[idx],
                   None if trained.loss_parts is None else trained.loss_parts[idx])


@dataclass
class _Data:
    """The rows every run of one shots value draws on: the seeds' train rows pooled (``pool_rows`` [M] sorted,
    ``picks``: seed -> its rows), the union of their validation rows ([V,D], [V]; ``members``: seed -> [V] bool,
    its own), the labels [N] of the encoded test rows (their features are read in blocks, ``_test_blocks``), and
    the pooled rows as a Split for the methods with their own trainer (read on first use, ``_pool_split``). A
    validation-free shot count (``--select none``) has no validation rows: val_feats, val_labels, members None;
    ``val_norms`` [V]: the validation features' norms before normalisation (None likewise)."""

    pool_rows: np.ndarray
    pool: Pool
    picks: dict[int, np.ndarray]
    val_feats: np.ndarray | None
    val_labels: np.ndarray | None
    members: dict[int, np.ndarray] | None
    test_labels: np.ndarray
    val_norms: np.ndarray | None
    pool_split: Split | None = None


def run_shots(
    task: Task,
    shots: int,
    seeds: Sequence[int],
    methods: Sequence[str],
    grid: Sequence[Settings],
    label_keys: Sequence[str],
    *,
    select: str = "seed",
    given: Sequence[str] = (),
    budget: int | None = None,
    devices: Sequence[jax.Device] | None = None,
    max_shots: int | None = None,
) -> ShotResult:
    """Train and evaluate every (method, seed, setting) run for K = ``shots``.

    Args:
      grid: the user's settings list (each method restricts it, see ``Method.settings``); validation-free
        (``select="none"``): one setting, each method's run is its ``Method.fixed_setting`` over it.
      label_keys: the fields shown as a record's ``setting`` (validation-free: each method's fixed fields).
      select: one of ``evaluate.SELECT_MODES`` (see ``_select``); "none" reads no validation rows at all.
      given: validation-free only: the fields the user's grid set, kept over the methods' fixed defaults.
      max_shots: the largest K of the sweep (default ``shots``), whose shapes the programs are compiled for, so
        that every K up to it reuses them.

    Returns:
      the records of every run and the selected models.
    """
    if select not in evaluate.SELECT_MODES:
        raise TrainError(f"select={select!r}: use one of {', '.join(evaluate.SELECT_MODES)}")
    validation = select != evaluate.VALIDATION_FREE
    classes = len(task.text)

    def fixed(method: Method) -> list[Settings]:  # validation-free: its one fixed run, if admitted on these classes
        st = method.fixed_setting(grid[0], given)
        return [st] if method.admits is None or method.admits(st, classes) else []

    own = {m: METHODS[m].settings(list(grid), classes) if validation else fixed(METHODS[m]) for m in methods}
    for m in (m for m in methods if not own[m]):
        warnings.warn(f"{task.dataset}: {m} not run: none of its settings runs on {classes} classes", stacklevel=2)
    runs = [_Run(m, s, st) for m in methods for s in seeds for st in own[m]]
    buckets = shot_buckets(max(shots, max_shots or shots), len(task.text), len(seeds),
                           len(task.listings["train"].labels))
    place = Placement(budget, devices)
    use_aug = any(r.settings.use_aug for r in runs)
    if use_aug:
        _check_views(task)
    # on a CPU device, runs with views train one seed at a time on that seed's own views (``train_group``)
    data = _prepare(task, shots, seeds, use_aug and not _views_by_seed(place), validation, buckets.pool)
    results = []
    for key, idx in _groups(runs).items():
        group, note = train_group(task, shots, key, [runs[i] for i in idx], data, buckets, place)
        members = None if data.members is None else np.stack([data.members[runs[i].seed] for i in idx])
        results.append(_score(task, key, tuple(idx), members, group, note, data, place))
    where = {i: (g, j) for g in results for j, i in enumerate(g.runs)}  # run -> its group, its index there
    runs = [_Run(r.method, r.seed, where[i][0].group.settings[where[i][1]]) for i, r in enumerate(runs)]
    per_run = lambda get: np.array([get(where[i][0])[where[i][1]] for i in range(len(runs))])  # noqa: E731
    tie_break = _select(runs, per_run(lambda g: g.val_acc), per_run(lambda g: g.val_score),
                        per_run(lambda g: g.group.trained.failed), select)
    chosen = list(tie_break)  # shift sets: the training classes; transfer targets: other classes (empty for
    # heads with per-class weights)
    shift = _evaluate_selected(chosen, where, task.shift and (
        lambda g: evaluators.on_shift(g, task.shift, task.text, place)) or None)
    transfer = _evaluate_selected(chosen, where, task.transfer and (
        lambda g: evaluators.on_targets(g, task.transfer, place)) or None)
    return ShotResult(_records(task.dataset, shots, runs, label_keys, where, tie_break, shift, transfer, validation),
                      _learned(runs, tie_break, where),
                      {f"{runs[i].method}/seed{runs[i].seed}": where[i][0].test_correct[where[i][1]]
                       for i in sorted(tie_break)})


def _prepare(task: Task, shots: int, seeds: Sequence[int], use_aug: bool, validation: bool = True,
             pool_size: int = 0) -> _Data:
    """Sample every seed's shots and validation rows (none, and none read, without ``validation``); pool the
    train rows (with augmented views if ``use_aug``; padded to ``pool_size`` rows, see ``_pool``)."""
    picks, val_split, val_rows = _sample(task, shots, seeds, validation)
    pool_rows = np.unique(np.concatenate(list(picks.values())))
    test = task.listings["test"]
    data = _Data(pool_rows, _pool(task, pool_rows, use_aug, pool_size), picks, None, None, None,
                 test.labels[test.status == OK], None)
    if validation:
        val_union = np.unique(np.concatenate(list(val_rows.values())))
        data.val_feats = l2_normalize(task.cache.read(val_split, val_union)[0])
        data.val_labels = task.listings[val_split].labels[val_union]
        data.members = {s: np.isin(val_union, val_rows[s]) for s in seeds}
        data.val_norms = task.cache.norms(val_split, val_union)
    return data


def _groups(runs: Sequence[_Run]) -> dict[tuple, list[int]]:
    """(head, batch size, use_aug) -> the runs that share one compiled program, in run order."""
    groups: dict[tuple, list[int]] = {}
    for i, run in enumerate(runs):
        st = run.settings
        # zero-shot runs (0 epochs) ride along with the trained runs of their head: no program of their own
        groups.setdefault((METHODS[run.method].head(st), st.batch_size, st.use_aug), []).append(i)
    return groups


def train_group(task: Task, shots: int, key: tuple, group: Sequence[_Run], data: _Data, buckets: Buckets,
                place: Placement) -> tuple[Group, str]:
    """Train one group's runs (programs compiled for ``buckets``' shapes). Returns the trained group (with the
    settings its models are used with) and the trainer's note ("" if none)."""
    head, batch_size, use_aug = key
    rows = np.stack([np.searchsorted(data.pool_rows, data.picks[r.seed]) for r in group])
    seeds_arr = np.array([r.seed for r in group])
    settings = [r.settings for r in group]
    fit = METHODS[group[0].method].fit
    desc = f"{task.dataset} {shots}-shot {type(head).__name__}"
    if fit is None and use_aug and data.pool.features.shape[1] == 1:  # the shared pool holds no views
        return Group(head, _train_views_by_seed(task, key, group, data, buckets, place, desc), tuple(settings)), ""
    if fit is None:
        trained = train_runs(head, hparam_arrays(settings), rows, seeds_arr, data.pool, task.text,
                             batch_size=batch_size, use_aug=use_aug, buckets=buckets, budget=place.budget,
                             devices=place.devices, desc=desc)
        return Group(head, trained, tuple(settings)), ""
    # the method's own trainer; it returns the settings its models are used with
    own = None if data.members is None else np.stack([data.members[r.seed] for r in group])
    if data.pool_split is None:
        data.pool_split = _pool_split(task, data.pool_rows)
    fitted = fit(Job(head=head, settings=settings, split=data.pool_split, pool_rows=np.arange(len(data.pool_rows)),
                     rows=rows, seeds=seeds_arr, text=task.text, dataset=task.dataset, val_feats=data.val_feats,
                     val_labels=data.val_labels, members=own, budget=place.budget, devices=place.devices,
                     buckets=buckets))
    no_epochs = np.zeros((len(group), 0), np.float32)
    trained = Trained(fitted.params, fitted.consts, fitted.failed, fitted.fail_step, fitted.final_loss,
                      no_epochs if fitted.loss_curve is None else fitted.loss_curve)
    return Group(head, trained, tuple(fitted.settings)), fitted.note


def _views_by_seed(place: Placement) -> bool:
    """Whether runs with views (use_aug) train one seed at a time, each on its own seed's views: on a CPU device,
    whose memory is the host's (every seed's views together are 2 GB at ImageNet's 16 shots x 11 views, one seed's
    a third of that) and whose seeds train as separate streams anyway; an accelerator trains all seeds in one
    program from one pool in its own memory."""
    return list(place.devices or jax.devices())[0].platform == "cpu"


def _train_views_by_seed(task: Task, key: tuple, group: Sequence[_Run], data: _Data, buckets: Buckets,
                         place: Placement, desc: str) -> Trained:
    """Train a group's runs with views (use_aug) seed by seed, each seed's runs on a pool of only its own rows'
    views (read when its turn comes, freed after), padded to one seed's bucket so one program serves every seed.
    Returns the runs' Trained in ``group`` order."""
    head, batch_size, _ = key
    one_seed = Buckets(buckets.rows, min(buckets.pool, buckets.rows))  # one seed's draws: at most rows per run
    parts, done = [], []
    for seed in dict.fromkeys(r.seed for r in group):
        idx = [i for i, r in enumerate(group) if r.seed == seed]
        seed_rows = np.unique(data.picks[seed])
        pool = _pool(task, seed_rows, True, one_seed.pool)
        rows = np.tile(np.searchsorted(seed_rows, data.picks[seed]), (len(idx), 1))
        trained = train_runs(head, hparam_arrays([group[i].settings for i in idx]), rows, np.full(len(idx), seed),
                             pool, task.text, batch_size=batch_size, use_aug=True, buckets=one_seed,
                             budget=place.budget, devices=place.devices, desc=f"{desc} seed {seed}")
        del pool
        gc.collect()  # a device array is freed by the collector (jax holds it in a reference cycle): free this
        # seed's views before the next seed's are read
        parts.append([getattr(trained, f.name) for f in dataclasses.fields(Trained)])
        done += idx
    order = np.argsort(done)
    return Trained(*jax.tree.map(lambda *x: np.concatenate(x)[order], *parts))


def _score(task: Task, key: tuple, runs: tuple[int, ...], own: np.ndarray | None, group: Group, note: str,
           data: _Data, place: Placement) -> GroupResult:
    """A trained group's accuracy and score on each run's own validation rows (own [S,V] bool; None: the shot
    count is validation-free, both NaN), and its test accuracy."""
    if own is None:
        val_acc = val_score = np.full(len(runs), np.nan)
    else:
        val_acc, val_score = evaluators.on_validation(group, data.val_feats, data.val_norms, data.val_labels, own,
                                                      task.text, place)
    test_acc, test_correct = evaluators.on_test(group, _test_blocks(task), data.test_labels, task.text, place)
    return GroupResult(key, runs, group, note, val_acc, val_score, test_acc, test_correct)


def _records(dataset: str, shots: int, runs: Sequence[_Run], label_keys: Sequence[str],
             where: Mapping[int, tuple[GroupResult, int]], tie_break: Mapping[int, str | None],
             shift: Mapping[int, dict[str, float]],
             transfer: Mapping[int, dict[str, float]] | None = None, validation: bool = True) -> list[RunRecord]:
    """One RunRecord per run, in run order; ``where``: run -> (its group, its index there); ``tie_break``: the
    selected runs; ``shift``: selected run -> its shift accuracies; ``transfer``: selected run -> its accuracies
    on other classes (``evaluators.on_targets``); without ``validation`` (validation-free) the records have no
    validation accuracy and their setting label shows the method's fixed fields."""
    def finite(x: float) -> float | None:
        return float(x) if math.isfinite(x) else None

    out = []
    for i, run in enumerate(runs):
        g, j = where[i]
        trained = g.group.trained
        names = getattr(g.group.head, "part_names", ())
        parts = {} if trained.loss_parts is None else dict(zip(names, trained.loss_parts[j].T))
        method = METHODS[run.method]
        out.append(RunRecord(
            dataset=dataset, shots=shots, method=run.method, seed=run.seed,
            setting=run.settings.label(method.label_keys(label_keys) if validation else list(method.fixed)) or "-",
            settings=run.settings, val_acc=float(g.val_acc[j]) if validation else None,
            val_score=finite(g.val_score[j]),
            test_acc=float(g.test_acc[j]), failed=bool(trained.failed[j]),
            fail_step=int(trained.fail_step[j]) if trained.failed[j] else None,
            final_loss=finite(trained.final_loss[j]), loss_curve=tuple(finite(v) for v in trained.loss_curve[j]),
            loss_parts={name: tuple(finite(v) for v in c) for name, c in parts.items()},
            selected=i in tie_break, tie_break=tie_break.get(i), shift=shift.get(i, {}), note=g.note,
            transfer=(transfer or {}).get(i, {}),
        ))
    return out


def _learned(runs: Sequence[_Run], selected: Mapping[int, Any],
             where: Mapping[int, tuple[GroupResult, int]]) -> dict[str, Learned]:
    """"method/seed<k>" -> the model of the run selected for that method and seed."""
    learned = {}
    for i in sorted(selected):
        run, (g, j) = runs[i], where[i]
        one = _take(g.group.trained, np.array([j]))
        learned[f"{run.method}/seed{run.seed}"] = Learned(run.settings, jax.tree.map(lambda x: x[0], one.params),
                                                          jax.tree.map(lambda x: x[0], one.consts))
    return learned


def _select(runs: list[_Run], val_acc: np.ndarray, val_score: np.ndarray, failed: np.ndarray,
            select: str) -> dict[int, str | None]:
    """The selected runs -> what decided each (``evaluate.Choice.tie_break``). ``select="seed"``: the best of each
    (method, seed)'s runs; ``"mean"``: per method, the setting best on the mean over seeds, selected for every
    seed where it did not fail; ``"none"`` (validation-free: one run per method and seed): every run that did not
    fail. All arrays [len(runs)]; the runs of a method are seeds x its settings."""
    if select == evaluate.VALIDATION_FREE:
        return {i: None for i in range(len(runs)) if not failed[i]}
    chosen: dict[int, str | None] = {}
    for method in dict.fromkeys(r.method for r in runs):
        by_seed: dict[int, list[int]] = {}
        for i, r in enumerate(runs):
            if r.method == method:
                by_seed.setdefault(r.seed, []).append(i)
        table = np.array(list(by_seed.values())).T  # [settings, seeds] in grid order
        parts = [table] if select == "mean" else [table[:, [j]] for j in range(table.shape[1])]
        for part in parts:
            choice = evaluate.select_best(val_acc[part], val_score[part], failed[part])
            if choice.index is not None:
                chosen.update({int(i): choice.tie_break for i in part[choice.index] if not failed[i]})
    return chosen


def _selected_groups(selected: Sequence[int], where: Mapping[int, tuple[GroupResult, int]]
                     ) -> Iterator[tuple[list[int], Group]]:
    """(the selected runs of one trained group, that group cut to them), for each group holding one."""
    by_group: dict[tuple, list[int]] = {}
    for i in selected:
        by_group.setdefault(where[i][0].key, []).append(i)
    for idx in by_group.values():
        g = where[idx[0]][0]
        picked = np.array([where[i][1] for i in idx])
        yield idx, Group(g.group.head, _take(g.group.trained, picked), tuple(g.group.settings[j] for j in picked))


Evaluator = Callable[[Group], Mapping[str, Sequence[float]]]  # a group -> {set name: accuracies [S]}


def _evaluate_selected(selected: Sequence[int], where: Mapping[int, tuple[GroupResult, int]],
                       evaluate: Evaluator | None) -> dict[int, dict[str, float]]:
    """Selected run -> {set name: accuracy}, one ``evaluate(group) -> {set name: accuracies [S]}`` call per group
    of selected runs (None: no sets, every run gets {})."""
    out: dict[int, dict[str, float]] = {i: {} for i in selected}
    if evaluate is None:
        return out
    for idx, subset in _selected_groups(selected, where):
        for name, accs in evaluate(subset).items():
            for i, acc in zip(idx, accs):
                out[i][name] = float(acc)
    return out
    for idx, subset in _selected_groups(selected, where):
        for name, accs in evaluators.on_targets(subset, task.transfer, place).items():
            for i, acc in zip(idx, accs):
                out[i][name] = float(acc)
    return out


# --- the experiment: a RunConfig into a run folder ---

def model_logit_scale(attrs: Mapping[str, Any]) -> tuple[float, str]:
    """(logit scale, where from): the extracting model's own (cache attribute), else Settings' default (100)."""
    scale = float(attrs.get("logit_scale") or 0.0)  # 0: a cache that does not record it
    return (scale, "cache") if scale > 0 else (Settings().logit_scale, "default")


def fitting_shots(task: Task, shots: Sequence[int], warn: Callable[[str], None]) -> list[int]:
    """The shots values every class of the training split can give; ``warn`` is told of each of the others."""
    counts = np.bincount(task.listings["train"].labels, minlength=len(task.cache.classnames))
    small = int(counts.argmin())
    fit = [k for k in shots if k <= counts[small]]
    for k in shots:
        if k not in fit:
            warn(f"{task.dataset}: {k} shots skipped: class {task.cache.classnames[small]!r} has only "
                 f"{counts[small]} train images")
    if not fit:
        raise TrainError(f"{task.dataset}: no --shots value fits: class {task.cache.classnames[small]!r} has only "
                         f"{counts[small]} train images; add images or extract with a larger train split")
    return fit


def check_protocol(config: RunConfig) -> None:
    """TrainError (one line) for a protocol that is unknown or asked with options it does not take."""
    if config.protocol not in protocols.PROTOCOLS:
        raise TrainError(f"--protocol {config.protocol!r}: use one of {', '.join(protocols.PROTOCOLS)}")
    if (config.protocol == protocols.CROSS_DATASET) != bool(config.transfer_caches):
        raise TrainError("--transfer-to CACHE... and --protocol cross-dataset go together: give the target caches "
                         "(same model as --cache) with it")
    if config.protocol == protocols.BASE_TO_NEW and config.eval_caches:
        raise TrainError("--eval-cache scores all of a dataset's classes; base-to-new trains on half of them: run "
                         "the shift sets with the few-shot protocol")


def _protocol_lines(task: Task, shot_records: Sequence[RunRecord]) -> list[str]:
    """Progress lines of one shot count's protocol results (new classes, or the targets' average)."""
    if task.protocol == protocols.BASE_TO_NEW:
        return [f"{r.dataset} {r.shots}-shot {r.method}: new classes {r.new.mean:.2f} ± {r.new.std:.2f}, HM "
                f"{r.hm:.2f}" for r in protocols.base_new_rows(shot_records) if r.new is not None]
    if task.protocol == protocols.CROSS_DATASET:
        return [f"{r.source} {r.shots}-shot {r.method}: target average {r.average:.2f} over "
                f"{', '.join(r.targets)}" for r in protocols.transfer_rows(shot_records, [t.name for t in task.transfer])
                if r.average is not None]
    return []


def _say(text: str) -> None:
    print(text)


def _warn(text: str) -> None:
    print(f"warning: {text}", file=sys.stderr)


def train_and_evaluate(config: RunConfig, out: str | Path, *, say: Callable[[str], None] = _say,
                       warn: Callable[[str], None] = _warn) -> Experiment:
    """Train and evaluate every shots value of ``config`` not yet in the run folder ``out``; write its files.

    Args:
      config: what to run.
      out: the run folder (created; one of an earlier run of the same configuration is resumed: finished shot
        counts are skipped).
      say, warn: where progress lines and warnings go (default: stdout, and stderr with "warning: ").

    Returns:
      the run folder's records and summary, and this invocation's compilations.
    """
    compile_cache.enable(compile_cache.cache_dir(config.compile_cache, config.no_compile_cache))
    compiled_before = compile_cache.stats()
    shots, seeds = config.shot_list, config.seed_list
    validation = config.select != evaluate.VALIDATION_FREE
    several = [k for k, vs in (config.grid or {}).items() if len(vs) > 1]
    if not validation and several:
        raise TrainError(f"--select none trains each method at its fixed default, so --grid may give one value per "
                         f"setting, not several ({', '.join(several)}); drop the extra values or select on validation")
    if min(shots) < 1:
        raise TrainError(f"--shots must be >= 1, got {list(config.shots)}")
    if config.devices is not None and not 1 <= config.devices <= len(jax.devices()):
        raise TrainError(f"--devices {config.devices}: this machine has {len(jax.devices())} JAX devices")
    devices = jax.devices()[: config.devices] if config.devices else None
    check_protocol(config)
    task = load_task(config.cache, config.eval_caches, config.prompt, protocol=config.protocol,
                     transfer_paths=config.transfer_caches)
    views = task.cache.has_views("train")  # the defaults add what augmented views allow
    grid, methods = config.grid_for(views), config.methods_for(views)
    if config.fit_shots:
        shots = fitting_shots(task, shots, warn)
    check_encoded(task, shots, seeds, validation)  # before anything is written to the run folder
    scale, scale_from = model_logit_scale(task.cache.attrs)
    settings = expand_grid(grid, Settings(logit_scale=scale))
    out = Path(out)
    records.prepare_out(out)
    recorded = ConfigRecord(
        cache=str(Path(config.cache).resolve()), dataset=task.dataset,
        eval_caches=tuple(str(Path(p).resolve()) for p in config.eval_caches), seeds=tuple(seeds),
        methods=tuple(methods), grid=json.loads(grid_to_json(grid)), prompt=task.prompt, select=config.select,
        logit_scale=scale, logit_scale_from="grid" if "logit_scale" in grid else scale_from,
        identity=cache_identity(task.cache.attrs, task.cache.classnames, task.cache.templates),
        caches={"cache": file_identity(config.cache), "eval_caches": [file_identity(p) for p in config.eval_caches],
                **({"transfer_caches": [file_identity(p) for p in config.transfer_caches]}
                   if config.transfer_caches else {})},
        protocol=config.protocol, transfer_caches=tuple(str(Path(p).resolve()) for p in config.transfer_caches),
    )
    records.check_config(out, recorded)
    label_keys = [k for k, vs in grid.items() if len(vs) > 1]
    for k in shots:
        done = records.shot_path(out, k)
        damaged = done.exists() and records.params_problem(records.params_path(out, k))
        if damaged:
            warn(f"{damaged}; training {k} shots again")
        elif done.exists():
            say(f"{task.dataset} {k}-shot: already in {done}, skipped")
            continue
        result = run_shots(task, k, seeds, methods, settings, label_keys, select=config.select, given=list(grid),
                           budget=config.budget, devices=devices, max_shots=max(shots))
        records.write_shot(out, k, result.records, result.learned, result.correct)
        for r in result.records:
            if r.failed:
                warn(f"{r.method} seed {r.seed} ({r.setting}) stopped at step {r.fail_step} "
                     "by a non-finite loss or update; excluded from selection")
        for note in sorted({r.note for r in result.records if r.note}):
            warn(note)
        for row in records.summarize(result.records, config.select):
            acc = f"{row.test_mean:.2f} ± {row.test_std:.2f}" if row.test_mean is not None else "all runs failed"
            say(f"{task.dataset} {k}-shot {row.method}: {acc}")
        for line in _protocol_lines(task, result.records):
            say(line)
    from train_jax import report  # the renderers (matplotlib) load only when there is something to render

    every = records.read_shots(out)
    summary = report.write_run_dir(out, task.dataset, recorded.to_json(), every, compare_to=config.compare_to)
    if task.protocol == protocols.BASE_TO_NEW:
        protocol_report.write_base_new(out, protocols.base_new_rows(every),
                                       {"base": task.cache.classnames, "new": list(task.new_classes)})
    elif task.protocol == protocols.CROSS_DATASET:
        protocol_report.write_transfer(out, protocols.transfer_rows(every, [t.name for t in task.transfer]))
    for line in published.warnings([row.to_json() for row in summary]):
        warn(line)
    test_features, test_labels = test_rows(task)
    gap.write_run(out, task.dataset, test_features, test_labels, task.text, task.cache.classnames)
    compiled = compile_cache.stats() - compiled_before
    records.write_json(out / records.COMPILE_JSON, compiled.to_dict())
    return Experiment(out, task.dataset, every, summary, compiled)
