"""Accuracy, per-seed selection of the setting on validation (never test), mean +- std over seeds, and the class
mapping used to evaluate a trained model on shift sets whose classes are a subset of its own (ImageNet-V2/-Sketch/
-A/-R for ImageNet)."""

from __future__ import annotations

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


def select_best(val_acc: np.ndarray, failed: np.ndarray) -> int | None:
    """Index of the best validation accuracy among runs that did not fail (first one on ties); None if all
    failed. val_acc [R], failed [R] bool."""
    ok = np.flatnonzero(~failed)
    return None if len(ok) == 0 else int(ok[np.argmax(val_acc[ok])])


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
