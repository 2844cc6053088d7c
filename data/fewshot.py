"""CoOp few-shot sampling: K shots per class for training, min(K, 4) per class for validation, by seed.

Draws depend only on (seed, class index, the set of image paths of that class): each class's rows are sorted by
path before a seeded draw, so reordering the rows of a cache does not change which images are picked.
"""

from __future__ import annotations

import numpy as np

from data.errors import DataError

VAL_SHOTS_MAX = 4


def val_shots(shots: int) -> int:
    """Validation images per class for K-shot training (CoOp: min(K, 4))."""
    return min(shots, VAL_SHOTS_MAX)


def _class_rows(labels: np.ndarray, paths: np.ndarray, num_classes: int) -> list[np.ndarray]:
    """Row ids of each class, sorted by image path. labels [N] int, paths [N] str -> C arrays of row ids."""
    order = np.lexsort((np.asarray(paths).astype(str), labels))  # by label, then path
    bounds = np.searchsorted(labels[order], np.arange(num_classes + 1))
    return [order[bounds[c] : bounds[c + 1]] for c in range(num_classes)]


def _draw(rows: np.ndarray, k: int, seed: int, class_index: int, stream: int) -> np.ndarray:
    """k distinct entries of ``rows`` from a generator seeded by (seed, class, stream)."""
    rng = np.random.default_rng([seed, class_index, stream])
    return rows[np.sort(rng.choice(len(rows), size=k, replace=False))]


def sample_shots(
    labels: np.ndarray, paths: np.ndarray, classnames: list[str], shots: int, seed: int, split: str = "train"
) -> np.ndarray:
    """K rows per class of one split. labels [N], paths [N] -> row ids [C*K], class-major.

    Raises DataError naming the first class with fewer than K images.
    """
    per_class = _class_rows(labels, paths, len(classnames))
    for c, rows in enumerate(per_class):
        if len(rows) < shots:
            raise DataError(
                f"{shots} shots requested but class {classnames[c]!r} has only {len(rows)} {split} images; "
                f"use --shots <= {min(len(r) for r in per_class)}"
            )
    return np.concatenate([_draw(rows, shots, seed, c, 0) for c, rows in enumerate(per_class)])


def sample_val(labels: np.ndarray, paths: np.ndarray, num_classes: int, shots: int, seed: int) -> np.ndarray:
    """min(K, 4) rows per class of the validation split (all of a class's rows if it has fewer, as CoOp does).

    labels [N], paths [N] -> row ids [<= C*min(K,4)].
    """
    k = val_shots(shots)
    per_class = _class_rows(labels, paths, num_classes)
    return np.concatenate([_draw(rows, min(k, len(rows)), seed, c, 1) for c, rows in enumerate(per_class)])


def sample_val_from_train(
    labels: np.ndarray, paths: np.ndarray, classnames: list[str], shots: int, seed: int, train_rows: np.ndarray
) -> np.ndarray:
    """Validation for a cache without a ``val`` split (ImageNet): min(K, 4) per class from the train rows that
    are not among this seed's shots. labels [N], paths [N], train_rows [C*K] -> row ids [C*min(K,4)].
    """
    k = val_shots(shots)
    unused = np.ones(len(labels), bool)
    unused[train_rows] = False
    per_class = _class_rows(labels, paths, len(classnames))
    picked = []
    for c, rows in enumerate(per_class):
        rows = rows[unused[rows]]
        if len(rows) < k:
            raise DataError(
                f"class {classnames[c]!r} has {len(rows)} train images left after {shots} shots, fewer than the "
                f"{k} validation images needed (the cache has no val split); use fewer --shots"
            )
        picked.append(_draw(rows, k, seed, c, 1))
    return np.concatenate(picked)
