"""Baselines trained by the same vmapped runner as CMM: linear probe and Tip-Adapter-F heads, and the rule that
turns the user's grid into a method's runs (zero-shot = CMM with 0 epochs, CE-only CMM = lam 0).

Heads follow the interface described in ``train_jax.methods``.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Any, Mapping, Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp

from train_jax.config import Settings
from train_jax.losses import cross_entropy, l2_normalize


def restrict(grid: Sequence[Settings], used: Sequence[str], forced: Mapping[str, Any]) -> list[Settings]:
    """Grid settings with every field outside ``used`` reset to its default and ``forced`` applied; duplicates
    dropped, first occurrence order kept."""
    default = Settings()
    unused = {f.name: getattr(default, f.name) for f in dataclasses.fields(Settings) if f.name not in used}
    return list(dict.fromkeys(dataclasses.replace(s, **{**unused, **forced}) for s in grid))


class LinearProbe(nn.Module):
    """``logits = s * (v W^T + b)`` with W [C,D], b [C] zero-initialised."""

    num_classes: int

    @nn.compact
    def __call__(self, v: jax.Array, scale: jax.Array) -> jax.Array:
        """v [B,D] -> logits [B,C]."""
        return scale * nn.Dense(self.num_classes, kernel_init=nn.initializers.zeros)(v)


@dataclass(frozen=True)
class LinearProbeHead:
    """Linear probe trained with cross-entropy; the text prototypes only fix the number of classes."""

    def init(self, feats, labels, text):
        module = LinearProbe(text.shape[0])
        return module.init(jax.random.PRNGKey(0), feats[:1], 1.0)["params"], {}

    def logits(self, params, consts, feats, zs_cos, text, hp):
        return LinearProbe(text.shape[0]).apply({"params": params}, feats, hp["logit_scale"])

    def loss(self, params, consts, feats, zs_cos, labels, text, hp):
        return cross_entropy(self.logits(params, consts, feats, zs_cos, text, hp), labels)


@dataclass(frozen=True)
class TipAdapterHead:
    """Tip-Adapter-F (Zhang et al. 2022): ``s * v T^T + alpha * exp(-beta (1 - v K^T)) L``.

    Keys K [N,D] (trainable) are the training images' features (mean over cached views, normalised); values L
    [N,C] are their one-hot labels (constant).
    """

    def init(self, feats, labels, text):
        return {"keys": l2_normalize(feats)}, {"values": jax.nn.one_hot(labels, text.shape[0], dtype=jnp.float32)}

    def logits(self, params, consts, feats, zs_cos, text, hp):
        affinity = feats @ params["keys"].T
        cache = jnp.exp(-hp["beta"] * (1.0 - affinity)) @ consts["values"]
        return hp["logit_scale"] * zs_cos + hp["alpha"] * cache

    def loss(self, params, consts, feats, zs_cos, labels, text, hp):
        return cross_entropy(self.logits(params, consts, feats, zs_cos, text, hp), labels)
