"""The Flax CMM module: a residual linear map from CLIP image space towards the text space."""

from __future__ import annotations

import flax.linen as nn
import jax
import jax.numpy as jnp

from train_jax.losses import l2_normalize


class CrossModalMapper(nn.Module):
    """``v' = normalise(v + dW v + b)`` with dW [D,D] and b [D] zero-initialised, so an untrained mapper is the
    identity and training starts exactly at zero-shot CLIP.

    With ``learn_text`` the class prototypes are learned too, as ``normalise(T + dT)`` with dT [C,D]
    zero-initialised (i.e. initialised from the prompts; weight decay pulls them back towards the prompts).
    """

    learn_text: bool = False

    @nn.compact
    def __call__(self, v: jax.Array, text: jax.Array) -> tuple[jax.Array, jax.Array]:
        """v [B,D] L2-normalised image features, text [C,D] prototypes -> (v' [B,D], prototypes [C,D])."""
        dim = v.shape[-1]
        dw = self.param("dW", nn.initializers.zeros, (dim, dim), jnp.float32)
        b = self.param("b", nn.initializers.zeros, (dim,), jnp.float32)
        mapped = l2_normalize(v + v @ dw.T + b)
        if self.learn_text:
            dt = self.param("dT", nn.initializers.zeros, text.shape, jnp.float32)
            text = l2_normalize(text + dt)
        return mapped, text
