"""Evaluators: small units that score one trained group of runs (S runs of one head) on a set of features.

Each takes the group (``Group``: head, trained models [S], settings [S]) and returns arrays over its runs, in the
manner of big_vision's evaluators; ``experiment`` applies them to validation, test and shift sets, and to the
class sets of the generalisation protocols (``on_targets``: base-to-new's new classes, cross-dataset targets).
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Any, Iterable, Sequence

import numpy as np

from train_jax import evaluate
from train_jax.config import Settings
from train_jax.heads import Head, head_inputs
from train_jax.runner import Trained, hparam_arrays, predict_runs, score_runs


@dataclass(frozen=True)
class Placement:
    """Where prediction programs run: budget (bytes for the run axis; None: the runner's default) and devices
    (None: all)."""

    budget: int | None = None
    devices: Sequence[Any] | None = None


@dataclass(frozen=True)
class Group:
    """S trained runs of one head: trained (leaves with leading axis S) and the settings [S] each model is used
    with."""

    head: Head
    trained: Trained
    settings: tuple[Settings, ...]

    @property
    def hp(self) -> dict[str, np.ndarray]:
        """Per-run hyperparameter arrays [S] (``runner.hparam_arrays``)."""
        return hparam_arrays(self.settings)


@dataclass(frozen=True)
class EvalSet:
    """A shift test set: features [N,D], labels [N] (its own class ids), classes [Ce] (their training ids), norms
    [N] (the features' norms before normalisation)."""

    name: str
    features: np.ndarray
    labels: np.ndarray
    classes: np.ndarray
    norms: np.ndarray


@dataclass(frozen=True)
class TargetSet:
    """Test images of classes other than the training ones, scored against their own prototypes: features [N,D],
    labels [N] (indices into text), text [Ct,D] (base-to-new's new classes, or a cross-dataset target)."""

    name: str
    features: np.ndarray
    labels: np.ndarray
    text: np.ndarray


def class_free(group: Group) -> Group | None:
    """The group's models for other classes (``Head.class_free``), None when its head has per-class weights."""
    free = getattr(group.head, "class_free", None)
    if free is None:
        return None
    head, params = free(group.trained.params)
    return Group(head, dataclasses.replace(group.trained, params=params), group.settings)


def on_targets(group: Group, targets: Sequence[TargetSet], place: Placement) -> dict[str, np.ndarray]:
    """Target name -> accuracy (%) [S] of the group's models on each target's classes with its own prototypes;
    empty for a head with per-class weights (it cannot score classes it was not trained on)."""
    free = class_free(group) if targets else None
    if free is None:
        return {}
    hp = free.hp
    return {t.name: evaluate.accuracy(predict_runs(free.head, free.trained, hp, t.features, t.text,
                                                   budget=place.budget, devices=place.devices, desc=t.name), t.labels)
            for t in targets}


def on_validation(group: Group, feats: np.ndarray, norms: np.ndarray, labels: np.ndarray, members: np.ndarray,
                  text: np.ndarray, place: Placement) -> tuple[np.ndarray, np.ndarray]:
    """Accuracy (%) and score on each run's own validation rows.

    Args:
      feats: [V,D] the union of the runs' validation rows (L2-normalised); norms: [V] their norms before
      normalisation; labels: [V]; members: [S,V] bool, each run's own rows. text: [C,D] prototypes.

    Returns:
      (accuracy [S], mean log-probability of the true class [S]).
    """
    pred, logp = score_runs(group.head, group.trained, group.hp, head_inputs(group.head, feats, norms), labels, text,
                            budget=place.budget, devices=place.devices, desc="val")
    return evaluate.subset_accuracy(pred, labels, members), evaluate.subset_mean(logp, members)


def on_test(group: Group, blocks: Iterable[tuple[np.ndarray, np.ndarray]], labels: np.ndarray, text: np.ndarray,
            place: Placement) -> tuple[np.ndarray, np.ndarray]:
    """Accuracy (%) [S] and per-image correctness [S,N] bool on a test set given as blocks of (features [n,D],
    their norms before normalisation [n]) (in row order) with labels [N]."""
    hp = group.hp
    pred = np.concatenate([predict_runs(group.head, group.trained, hp, head_inputs(group.head, feats, norms), text,
                                        budget=place.budget, devices=place.devices, desc="test")
                           for feats, norms in blocks], axis=-1)
    return evaluate.accuracy(pred, labels), pred == labels


def on_shift(group: Group, shift: Sequence[EvalSet], text: np.ndarray, place: Placement) -> dict[str, np.ndarray]:
    """Shift set name -> accuracy (%) [S] over its classes (``EvalSet.classes`` of the training ``text`` [C,D])."""
    hp = group.hp
    out = {}
    for ev in shift:
        preds = predict_runs(group.head, group.trained, hp, head_inputs(group.head, ev.features, ev.norms), text,
                             ev.classes, budget=place.budget, devices=place.devices, desc=ev.name)
        out[ev.name] = evaluate.accuracy(preds, ev.labels)
    return out
