"""One few-shot experiment: sample the shots of every seed, train every method's runs in vmapped groups, score
them on validation and test, select on validation (per seed, or per method on the mean over seeds), and evaluate
the selected models on shift sets."""

from __future__ import annotations

import json
import math
import shlex
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterator, Mapping, Sequence

import jax
import numpy as np

from data import fewshot
from data.cache import (BAD, MODEL_ATTRS, OK, UNLABELLED, CacheHead, CacheReader, Listing, Split, l2_normalize,
                        open_cache, read_cache)
from data.registry import in_imagenet_family
from train_jax import evaluate
from train_jax.config import Settings
from train_jax.errors import TrainError
from train_jax.methods import METHODS
from train_jax.records import Learned, RunRecord
from train_jax.runner import (Buckets, Pool, Trained, hparam_arrays, predict_runs, score_runs, shot_buckets,
                              train_runs)
from train_jax.trainers import Job

TEST_BLOCK_ROWS = 16384  # test rows read and predicted at a time


@dataclass(frozen=True)
class EvalSet:
    """A shift test set: features [N,D], labels [N] (its own class ids), classes [Ce] (their training ids)."""

    name: str
    features: np.ndarray
    labels: np.ndarray
    classes: np.ndarray


@dataclass(frozen=True)
class Task:
    """What every shots value of one experiment shares: the training cache (read row by row), the listings of its
    splits, its prototypes [C,D], shift sets."""

    dataset: str
    cache: CacheReader
    listings: dict[str, Listing]
    text: np.ndarray
    prompt: str
    shift: tuple[EvalSet, ...] = ()


@dataclass
class ShotResult:
    """records: one RunRecord per run; learned: "method/seed<k>" -> the model of the run selected for that method
    and seed; correct: "method/seed<k>" -> bool [N_test], which test images that selected run classified
    correctly (for the paired comparisons, ``train_jax.compare``)."""

    records: list[RunRecord] = field(default_factory=list)
    learned: dict[str, Learned] = field(default_factory=dict)
    correct: dict[str, np.ndarray] = field(default_factory=dict)


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


def load_task(cache_path: str | Path, eval_paths: Sequence[str | Path] = (), prompt: str | None = None) -> Task:
    """Open the training cache (needs train and test rows; features are read later, only the rows runs use) and
    read the shift caches (their test split)."""
    cache = open_cache(cache_path)
    listings = {name: cache.listing(name) for name in cache.split_names()}
    for split in ("train", "test"):
        if split not in listings or not np.any(listings[split].status == OK):
            raise TrainError(f"{cache.path}: the cache has no {split!r} rows; extract its {split} split")
    refuse_unlabelled(cache.path, {name: listing.labels for name, listing in listings.items()})
    dataset = _dataset_name(cache)
    prompt = prompt or default_prompt(dataset)
    text = prototypes(cache, prompt)
    shift = []
    for path in eval_paths:
        other = read_cache(path, splits=["test"], with_aug=False)
        for key in MODEL_ATTRS:
            if other.attrs.get(key) != cache.attrs.get(key):
                raise TrainError(
                    f"{other.path}: {key}={other.attrs.get(key)!r} differs from the training cache's "
                    f"{cache.attrs.get(key)!r}; extract both with the same model"
                )
        refuse_unlabelled(other.path, {name: split.labels for name, split in other.splits.items()})
        name = _dataset_name(other)
        test = other.splits["test"]
        classes = evaluate.class_map(cache.classnames, other.classnames, str(other.path), dataset, name)
        shift.append(EvalSet(name, l2_normalize(test.features), test.labels, classes))
    return Task(dataset, cache, listings, text, prompt, tuple(shift))


@dataclass(frozen=True)
class _Run:
    method: str
    seed: int
    settings: Settings


def _val_split(task: Task) -> str:
    """The split validation rows come from: val, or train when the cache has no val rows (ImageNet)."""
    return "val" if "val" in task.listings and len(task.listings["val"].labels) else "train"


