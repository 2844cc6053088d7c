"""The head protocol, at the bottom of train_jax (step, runner and methods import it; it imports none of them),
and the CMM head.

A *head* says how one kind of model is initialised, scored and trained for a single run (the runner vmaps it):

- ``init(feats [N,D], labels [N], text [C,D]) -> (params, consts)``: trainable params and per-run constants
  (feats: each training image's mean over the runner pool's views);
- ``logits(params, consts, feats [B,D], zs_cos [B,C], text [C,D], hp) -> [B,C]``;
- ``loss(params, consts, feats [B,D], zs_cos [B,C], labels [B], text [C,D], hp) -> scalar`` (mean over B);
- ``part_names`` (optional, default none) with ``loss_parts(...)`` of ``loss``'s arguments -> [len(part_names)]:
  the named terms of the loss (each a mean over B), and ``combine_parts(parts, hp)`` -> the loss; the runner
  trains on the combined parts (one forward pass) and records them per epoch;
- ``class_free(params)`` (optional) -> ``(head, params)``: the same model for classes it was not trained on,
  scored by their prototypes alone (base-to-new's new classes, another dataset's classes); a head without it has
  per-class weights and takes no part in those protocols.

A head reads L2-normalised image features, unless it sets ``raw_features = True`` (the linear probe, on raw
features as CoOp's): then every caller passes ``head_inputs(head, feats, norms)``, the features times their norms
before normalisation (the cache's ``norms``).

``zs_cos = v T^T`` is the zero-shot cosine, computed by the runner once (not per step); ``hp`` maps each of
``config.DYNAMIC_FIELDS`` to a scalar. Heads are frozen dataclasses: hashable, so they are static under jit.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Mapping, Protocol

import jax

from train_jax.losses import cmm_logits, cmm_loss, cmm_loss_parts, combine_cmm_parts
from train_jax.model import CrossModalMapper

Params = Any


class Head(Protocol):
    """What a head provides (see the module docstring); ``part_names``/``loss_parts``/``combine_parts`` optional."""

    def init(self, feats: jax.Array, labels: jax.Array, text: jax.Array) -> tuple[Params, Params]:
        """feats [N,D], labels [N], text [C,D] -> (trainable params, per-run constants)."""
        ...

    def logits(
        self, params: Params, consts: Params, feats: jax.Array, zs_cos: jax.Array, text: jax.Array, hp: Mapping
    ) -> jax.Array:
        """feats [B,D], zs_cos [B,C], text [C,D], hp: ``config.DYNAMIC_FIELDS`` -> scalar -> logits [B,C]."""
        ...

    def loss(
        self,
        params: Params,
        consts: Params,
        feats: jax.Array,
        zs_cos: jax.Array,
        labels: jax.Array,
        text: jax.Array,
        hp: Mapping,
    ) -> jax.Array:
        """As ``logits`` with labels [B] -> the training loss, a scalar (mean over B)."""
        ...


def head_inputs(head: Head, feats, norms):
    """The image features a head reads: for a head with ``raw_features``, norms [N] * feats [N,D] (the raw
    features), else the L2-normalised feats [N,D] themselves. ValueError if a raw-feature head gets no norms."""
    if not getattr(head, "raw_features", False):
        return feats
    if norms is None:
        raise ValueError(f"{type(head).__name__} reads raw features: pass the features' norms")
    return feats * norms[:, None]


@dataclass(frozen=True)
class CMMHead:
    """Cross-Modal Mapping: logits ``s * (alpha * v' T'^T + v T^T)``, loss CE + lam * hardest-negative triplet."""

    learn_text: bool = False
    part_names = ("ce", "triplet")  # ``loss_parts``: loss = ce + lam * triplet

    def _sims(self, params: Params, feats: jax.Array, text: jax.Array) -> jax.Array:
        mapped, protos = CrossModalMapper(self.learn_text).apply({"params": params}, feats, text)
        return mapped @ protos.T

    def init(self, feats: jax.Array, labels: jax.Array, text: jax.Array) -> tuple[Params, Params]:
        params = CrossModalMapper(self.learn_text).init(jax.random.PRNGKey(0), feats[:1], text)["params"]
        return params, {}

    def logits(self, params, consts, feats, zs_cos, text, hp):
        return cmm_logits(self._sims(params, feats, text), zs_cos, hp["alpha"], hp["logit_scale"])

    def loss(self, params, consts, feats, zs_cos, labels, text, hp):
        sims = self._sims(params, feats, text)
        return cmm_loss(
            sims, zs_cos, labels,
            alpha=hp["alpha"], scale=hp["logit_scale"], lam=hp["lam"], margin=hp["margin"],
        )

    def loss_parts(self, params, consts, feats, zs_cos, labels, text, hp):
        return cmm_loss_parts(self._sims(params, feats, text), zs_cos, labels, alpha=hp["alpha"],
                              scale=hp["logit_scale"], margin=hp["margin"])

    def combine_parts(self, parts, hp):
        return combine_cmm_parts(parts, hp["lam"])

    def class_free(self, params: Params) -> tuple["CMMHead", Params]:
        """The learned map without the learned prototype offsets (dT [C,D] exists only for the training classes):
        other classes are scored with the map on their frozen prototypes. ``params`` may carry leading run axes."""
        return CMMHead(False), {k: v for k, v in params.items() if k != "dT"}
