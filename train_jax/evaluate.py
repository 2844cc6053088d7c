"""Accuracy, selection of the setting on validation (never test), mean +- std over seeds, and the class mapping
used to evaluate a trained model on shift sets whose classes are a subset of its own (ImageNet-V2/-Sketch/-A/-R
for ImageNet)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Sequence

import numpy as np

from data.errors import DataError
from data.registry import DatasetInfo, get_dataset, prompt_classname
from train_jax.errors import TrainError


def accuracy(preds: np.ndarray, labels: np.ndarray) -> np.ndarray:
    """Top-1 accuracy in percent. preds [S,N], labels [N] -> [S] (NaN when N = 0)."""
    if preds.shape[-1] == 0:
        return np.full(preds.shape[:-1], np.nan)
    return 100.0 * np.mean(preds == labels, axis=-1)


def subset_accuracy(preds: np.ndarray, labels: np.ndarray, members: np.ndarray) -> np.ndarray:
    """Accuracy of each run on its own rows. preds [S,N], labels [N], members [S,N] bool -> [S] percent."""
    hits = np.sum((preds == labels) & members, axis=-1)
    return 100.0 * hits / np.maximum(np.sum(members, axis=-1), 1)


def subset_mean(values: np.ndarray, members: np.ndarray) -> np.ndarray:
    """Mean of each run's values over its own rows, in float64. values [S,N], members [S,N] bool -> [S] (NaN if
    no rows)."""
    with np.errstate(invalid="ignore"):
        return np.sum(np.where(members, np.asarray(values, np.float64), 0.0), axis=-1) / np.sum(members, axis=-1)


# --select: one setting per (method, seed), or one per method from the mean over the seeds (experiment._select), or
# none: validation-free, each method at its fixed default (``methods.Method.fixed``), no validation rows read.
SELECT_MODES = ("seed", "mean", "none")
VALIDATION_FREE = "none"
# Mean accuracies equal up to this many percentage points tie: the same hits split differently over the seeds
# (0 + 83.33 against 16.67 + 66.67) may differ in the last bit; real differences are >= 100 / rows / seeds.
ACC_TOLERANCE = 1e-6


@dataclass(frozen=True)
class Choice:
    """The selected candidate (None: every run failed) and what decided it: None = the best validation accuracy
    alone, "score" = the validation score among candidates tied on accuracy, "order" = the grid order among
    candidates tied on both."""

    index: int | None
    tie_break: str | None = None


def select_best(val_acc: np.ndarray, val_score: np.ndarray, failed: np.ndarray) -> Choice:
    """The best candidate on validation. Arrays [R] (one seed's runs) or [R,S] (R settings x S seeds, judged on
    their means over the seeds where they did not fail; settings that failed for fewer seeds come first).
    Rule: the highest validation accuracy; ties (within ``ACC_TOLERANCE``) go to the higher validation score
    (mean log-probability of the true class; NaN counts as lowest), then to the first in grid order when the
    scores are exactly equal. Failed runs are never selected."""
    failed = np.asarray(failed, bool).reshape(len(failed), -1)
    ok = ~failed
    n_ok = ok.sum(axis=1)
    if not n_ok.any():
        return Choice(None)
    mean = lambda x: np.sum(np.where(ok, np.reshape(x, ok.shape), 0.0), axis=1) / np.maximum(n_ok, 1)  # noqa: E731
    acc, score = mean(val_acc), np.nan_to_num(mean(val_score), nan=-np.inf)
    cand = np.flatnonzero(n_ok == n_ok.max())
    cand = cand[acc[cand] >= acc[cand].max() - ACC_TOLERANCE]
    if len(cand) == 1:
        return Choice(int(cand[0]))
    best = cand[score[cand] == score[cand].max()]
    return Choice(int(best[0]), "score" if len(best) == 1 else "order")


def mean_std(values: Sequence[float]) -> tuple[float, float]:
    """Mean and population standard deviation (ddof=0, as CoOp reports) of the per-seed accuracies."""
    values = np.asarray(values, dtype=np.float64)
    return float(np.mean(values)), float(np.std(values))


def _registered(name: str) -> DatasetInfo | None:
    try:
        return get_dataset(name) if name else None
    except DataError:
        return None


def _registry_map(train_dataset: str, train_classes: Sequence[str], eval_dataset: str,
                  eval_classes: Sequence[str]) -> np.ndarray | None:
    """Training ids of the eval classes from the data registry (a shift set's labels in its parent, e.g. by wnid
    for ImageNet-A/-R), when both caches hold a registered dataset's own class list; else None."""
    source, target = _registered(train_dataset), _registered(eval_dataset)
    if source is None or target is None:
        return None
    names = lambda info: [prompt_classname(c) for c in info.classnames]  # noqa: E731  as the cache stores them
    if list(train_classes) != names(source) or list(eval_classes) != names(target):
        return None
    if target.name == source.name:
        return np.arange(len(eval_classes), dtype=np.int64)
    if target.parent is not None and get_dataset(target.parent).name == source.name:
        return np.array(target.parent_labels, dtype=np.int64)
    return None


def class_map(train_classes: Sequence[str], eval_classes: Sequence[str], eval_name: str,
              train_dataset: str = "", eval_dataset: str = "") -> np.ndarray:
    """For each class of an evaluation set, its index among the training classes -> [C_eval] int.

    Registered datasets (the caches' ``dataset`` attribute) are matched by the registry's labels: a shift set by
    its classes' labels in its parent (ImageNet-V2/-Sketch by index, -A/-R by wnid), so CLIP's repeated ImageNet
    names ("missile" 657/744, "sunglasses" 836/837) keep their own columns. Other sets (user folders) are
    matched by name, ignoring case and surrounding spaces. Raises TrainError naming the first class that is not
    among the training classes, or whose name is not unique there."""
    mapped = _registry_map(train_dataset, train_classes, eval_dataset, eval_classes)
    if mapped is not None:
        return mapped
    key = lambda name: name.strip().lower()  # noqa: E731
    ids: dict[str, list[int]] = {}
    for i, name in enumerate(train_classes):
        ids.setdefault(key(name), []).append(i)
    missing = [name for name in eval_classes if key(name) not in ids]
    if missing:
        raise TrainError(
            f"{eval_name}: class {missing[0]!r} (and {len(missing) - 1} more) is not among the training cache's "
            "classes; evaluate only sets whose classes are a subset of the training classes"
        )
    repeated = next((name for name in eval_classes if len(ids[key(name)]) > 1), None)
    if repeated is not None:
        raise TrainError(
            f"{eval_name}: class {repeated!r} names training classes {ids[key(repeated)]}, so matching by name is "
            "ambiguous; extract both caches with a registered --dataset (matched by label) or rename the class"
        )
    return np.array([ids[key(name)][0] for name in eval_classes], dtype=np.int64)