def _draw(task: Task, shots: int, seeds: Sequence[int]) -> tuple[dict[int, np.ndarray], dict[int, np.ndarray]]:
    """The few-shot draw (``data.fewshot``) over every listed row: train rows and validation rows of each seed."""
    train, names = task.listings["train"], task.cache.classnames
    picks = {s: fewshot.sample_shots(train.labels, train.paths, names, shots, s) for s in seeds}
    if _val_split(task) == "val":
        val = task.listings["val"]
        return picks, {s: fewshot.sample_val(val.labels, val.paths, names, shots, s) for s in seeds}
    return picks, {s: fewshot.sample_val_from_train(train.labels, train.paths, names, shots, s) for s in seeds}


def check_encoded(task: Task, shots: Sequence[int], seeds: Sequence[int]) -> None:
    """TrainError (one line with the `extract` command that adds them) if a draw needs rows the cache does not
    encode (a pooled cache asked for more seeds or shots than it holds)."""
    for k in sorted(shots, reverse=True):
        _check_draw(task, *_draw(task, k, seeds), k, seeds, max(shots))


def _check_draw(task: Task, picks: dict[int, np.ndarray], val_rows: dict[int, np.ndarray], shots: int,
                seeds: Sequence[int], max_shots: int) -> None:
    """TrainError if a drawn row (train or validation) is listed but not encoded; see ``check_encoded``."""
    for split, rows in (("train", picks), (_val_split(task), val_rows)):
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


def _sample(task: Task, shots: int, seeds: Sequence[int]) -> tuple[dict[int, np.ndarray], str, dict[int, np.ndarray]]:
    """Train rows and validation rows of every seed and the validation split's name; drawn images that were
    unreadable at extraction (skipped) are left out, with a warning."""
    picks, val_rows = _draw(task, shots, seeds)
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


def _pool(task: Task, rows: np.ndarray, use_aug: bool) -> Pool:
    """Features [M,V,D] of the given train rows, read from the cache: the plain view, then the cached augmented
    views if needed."""
    if use_aug and not task.cache.has_views("train"):
        raise TrainError(
            f"{task.cache.path}: use_aug=1 needs augmented views in the cache; extract it with augmented views "
            "or drop use_aug from --grid"
        )
    stacked = task.cache.read("train", rows, views=use_aug)[0].base  # [M, V, D], one array: no copies
    stacked /= np.maximum(np.linalg.norm(stacked, axis=-1, keepdims=True), 1e-12)  # as l2_normalize, in place
    return Pool(stacked, task.listings["train"].labels[rows].astype(np.int32))


def test_rows(task: Task) -> tuple[np.ndarray, np.ndarray]:
    """Normalised features [N,D] and labels [N] of every encoded test row (the diagnostics read them whole)."""
    rows = np.flatnonzero(task.listings["test"].status == OK)
    return l2_normalize(task.cache.read("test", rows)[0]), task.listings["test"].labels[rows]


def _pool_split(task: Task, rows: np.ndarray) -> Split:
    """Train rows [M] read as a Split (features [M,D], aug_features [M,A,D] when the cache has views), for the
    methods with their own trainer (``Job.split``; its ``pool_rows`` are then 0..M-1)."""
    features, aug = task.cache.read("train", rows, views=task.cache.has_views("train"))
    listing = task.listings["train"]
    return Split(features, listing.labels[rows], listing.paths[rows], aug)


