"""Accuracy, per-seed selection of the setting on validation (never test), mean +- std over seeds, and the class
mapping used to evaluate an ImageNet-trained model on shift sets whose classes are a subset (ImageNet-A/-R)."""

from __future__ import annotations

from typing import Sequence

import numpy as np

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


def select_best(val_acc: np.ndarray, failed: np.ndarray) -> int | None:
    """Index of the best validation accuracy among runs that did not fail (first one on ties); None if all
    failed. val_acc [R], failed [R] bool."""
    ok = np.flatnonzero(~failed)
    return None if len(ok) == 0 else int(ok[np.argmax(val_acc[ok])])


def mean_std(values: Sequence[float]) -> tuple[float, float]:
    """Mean and population standard deviation (ddof=0, as CoOp reports) of the per-seed accuracies."""
    values = np.asarray(values, dtype=np.float64)
    return float(np.mean(values)), float(np.std(values))


def class_map(train_classes: Sequence[str], eval_classes: Sequence[str], eval_name: str) -> np.ndarray:
    """For each class of an evaluation set, its index among the training classes (matched by name, ignoring
    case and surrounding spaces). -> [C_eval] int. Raises TrainError naming the first unknown class."""
    index = {name.strip().lower(): i for i, name in enumerate(train_classes)}
    missing = [name for name in eval_classes if name.strip().lower() not in index]
    if missing:
        raise TrainError(
            f"{eval_name}: class {missing[0]!r} (and {len(missing) - 1} more) is not among the training cache's "
            "classes; evaluate only sets whose classes are a subset of the training classes"
        )
    return np.array([index[name.strip().lower()] for name in eval_classes], dtype=np.int64)
