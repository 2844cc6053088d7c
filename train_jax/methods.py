"""Methods: the registry of named methods (``METHODS``) over heads (``train_jax.heads``) and their trainers.

A method names a head for given settings, the settings fields it uses and forces, and optionally its own trainer
(``Method.fit``); methods without one train with the shared vmapped AdamW runner.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Any, Callable, Mapping, Sequence

import jax
import jax.numpy as jnp

from train_jax import baselines, logreg, training_free
from train_jax.config import DYNAMIC_FIELDS, Settings
from train_jax.heads import CMMHead, Head, Params
from train_jax.trainers import Fitted, Job

__all__ = ["CMMHead", "DEFAULT_METHODS", "Head", "METHODS", "Method", "Params", "logits", "predict", "restrict"]


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

# The registry, in the order tables, plots and summaries list methods (``records.method_rank``).
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
            "tip_adapter", lambda s: training_free.TipCacheHead(), (), training_free.FORCED,
            "training-free Tip-Adapter: a cache of the shots' features; (beta, alpha) searched on validation",
            training_free.tip_adapter_fit,
        ),
        Method(
            "tip_adapter_f", lambda s: baselines.TipAdapterHead(), (), baselines.FORCED,
            "Tip-Adapter-F with its authors' recipe; (beta, alpha) searched on validation after training",
            baselines.fit,
        ),
        Method(
            "gda", lambda s: training_free.GDAHead(), (), training_free.FORCED,
            "training-free GDA: the linear classifier of the class means and one shared covariance, added to "
            "zero-shot with its weight chosen on validation",
            training_free.gda_fit,
        ),
        Method(
            "cmm_ce", lambda s: CMMHead(s.learn_text), _TRAINED + ("alpha", "learn_text"), {"lam": 0.0},
            "CMM without the triplet loss (ablation)",
        ),
        Method(
            "cmm", lambda s: CMMHead(s.learn_text), _TRAINED + ("alpha", "lam", "margin", "learn_text"), {},
            "Cross-Modal Mapping: CE + lambda * hardest-negative triplet",
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