def _test_blocks(task: Task) -> Iterator[np.ndarray]:
    """Features [n,D] of the encoded test rows, TEST_BLOCK_ROWS at a time (in row order)."""
    rows = np.flatnonzero(task.listings["test"].status == OK)
    for start in range(0, len(rows), TEST_BLOCK_ROWS):
        yield l2_normalize(task.cache.read("test", rows[start : start + TEST_BLOCK_ROWS])[0])


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
    the pooled rows as a Split for the methods with their own trainer (read on first use, ``_pool_split``)."""

    pool_rows: np.ndarray
    pool: Pool
    picks: dict[int, np.ndarray]
    val_feats: np.ndarray
    val_labels: np.ndarray
    members: dict[int, np.ndarray]
    test_labels: np.ndarray
    pool_split: Split | None = None


@dataclass
class _Outcome:
    """Per run [R]: validation/test scores and failure; ``curves``: run -> its loss per epoch; ``parts``: run -> loss part name -> its mean per epoch; ``trained_of``: run -> (its group's key, the group's
    Trained, its index there); ``notes``: run -> its trainer's remark; ``correct``: run -> bool [N_test] per test
    image."""

    val_acc: np.ndarray
    val_score: np.ndarray
    test_acc: np.ndarray
    failed: np.ndarray
    fail_step: np.ndarray
    loss: np.ndarray
    curves: dict[int, np.ndarray] = field(default_factory=dict)
    parts: dict[int, dict[str, np.ndarray]] = field(default_factory=dict)
    trained_of: dict[int, tuple[tuple, Trained, int]] = field(default_factory=dict)
    notes: dict[int, str] = field(default_factory=dict)
    correct: dict[int, np.ndarray] = field(default_factory=dict)

    @classmethod
    def empty(cls, n: int) -> "_Outcome":
        return cls(np.zeros(n), np.zeros(n), np.zeros(n), np.zeros(n, bool), np.zeros(n, int), np.zeros(n))


def run_shots(
    task: Task,
    shots: int,
    seeds: Sequence[int],
    methods: Sequence[str],
    grid: Sequence[Settings],
    label_keys: Sequence[str],
    *,
    select: str = "seed",
    budget: int | None = None,
    devices: Sequence[jax.Device] | None = None,
    max_shots: int | None = None,
) -> ShotResult:
    """Train and evaluate every (method, seed, setting) run for K = ``shots``; ``grid`` is the user's settings
    list (each method restricts it, see ``Method.settings``); ``label_keys`` name the fields shown as ``setting``;
    ``max_shots`` (default ``shots``): the largest K of the sweep, whose shapes the programs are compiled for, so
    that every K up to it reuses them; ``select``: one of ``evaluate.SELECT_MODES`` (see ``_select``).
    Steps: sample -> train -> score (per group of runs sharing one program) -> select -> shift-evaluate -> records."""
    if select not in evaluate.SELECT_MODES:
        raise TrainError(f"select={select!r}: use one of {', '.join(evaluate.SELECT_MODES)}")
    runs = [_Run(m, s, st) for m in methods for s in seeds for st in METHODS[m].settings(list(grid))]
    data = _prepare(task, shots, seeds, any(r.settings.use_aug for r in runs))
    buckets = shot_buckets(max(shots, max_shots or shots), len(task.text), len(seeds),
                           len(task.listings["train"].labels))
    out = _Outcome.empty(len(runs))
    for key, idx in _groups(runs).items():
        trained, settings, note = _train_group(task, shots, key, [runs[i] for i in idx], data, buckets, budget,
                                               devices)
        for i, st in zip(idx, settings):
            runs[i] = _Run(runs[i].method, runs[i].seed, st)
            if note:
                out.notes[i] = note
        _score_group(task, key, idx, [runs[i].seed for i in idx], trained, hparam_arrays(settings), data, out,
                     budget, devices)
    tie_break = _select(runs, out.val_acc, out.val_score, out.failed, select)
    selected: dict[int, dict[str, float]] = {i: {} for i in tie_break}
    _evaluate_shift(task, runs, selected, out.trained_of, budget, devices)
    return ShotResult(_records(task.dataset, shots, runs, label_keys, out, tie_break, selected),
                      _learned(runs, selected, out.trained_of),
                      {f"{runs[i].method}/seed{runs[i].seed}": out.correct[i] for i in sorted(selected)})


def _prepare(task: Task, shots: int, seeds: Sequence[int], use_aug: bool) -> _Data:
    """Sample every seed's shots and validation rows; pool the train rows (with augmented views if ``use_aug``)."""
    picks, val_split, val_rows = _sample(task, shots, seeds)
    pool_rows = np.unique(np.concatenate(list(picks.values())))
    val_union = np.unique(np.concatenate(list(val_rows.values())))
    val_feats = l2_normalize(task.cache.read(val_split, val_union)[0])
    test = task.listings["test"]
    return _Data(pool_rows, _pool(task, pool_rows, use_aug), picks, val_feats,
                 task.listings[val_split].labels[val_union], {s: np.isin(val_union, val_rows[s]) for s in seeds},
                 test.labels[test.status == OK])


