"""The interface of a method that trains its runs with its own trainer instead of the shared AdamW runner
(``methods.Method.fit``): the linear probe's L-BFGS solve, Tip-Adapter-F's recipe and its search on validation."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Sequence

import numpy as np

from data.cache import Split
from train_jax.config import Settings
from train_jax.layout import Buckets


@dataclass(frozen=True)
class Job:
    """One group of runs (one head) to train.

    settings [S]; split: the training cache's train split (features [M0,D], aug_features [M0,A,D] or None);
    pool_rows [M]: the split rows any run uses; rows [S,N]: each run's training rows as indices into pool_rows;
    seeds [S]; text [C,D] prototypes; dataset: the cache's dataset name; val_feats [Nv,D] L2-normalised,
    val_labels [Nv], members [S,Nv] bool: each run's own validation rows (the only data a trainer may tune on;
    all three None when the experiment is validation-free, ``--select none``: the trainer then tunes nothing and
    keeps its recipe's fixed values); budget, devices, buckets: as ``runner.train_runs`` takes them (a trainer
    whose shapes allow it pads to ``buckets`` so that one compiled program serves every shot count)."""

    head: Any
    settings: list[Settings]
    split: Split
    pool_rows: np.ndarray
    rows: np.ndarray
    seeds: np.ndarray
    text: np.ndarray
    dataset: str
    val_feats: np.ndarray | None
    val_labels: np.ndarray | None
    members: np.ndarray | None
    budget: int | None = None
    devices: Sequence[Any] | None = None
    buckets: Buckets = Buckets()

    @property
    def validation_free(self) -> bool:
        """Whether this job has no validation rows (``--select none``)."""
        return self.val_feats is None


@dataclass(frozen=True)
class Fitted:
    """A trainer's result, per run (leading axis S): params, consts, failed [S] bool, fail_step [S] int (-1: did
    not fail), final_loss [S]; settings [S]: the settings each model is used with (a trainer may set what it
    tuned); note: a line for the results when the recipe could not be followed ("" if it was); loss_curve [S,E]:
    each epoch's mean training loss, for a trainer that has epochs (None: it has none, e.g. L-BFGS)."""

    params: Any
    consts: Any
    failed: np.ndarray
    fail_step: np.ndarray
    final_loss: np.ndarray
    settings: list[Settings]
    note: str = ""
    loss_curve: np.ndarray | None = None

