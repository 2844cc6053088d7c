"""The vectorised CMM losses against plain per-sample Python loops."""

import math

import jax.numpy as jnp
import numpy as np

from train_jax.losses import cmm_logits, cmm_loss, cross_entropy, hardest_negative_triplet, l2_normalize


def _unit(rng, *shape):
    x = rng.normal(size=shape)
    return x / np.linalg.norm(x, axis=-1, keepdims=True)


def _triplet_loop(mapped, text, labels, margin):
    """Per sample: anchor v', positive T_y, negative = closest wrong-class prototype, cosine distance."""
    total = 0.0
    for v, y in zip(mapped, labels):
        d_pos = 1.0 - float(v @ text[y])
        d_neg = min(1.0 - float(v @ text[c]) for c in range(len(text)) if c != y)
        total += max(0.0, d_pos - d_neg + margin)
    return total / len(labels)


def _ce_loop(logits, labels):
    total = 0.0
    for row, y in zip(logits, labels):
        top = max(row)
        log_z = top + math.log(sum(math.exp(v - top) for v in row))
        total += log_z - row[y]
    return total / len(labels)


def test_triplet_matches_loop():
    rng = np.random.default_rng(0)
    for margin in (0.0, 0.2, 1.5):
        mapped, text = _unit(rng, 16, 8), _unit(rng, 5, 8)
        labels = rng.integers(0, 5, size=16)
        sims = jnp.asarray(mapped @ text.T, jnp.float32)
        got = hardest_negative_triplet(sims, jnp.asarray(labels), margin)
        expected = _triplet_loop(mapped, text, labels, margin)
        np.testing.assert_allclose(float(got), expected, rtol=1e-5, atol=1e-6)


def test_triplet_zero_when_margin_met():
    text = np.eye(3, dtype=np.float32)
    sims = jnp.asarray(text @ text.T)  # each anchor on its own prototype: cos_pos 1, cos_neg 0
    assert float(hardest_negative_triplet(sims, jnp.arange(3), 0.5)) == 0.0
    assert math.isclose(float(hardest_negative_triplet(sims, jnp.arange(3), 1.5)), 0.5, rel_tol=1e-6)


def test_cross_entropy_and_total_match_loop():
    rng = np.random.default_rng(1)
    mapped, feats, text = _unit(rng, 12, 6), _unit(rng, 12, 6), _unit(rng, 4, 6)
    labels = rng.integers(0, 4, size=12)
    sims, zs = mapped @ text.T, feats @ text.T
    logits = 100.0 * (2.0 * sims + zs)
    np.testing.assert_allclose(cmm_logits(jnp.asarray(sims), jnp.asarray(zs), 2.0, 100.0), logits, rtol=1e-5)
    ce = _ce_loop(logits, labels)
    np.testing.assert_allclose(float(cross_entropy(jnp.asarray(logits), jnp.asarray(labels))), ce, rtol=1e-4)
    total = cmm_loss(jnp.asarray(sims, jnp.float32), jnp.asarray(zs, jnp.float32), jnp.asarray(labels),
                     alpha=2.0, scale=100.0, lam=3.0, margin=0.3)
    np.testing.assert_allclose(float(total), ce + 3.0 * _triplet_loop(mapped, text, labels, 0.3), rtol=1e-4)


def test_l2_normalize():
    x = jnp.asarray([[3.0, 4.0], [0.0, 0.0]])
    np.testing.assert_allclose(l2_normalize(x), [[0.6, 0.8], [0.0, 0.0]], atol=1e-7)
