"""Methods trained by the shared vmapped runner: the CMM head and the registry of all methods.

A *head* says how one kind of model is initialised, scored and trained for a single run (the runner vmaps it):

- ``init(feats [N,D], labels [N], text [C,D]) -> (params, consts)``: trainable params and per-run constants
  (feats: each training image's mean over the runner pool's views);
- ``logits(params, consts, feats [B,D], zs_cos [B,C], text [C,D], hp) -> [B,C]``;
- ``loss(params, consts, feats [B,D], zs_cos [B,C], labels [B], text [C,D], hp) -> scalar`` (mean over B);
- ``part_names`` (optional, default none) with ``loss_parts(...)`` of ``loss``'s arguments -> [len(part_names)]:
  the named terms of the loss (each a mean over B), and ``combine_parts(parts, hp)`` -> the loss; the runner
  trains on the combined parts (one forward pass) and records them per epoch.

``zs_cos = v T^T`` is the zero-shot cosine, computed by the runner once (not per step); ``hp`` maps each of
``config.DYNAMIC_FIELDS`` to a scalar. Heads are frozen dataclasses: hashable, so they are static under jit.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Any, Callable, Mapping, Protocol, Sequence

import jax
import jax.numpy as jnp

from train_jax import baselines, logreg, training_free
from train_jax.config import DYNAMIC_FIELDS, Settings
from train_jax.losses import cmm_logits, cmm_loss, cmm_loss_parts, combine_cmm_parts
from train_jax.model import CrossModalMapper
from train_jax.trainers import Fitted, Job

Params = Any


class Head(Protocol):
    def init(self, feats: jax.Array, labels: jax.Array, text: jax.Array) -> tuple[Params, Params]: ...

    def logits(
        self, params: Params, consts: Params, feats: jax.Array, zs_cos: jax.Array, text: jax.Array, hp: Mapping
    ) -> jax.Array: ...

    def loss(
        self,
        params: Params,
        consts: Params,
        feats: jax.Array,
        zs_cos: jax.Array,
        labels: jax.Array,
        text: jax.Array,
        hp: Mapping,
    ) -> jax.Array: ...


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


def restrict(grid: Sequence[Settings], used: Sequence[str], forced: Mapping[str, Any]) -> list[Settings]:
    """Grid settings with every field outside ``used`` reset to its default and ``forced`` applied; duplicates
    dropped, first occurrence order kept."""
    default = Settings()
    unused = {f.name: getattr(default, f.name) for f in dataclasses.fields(Settings) if f.name not in used}
    return list(dict.fromkeys(dataclasses.replace(s, **{**unused, **forced}) for s in grid))


@dataclass(frozen=True)
class Method:
    """A named method: its head for given settings, the fields it uses, how it turns the grid into runs, and its
    own trainer (``fit``; None: the shared AdamW runner with the settings as given)."""

    name: str
    head: Callable[[Settings], Head]
    used: tuple[str, ...]
    forced: Mapping[str, Any]
    description: str
    fit: Callable[[Job], Fitted] | None = None

    def settings(self, grid: list[Settings]) -> list[Settings]:
        """This method's runs for the user's grid: unused fields reset to defaults, forced ones set, duplicates
        dropped (order kept)."""
        return restrict(grid, self.used, self.forced)


_TRAINED = ("lr", "weight_decay", "epochs", "warmup", "batch_size", "use_aug", "logit_scale")

METHODS: dict[str, Method] = {
    m.name: m
    for m in (
        Method("zeroshot", lambda s: CMMHead(), ("logit_scale",), {"epochs": 0},
               "zero-shot CLIP (the untrained mapper)"),
        Method(
            "linear_probe", lambda s: logreg.LinearProbeHead(), ("c",), {},
            "CoOp's linear probe: L-BFGS logistic regression on the image features, C chosen on validation",
            logreg.fit,
        ),
        Method(
            "cmm_ce", lambda s: CMMHead(s.learn_text), _TRAINED + ("alpha", "learn_text"), {"lam": 0.0},
            "CMM without the triplet loss (ablation)",
        ),
        Method(
            "cmm", lambda s: CMMHead(s.learn_text), _TRAINED + ("alpha", "lam", "margin", "learn_text"), {},
            "Cross-Modal Mapping: CE + lambda * hardest-negative triplet",
        ),
        Method(
            "tip_adapter", lambda s: training_free.TipCacheHead(), (), training_free.FORCED,
            "training-free Tip-Adapter: a cache of the shots' features; (beta, alpha) searched on validation",
            training_free.tip_adapter_fit,
        ),
        Method(
            "gda", lambda s: training_free.GDAHead(), (), training_free.FORCED,
            "training-free GDA: the linear classifier of the class means and one shared covariance, added to "
            "zero-shot with its weight chosen on validation",
            training_free.gda_fit,
        ),
        Method(
            "tip_adapter_f", lambda s: baselines.TipAdapterHead(), (), baselines.FORCED,
            "Tip-Adapter-F with its authors' recipe; (beta, alpha) searched on validation after training",
            baselines.fit,
        ),
    )
}
DEFAULT_METHODS = ("zeroshot", "linear_probe", "tip_adapter", "gda", "cmm_ce", "cmm")


def logits(method: str, settings: Settings, params: Params, consts: Params, feats, text) -> jax.Array:
    """Class logits of one learned model. feats [N,D] L2-normalised, text [C,D] prototypes -> [N,C] float32."""
    hp = {k: jnp.asarray(getattr(settings, k), jnp.float32) for k in DYNAMIC_FIELDS}
    feats, text = jnp.asarray(feats, jnp.float32), jnp.asarray(text, jnp.float32)
    head = METHODS[method].head(settings)
    return head.logits(params, consts, feats, feats @ text.T, text, hp)


def predict(method: str, settings: Settings, params: Params, consts: Params, feats, text) -> jax.Array:
    """Class predictions of one learned model. feats [N,D] L2-normalised, text [C,D] prototypes -> [N] int."""
    return jnp.argmax(logits(method, settings, params, consts, feats, text), axis=-1)
