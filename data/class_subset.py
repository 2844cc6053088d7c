"""A feature cache seen through a subset of its classes (numpy + h5py): the base or new classes of the
base-to-new protocol (``data.class_split``) read as if the file held only them.

``class_subset(reader, classes)`` returns a ``CacheReader`` whose class names, text features, listings and rows
are those of the given classes, relabelled 0.. in the given order; its row numbers index the subset's listing and
are mapped to the file's rows when features are read. Everything that reads a cache (the few-shot draw, training,
evaluation) then runs on the subset unchanged.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Sequence

import numpy as np

from data.cache import CacheError, CacheReader, Listing
from data.class_split import relabel


@dataclass(frozen=True)
class ClassSubset(CacheReader):
    """A ``CacheReader`` of the classes ``classes`` [Cs] (the file's class ids; subset label i is class
    ``classes[i]``) of the cache ``source``; ``file_rows``: split -> the file's rows [N_s] of the subset's
    listing."""

    source: CacheReader | None = None
    classes: np.ndarray = field(default_factory=lambda: np.zeros(0, np.int64))
    file_rows: dict[str, np.ndarray] = field(default_factory=dict, compare=False, repr=False)

    def listing(self, split: str) -> Listing:
        """Labels (subset labels), paths and status of the rows of ``split`` whose class is in the subset."""
        full = self.source.listing(split)
        keep, labels = relabel(full.labels, self.classes)
        self.file_rows[split] = np.flatnonzero(keep)
        return Listing(labels, full.paths[keep], full.status[keep])

    def read(self, split: str, rows: np.ndarray, *, views: bool = False,
             out: np.ndarray | None = None) -> tuple[np.ndarray, np.ndarray | None]:
        """``CacheReader.read`` of the subset listing's rows [n] (mapped to the file's rows; ``out`` as there)."""
        if split not in self.file_rows:
            self.listing(split)
        return self.source.read(split, self.file_rows[split][np.asarray(rows, np.int64)], views=views, out=out)


def class_subset(reader: CacheReader, classes: Sequence[int] | np.ndarray) -> ClassSubset:
    """The cache of ``reader`` restricted to ``classes`` (distinct class ids of the file, in subset label order);
    CacheError if one is not a class of the file."""
    classes = np.asarray(classes, np.int64)
    if len(np.unique(classes)) != len(classes) or np.any((classes < 0) | (classes >= len(reader.classnames))):
        raise CacheError(f"{reader.path}: class ids {classes.tolist()} are not distinct classes of the file's "
                         f"{len(reader.classnames)}")
    return ClassSubset(reader.path, dict(reader.attrs), [reader.classnames[c] for c in classes],
                       list(reader.templates), reader.text_features[classes], source=reader, classes=classes)
