"""The base-to-new class split of CoCoOp (Zhou et al., CVPR 2022): numpy only.

CoCoOp's ``subsample_classes`` (KaiyangZhou/CoOp ``datasets/oxford_pets.py``, commit 1fbb1a6; every dataset of
that repository calls it) takes the sorted set of labels present in the (few-shot) train split, n of them, and
makes the first ceil(n/2) the *base* classes and the rest the *new* classes; each subset is relabelled 0.. in
label order and every split keeps only the rows of the subset asked for. Here the labels are the train split's
listed labels (every image, not one seed's draw): for a dataset whose classes all have train images, as every
registered one, that is the same set, and it does not depend on the seed.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np

SUBSETS = ("base", "new")


@dataclass(frozen=True)
class ClassSplit:
    """Class ids of the base [Cb] and new [Cn] classes, each ascending; together the labels of the train split."""

    base: np.ndarray
    new: np.ndarray

    def classes(self, subset: str) -> np.ndarray:
        """The class ids [Cs] of ``subset`` ("base" or "new"); label i of the subset is class ``classes[i]``."""
        if subset not in SUBSETS:
            raise ValueError(f"subset {subset!r}: use one of {', '.join(SUBSETS)}")
        return self.base if subset == "base" else self.new


def base_new_split(train_labels: np.ndarray) -> ClassSplit:
    """CoCoOp's split of the labels [N] of a train split: base = the first ceil(n/2) of the n distinct labels in
    ascending order, new = the rest."""
    labels = np.unique(np.asarray(train_labels, np.int64))
    m = math.ceil(len(labels) / 2)
    return ClassSplit(labels[:m], labels[m:])


def relabel(labels: np.ndarray, classes: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """The rows of ``labels`` [N] that belong to ``classes`` [Cs] (distinct class ids) and their labels in the
    subset: (keep [N] bool, subset labels [sum(keep)] int64, label i = class ``classes[i]``)."""
    labels, classes = np.asarray(labels, np.int64), np.asarray(classes, np.int64)
    order = np.argsort(classes)
    keep = np.isin(labels, classes)
    return keep, order[np.searchsorted(classes[order], labels[keep])].astype(np.int64)
