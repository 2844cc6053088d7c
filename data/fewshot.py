"""CoOp few-shot sampling with nested draws: K shots per class for training, min(K, 4) per class for validation.

For a seed, each class's rows are sorted by image path and put in one seeded order (a permutation drawn from
(seed, class index)); the K-shot sample is the first K rows of that order, so the 1-shot sample lies inside the
2-shot one, and so on. Validation rows come from the same rule on the val split (its own order, first min(K, 4));
without a val split (ImageNet) they are the *last* min(K, 4) rows of the train order, so they never overlap the
shots and do not depend on which other K a run asks for. A seed's draws for every K <= Kmax therefore lie in
``pool_rows``: the first Kmax (+ the last 4) rows of each class's order. A class with fewer images than asked
contributes all it has, with a warning naming it (as Dassl does).
"""

from __future__ import annotations

import warnings
from collections.abc import Iterable, Sequence

import numpy as np

VAL_SHOTS_MAX = 4
_SHOTS, _VAL = 0, 1  # generator streams: the train order, the val split's order
_NAMED = 5  # classes named in a warning before "and N more"


class FewClassWarning(UserWarning):
    """A class has fewer images than the draw asks for; it contributes all it has."""


def val_shots(shots: int) -> int:
    """Validation images per class for K-shot training (CoOp: min(K, 4))."""
    return min(shots, VAL_SHOTS_MAX)


def _sort_keys(paths: np.ndarray) -> np.ndarray:
    """Paths [N] (str or utf-8 bytes) as bytes [N]; utf-8 byte order is code-point order, so sorts match str."""
    paths = np.asarray(paths)
    if paths.dtype.kind == "S":
        return paths
    return np.array([p if isinstance(p, bytes) else str(p).encode("utf-8") for p in paths], dtype=bytes)


class _Order:
    """A class's rows sorted by path, rows [n], and its seeded order: positions [n] (a permutation of 0..n-1)."""

    def __init__(self, rows: np.ndarray, seed: int, class_index: int, stream: int):
        self.rows = rows
        self.positions = np.random.default_rng([seed, class_index, stream]).permutation(len(rows))

    def __len__(self) -> int:
        return len(self.rows)

    def take(self, start: int, stop: int | None = None) -> np.ndarray:
        """Rows at places [start, stop) of the seeded order, in path order (so the row order of a cache is moot)."""
        return self.rows[np.sort(self.positions[start:stop])]


def class_orders(labels: np.ndarray, paths: np.ndarray, num_classes: int, seed: int, stream: int = _SHOTS
                 ) -> list[_Order]:
    """Each class's seeded order of its path-sorted rows. labels [N] int, paths [N] -> C orders."""
    labels = np.asarray(labels)
    by_path = np.lexsort((_sort_keys(paths), labels))  # by label, then path
    bounds = np.searchsorted(labels[by_path], np.arange(num_classes + 1))
    return [_Order(by_path[bounds[c] : bounds[c + 1]], seed, c, stream) for c in range(num_classes)]


def _warn_short(short: list[tuple[str, int]], wanted: int, what: str) -> None:
    """One warning naming the classes [(name, images)] that have fewer than `wanted` images for `what`."""
    if not short:
        return
    named = ", ".join(f"{name!r} ({n})" for name, n in short[:_NAMED])
    more = f" and {len(short) - _NAMED} more" if len(short) > _NAMED else ""
    warnings.warn(f"{len(short)} classes have fewer than {wanted} {what} images and contribute all they have: "
                  f"{named}{more}", FewClassWarning, stacklevel=4)


def _concat(parts: list[np.ndarray]) -> np.ndarray:
    return np.concatenate(parts) if parts else np.zeros(0, np.int64)


def _first(orders: list[_Order], k: int, classnames: Sequence[str], what: str) -> np.ndarray:
    """The first min(k, n) rows of each class's order; class-major [<= C*k]."""
    _warn_short([(classnames[c], len(o)) for c, o in enumerate(orders) if len(o) < k], k, what)
    return _concat([o.take(0, k) for o in orders])


def sample_shots(labels: np.ndarray, paths: np.ndarray, classnames: Sequence[str], shots: int, seed: int
                 ) -> np.ndarray:
    """K train rows per class (all of a smaller class's rows). labels [N], paths [N] -> row ids [<= C*K]."""
    return _first(class_orders(labels, paths, len(classnames), seed), shots, classnames, "train")


def sample_val(labels: np.ndarray, paths: np.ndarray, classnames: Sequence[str], shots: int, seed: int
               ) -> np.ndarray:
    """min(K, 4) rows per class of the val split. labels [N], paths [N] -> row ids [<= C*min(K,4)]."""
    orders = class_orders(labels, paths, len(classnames), seed, _VAL)
    return _first(orders, val_shots(shots), classnames, "val")


def sample_val_from_train(labels: np.ndarray, paths: np.ndarray, classnames: Sequence[str], shots: int, seed: int
                          ) -> np.ndarray:
    """Validation without a val split: the last min(K, 4) rows of each class's train order that are not among
    its first K (the shots). labels [N], paths [N] -> row ids [<= C*min(K,4)]."""
    k = val_shots(shots)
    orders = class_orders(labels, paths, len(classnames), seed)
    short = [(classnames[c], max(len(o) - shots, 0)) for c, o in enumerate(orders) if len(o) - shots < k]
    _warn_short(short, k, f"train (after {shots} shots, for validation)")
    return _concat([o.take(max(shots, len(o) - k)) for o in orders])


def pool_rows(labels: np.ndarray, paths: np.ndarray, classnames: Sequence[str], seeds: Iterable[int],
              max_shots: int, val_from_train: bool) -> np.ndarray:
    """Sorted train row ids [M] that the seeds' draws at any K <= max_shots can use (the pooled extraction); a
    class with fewer than max_shots images gives all of them (with a warning).

    val_from_train: the cache has no val split, so validation comes from train (the last 4 rows of each order).
    """
    counts = np.bincount(np.asarray(labels, np.int64), minlength=len(classnames))
    _warn_short([(classnames[c], int(n)) for c, n in enumerate(counts) if n < max_shots], max_shots, "train")
    keep = np.zeros(len(labels), bool)
    for seed in seeds:
        for order in class_orders(labels, paths, len(classnames), seed):
            keep[order.take(0, max_shots)] = True
            if val_from_train:
                keep[order.take(max(len(order) - VAL_SHOTS_MAX, 0))] = True
    return np.flatnonzero(keep)
