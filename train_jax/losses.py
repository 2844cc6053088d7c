"""Pure loss functions of CMM. Shapes: B samples, C classes, D feature dims; all float32.

Cosine similarities ``sims = v' T^T`` are computed once per step and shared by the logits and the triplet loss.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import optax


def l2_normalize(x: jax.Array, eps: float = 1e-12) -> jax.Array:
    """Rows of x [..., D] scaled to unit L2 norm."""
    return x * jax.lax.rsqrt(jnp.maximum(jnp.sum(x * x, axis=-1, keepdims=True), eps))


def cmm_logits(sims: jax.Array, zs_cos: jax.Array, alpha: jax.Array, scale: jax.Array) -> jax.Array:
    """CMM logits ``s * (alpha * v' T^T + v T^T)``. sims = v' T^T [B,C], zs_cos = v T^T [B,C] -> [B,C]."""
    return scale * (alpha * sims + zs_cos)


def cross_entropy(logits: jax.Array, labels: jax.Array) -> jax.Array:
    """Mean softmax cross-entropy. logits [B,C], labels [B] int -> scalar."""
    return jnp.mean(optax.softmax_cross_entropy_with_integer_labels(logits, labels))


def hardest_negative_triplet(sims: jax.Array, labels: jax.Array, margin: jax.Array) -> jax.Array:
    """Triplet loss on cosine distance d = 1 - cos, vectorised over the batch.

    Anchor v', positive its class prototype, negative the closest (highest-cosine) wrong-class prototype:
    ``max(0, d(v', T_y) - d(v', T_neg) + margin) = max(0, cos_neg - cos_pos + margin)``.
    sims = v' T^T [B,C], labels [B] -> scalar mean.
    """
    is_pos = jax.nn.one_hot(labels, sims.shape[-1], dtype=bool)
    pos = jnp.sum(jnp.where(is_pos, sims, 0.0), axis=-1)
    neg = jnp.max(jnp.where(is_pos, -jnp.inf, sims), axis=-1)
    return jnp.mean(jax.nn.relu(neg - pos + margin))


def cmm_loss_parts(sims: jax.Array, zs_cos: jax.Array, labels: jax.Array, *, alpha: jax.Array, scale: jax.Array,
                   margin: jax.Array) -> jax.Array:
    """The two terms of the CMM loss, [2]: (CE on the CMM logits, hardest-negative triplet). sims, zs_cos [B,C],
    labels [B]."""
    return jnp.stack([cross_entropy(cmm_logits(sims, zs_cos, alpha, scale), labels),
                      hardest_negative_triplet(sims, labels, margin)])


def combine_cmm_parts(parts: jax.Array, lam: jax.Array) -> jax.Array:
    """The CMM loss from its parts [2] (``cmm_loss_parts``): ce + lam * triplet."""
    return parts[0] + lam * parts[1]


def cmm_loss(
    sims: jax.Array,
    zs_cos: jax.Array,
    labels: jax.Array,
    *,
    alpha: jax.Array,
    scale: jax.Array,
    lam: jax.Array,
    margin: jax.Array,
) -> jax.Array:
    """CE on the CMM logits + lam * hardest-negative triplet. sims, zs_cos [B,C], labels [B] -> scalar."""
    return combine_cmm_parts(cmm_loss_parts(sims, zs_cos, labels, alpha=alpha, scale=scale, margin=margin), lam)