def _groups(runs: Sequence[_Run]) -> dict[tuple, list[int]]:
    """(head, batch size, use_aug) -> the runs that share one compiled program, in run order."""
    groups: dict[tuple, list[int]] = {}
    for i, run in enumerate(runs):
        st = run.settings
        # zero-shot runs (0 epochs) ride along with the trained runs of their head: no program of their own
        groups.setdefault((METHODS[run.method].head(st), st.batch_size, st.use_aug), []).append(i)
    return groups


def _train_group(task: Task, shots: int, key: tuple, group: Sequence[_Run], data: _Data, buckets: Buckets,
                 budget: int | None, devices) -> tuple[Trained, list[Settings], str]:
    """Train one group's runs (programs compiled for ``buckets``' shapes): (their Trained, the settings their
    models are used with, the trainer's note)."""
    head, batch_size, use_aug = key
    rows = np.stack([np.searchsorted(data.pool_rows, data.picks[r.seed]) for r in group])
    seeds_arr = np.array([r.seed for r in group])
    settings = [r.settings for r in group]
    fit = METHODS[group[0].method].fit
    if fit is None:
        trained = train_runs(head, hparam_arrays(settings), rows, seeds_arr, data.pool, task.text,
                             batch_size=batch_size, use_aug=use_aug, buckets=buckets, budget=budget, devices=devices,
                             desc=f"{task.dataset} {shots}-shot {type(head).__name__}")
        return trained, settings, ""
    # the method's own trainer; it returns the settings its models are used with
    own = np.stack([data.members[r.seed] for r in group])
    if data.pool_split is None:
        data.pool_split = _pool_split(task, data.pool_rows)
    fitted = fit(Job(head, settings, data.pool_split, np.arange(len(data.pool_rows)), rows, seeds_arr, task.text,
                     task.dataset, data.val_feats, data.val_labels, own, budget, devices, buckets))
    no_epochs = np.zeros((len(group), 0), np.float32)
    trained = Trained(fitted.params, fitted.consts, fitted.failed, fitted.fail_step, fitted.final_loss,
                      no_epochs if fitted.loss_curve is None else fitted.loss_curve)
    return trained, list(fitted.settings), fitted.note


def _score_group(task: Task, key: tuple, idx: list[int], seeds: Sequence[int], trained: Trained, hp: Any,
                 data: _Data, out: _Outcome, budget: int | None, devices) -> None:
    """Fill ``out`` at ``idx`` (one group's runs, of ``seeds``): accuracy and score on each run's own validation
    rows, test accuracy, failure, final loss, loss curve, and where each run's model is."""
    head = key[0]
    own = np.stack([data.members[s] for s in seeds])
    val_pred, val_logp = score_runs(head, trained, hp, data.val_feats, data.val_labels, task.text, budget=budget,
                                    devices=devices, desc="val")
    out.val_acc[idx] = evaluate.subset_accuracy(val_pred, data.val_labels, own)
    out.val_score[idx] = evaluate.subset_mean(val_logp, own)
    test_pred = np.concatenate([predict_runs(head, trained, hp, feats, task.text, budget=budget, devices=devices,
                                             desc="test") for feats in _test_blocks(task)], axis=-1)
    out.test_acc[idx] = evaluate.accuracy(test_pred, data.test_labels)
    out.correct.update(zip(idx, test_pred == data.test_labels))  # per-image, for the paired comparisons
    out.failed[idx], out.fail_step[idx], out.loss[idx] = trained.failed, trained.fail_step, trained.final_loss
    out.curves.update(zip(idx, trained.loss_curve))
    if trained.loss_parts is not None:
        names = getattr(head, "part_names", ())
        out.parts.update((i, dict(zip(names, parts.T))) for i, parts in zip(idx, trained.loss_parts))
    for j, i in enumerate(idx):
        out.trained_of[i] = (key, trained, j)


def _records(dataset: str, shots: int, runs: Sequence[_Run], label_keys: Sequence[str], out: _Outcome,
             tie_break: dict[int, str | None], selected: dict[int, dict[str, float]]) -> list[RunRecord]:
    """One RunRecord per run, in run order; ``selected``: selected run -> its shift accuracies."""
    def finite(x: float) -> float | None:
        return float(x) if math.isfinite(x) else None

    return [RunRecord(
        dataset=dataset, shots=shots, method=run.method, seed=run.seed,
        setting=run.settings.label([k for k in label_keys if k in METHODS[run.method].used]) or "-",
        settings=run.settings, val_acc=float(out.val_acc[i]), val_score=finite(out.val_score[i]),
        test_acc=float(out.test_acc[i]), failed=bool(out.failed[i]),
        fail_step=int(out.fail_step[i]) if out.failed[i] else None, final_loss=finite(out.loss[i]),
        loss_curve=tuple(finite(v) for v in out.curves[i]),
        loss_parts={name: tuple(finite(v) for v in c) for name, c in out.parts.get(i, {}).items()},
        selected=i in selected, tie_break=tie_break.get(i), shift=selected.get(i, {}), note=out.notes.get(i, ""),
    ) for i, run in enumerate(runs)]


def _learned(runs: Sequence[_Run], selected: Mapping[int, Any],
             trained_of: dict[int, tuple[tuple, Trained, int]]) -> dict[str, Learned]:
    """"method/seed<k>" -> the model of the run selected for that method and seed."""
    learned = {}
    for i in sorted(selected):
        run, (_, trained, j) = runs[i], trained_of[i]
        one = _take(trained, np.array([j]))
        learned[f"{run.method}/seed{run.seed}"] = Learned(run.settings, jax.tree.map(lambda x: x[0], one.params),
                                                          jax.tree.map(lambda x: x[0], one.consts))
    return learned


def _select(runs: list[_Run], val_acc: np.ndarray, val_score: np.ndarray, failed: np.ndarray,
            select: str) -> dict[int, str | None]:
    """The selected runs -> what decided each (``evaluate.Choice.tie_break``). ``select="seed"``: the best of each
    (method, seed)'s runs; ``"mean"``: per method, the setting best on the mean over seeds, selected for every
    seed where it did not fail. All arrays [len(runs)]; the runs of a method are seeds x its settings."""
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


def _evaluate_shift(task: Task, runs: list[_Run], selected: dict[int, dict[str, float]],
                    trained_of: dict[int, tuple], budget: int | None, devices) -> None:
    """Fill ``selected[run] = {shift set name: accuracy}`` for every selected run, one predict call per group."""
    if not task.shift:
        return
    by_group: dict[tuple, list[int]] = {}
    for i in selected:
        by_group.setdefault(trained_of[i][0], []).append(i)
    for key, idx in by_group.items():
        trained = _take(trained_of[idx[0]][1], np.array([trained_of[i][2] for i in idx]))
        hp = hparam_arrays([runs[i].settings for i in idx])
        for ev in task.shift:
            preds = predict_runs(key[0], trained, hp, ev.features, task.text, ev.classes, budget=budget,
                                 devices=devices, desc=ev.name)
            for i, acc in zip(idx, evaluate.accuracy(preds, ev.labels)):
                selected[i][ev.name] = float(acc)
