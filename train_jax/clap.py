"""CLAP (Silva-Rodriguez et al., CVPR 2024, "A closer look at the few-shot adaptation of large vision-language
models") as its authors run it: jusiro/CLAP at dbdf4095b3d824546474c725539b9f4efff3ca0e (``trainers/adapters.py``,
``configs/trainers/SGD_lr1e-1_B256_ep300.yaml``, ``experiments/experiment_CLAP.txt``: init ``ZS``, constraint
``l2``), on Dassl c61a1b5 (its SGD, cosine schedule and constant warm-up).

ZS-LP: class prototypes W [C,D] start at the text prototypes T and classify by ``s * v^ W^^T`` (both normalised,
s = CLIP's own logit scale). CLAP adds the class-adaptive penalty ``mean_c lambda_c ||w_c - t_c||^2`` towards the
zero-shot prototypes, whose multipliers lambda_c are the augmented Lagrangian's initial ones as the authors compute
them (``init_lagrangian_multipliers``): the zero-shot softmax probability of class c averaged over c's training
samples (every augmented view), fixed during training (their scripts' ``l2`` constraint runs no outer step).
SGD (momentum 0.9, no weight decay), lr 0.1, 300 epochs, batch 256; the lr is 1e-5 during the first epoch, then
cosine over 300 epochs from 0.1, stepped per epoch. An epoch is ``max(1, n // 256)`` batches (the length of Dassl's
loader of the n shots, ``drop_last``) drawn from a fresh shuffle of all (shot, view) samples. The last epoch's
model is used: no validation.
"""

from __future__ import annotations

import dataclasses
import functools
from dataclasses import dataclass
from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

from train_jax import peers
from train_jax.losses import cross_entropy, l2_normalize
from train_jax.trainers import Fitted, Job

LR, MOMENTUM, EPOCHS, BATCH = 0.1, 0.9, 300, 256
WARMUP_EPOCHS, WARMUP_LR = 1, 1e-5  # Dassl: WARMUP_TYPE constant, WARMUP_CONS_LR 1e-5, WARMUP_RECOUNT True
FORCED = {"lr": LR, "weight_decay": 0.0, "epochs": EPOCHS, "batch_size": BATCH}
ROW_BLOCK = 64  # shots per block when the multipliers are computed (memory: ROW_BLOCK x views x C)


def multipliers_of(probs: np.ndarray | jax.Array, labels, classes: int, valid=None) -> jax.Array:
    """CLAP's multipliers: per class, the mean over its samples of the zero-shot probability of their true class.
    probs [N] (each sample's true-class softmax probability), labels [N], valid [N] bool (default all) -> [C]
    (0 for a class without samples)."""
    onehot = jax.nn.one_hot(labels, classes, dtype=jnp.float32)
    if valid is not None:
        onehot = onehot * valid[:, None]
    return (probs @ onehot) / jnp.maximum(jnp.sum(onehot, axis=0), 1.0)


def objective(w: jax.Array, x: jax.Array, y: jax.Array, text: jax.Array, mult: jax.Array, scale) -> jax.Array:
    """CLAP's loss of prototypes w [C,D] on a batch x [B,D] (normalised), y [B]: mean CE of ``s * x w^^T`` plus
    ``mean_c mult_c ||w_c - t_c||^2`` (text [C,D], mult [C])."""
    logits = scale * x @ l2_normalize(w).T
    return cross_entropy(logits, y) + jnp.mean(mult * jnp.sum((w - text) ** 2, axis=-1))


def lr_at(epoch: jax.Array) -> jax.Array:
    """The learning rate of an epoch (0-based): WARMUP_LR during the warm-up, then Dassl's cosine over EPOCHS
    epochs restarted after it (torch's CosineAnnealingLR, T_max = EPOCHS)."""
    e = jnp.asarray(epoch, jnp.float32)
    cosine = LR * 0.5 * (1.0 + jnp.cos(jnp.pi * (e - WARMUP_EPOCHS) / EPOCHS))
    return jnp.where(e < WARMUP_EPOCHS, WARMUP_LR, cosine)


@dataclass(frozen=True)
class ClapHead:
    """``s * v^ W^^T`` with trainable prototypes W [C,D] (starting at the text prototypes) and constant
    multipliers [C]; ``loss`` is CLAP's objective. ``clap.fit`` trains it (the multipliers at the run's logit scale
    over every augmented view); ``init`` (for the Head protocol) takes them from the given features at CLIP's
    scale 100."""

    def init(self, feats, labels, text):
        probs = jax.nn.softmax(100.0 * l2_normalize(feats) @ text.T, axis=-1)
        true = jnp.take_along_axis(probs, labels[:, None], axis=1)[:, 0]
        return {"W": jnp.asarray(text, jnp.float32)}, {"mult": multipliers_of(true, labels, text.shape[0])}

    def logits(self, params, consts, feats, zs_cos, text, hp):
        return hp["logit_scale"] * l2_normalize(feats) @ l2_normalize(params["W"]).T

    def loss(self, params, consts, feats, zs_cos, labels, text, hp):
        return objective(params["W"], l2_normalize(feats), labels, text, consts["mult"], hp["logit_scale"])


def _true_probs(rows: jax.Array, valid: jax.Array, views: jax.Array, labels: jax.Array, text: jax.Array,
                scale: jax.Array) -> jax.Array:
    """Zero-shot probability of the true class of every (shot, view): rows [R] into views [M,A,D] (valid [R]) ->
    [R,A], ROW_BLOCK shots at a time."""
    def block(args):
        r, _ = args
        probs = jax.nn.softmax(scale * views[r] @ text.T, axis=-1)  # [b,A,C]
        return jnp.take_along_axis(probs, labels[r][:, None, None], axis=2)[..., 0]

    blocks = (rows.reshape(-1, ROW_BLOCK), valid.reshape(-1, ROW_BLOCK))
    return jnp.where(valid[:, None], jax.lax.map(block, blocks).reshape(rows.shape[0], -1), 0.0)


def epoch_order(seed, epoch, samples: int, batch: int, steps: int) -> jax.Array:
    """An epoch's batches: the first ``steps * batch`` of a fresh shuffle of the run's samples (sample k = view
    k % views of its k // views-th shot) -> [steps, batch] indices; the shuffle is drawn from (seed, epoch)."""
    key = jax.random.fold_in(jax.random.PRNGKey(seed), epoch)
    return jax.random.permutation(key, samples)[: steps * batch].reshape(steps, batch)


class _State(NamedTuple):
    """A run's training state: prototypes w, the momentum buffer, failed (a non-finite loss or gradient stopped
    it), fail_step, the last finite loss, this epoch's loss sum and count of steps taken, the step counter."""

    w: jax.Array
    buf: jax.Array
    failed: jax.Array
    fail_step: jax.Array
    last: jax.Array
    total: jax.Array
    count: jax.Array
    t: jax.Array


def train_run(rows, seed, scale, views, labels, text, *, n: int, batch: int, steps: int, epochs: int):
    """One CLAP run: rows [n] into the pool views [M,A,D] (labels [M]), seed (shuffles), scale (logit scale) ->
    (params {"W": [C,D]}, consts {"mult": [C]}, failed, fail_step, last loss, loss per epoch [epochs])."""
    views, labels, text = jnp.asarray(views), jnp.asarray(labels), jnp.asarray(text, jnp.float32)
    classes, per_shot = text.shape[0], views.shape[1]
    pad = -n % ROW_BLOCK
    padded = jnp.concatenate([rows, jnp.zeros(pad, rows.dtype)])
    valid = jnp.arange(n + pad) < n
    true = _true_probs(padded, valid, views, labels, text, scale)  # [n+pad, A]
    mult = multipliers_of(true.reshape(-1), jnp.repeat(labels[padded], per_shot), classes,
                          jnp.repeat(valid, per_shot))
    grad = jax.value_and_grad(objective)

    def step(s: _State, idx, lr) -> tuple[_State, None]:
        shot = rows[idx // per_shot]
        loss, g = grad(s.w, views[shot, idx % per_shot], labels[shot], text, mult, scale)
        ok = jnp.isfinite(loss) & peers.all_finite(g)
        take, newly_failed = ~s.failed & ok, ~s.failed & ~ok
        buf = MOMENTUM * s.buf + g  # torch's SGD: the first step's buffer is the gradient itself
        return _State(jnp.where(take, s.w - lr * buf, s.w), jnp.where(take, buf, s.buf), s.failed | newly_failed,
                      jnp.where(newly_failed, s.t, s.fail_step), jnp.where(take, loss, s.last),
                      s.total + jnp.where(take, loss, 0.0), s.count + take, s.t + 1), None

    def epoch(s: _State, e) -> tuple[_State, jax.Array]:
        s = s._replace(total=jnp.float32(0.0), count=jnp.int32(0))
        order = epoch_order(seed, e, n * per_shot, batch, steps)
        s, _ = jax.lax.scan(functools.partial(step, lr=lr_at(e)), s, order)
        return s, jnp.where(s.count > 0, s.total / jnp.maximum(s.count, 1), jnp.nan)

    w0 = jnp.asarray(text, jnp.float32)
    init = _State(w0, jnp.zeros_like(w0), jnp.bool_(False), jnp.int32(-1), jnp.float32(jnp.nan), jnp.float32(0.0),
                  jnp.int32(0), jnp.int32(0))
    s, curve = jax.lax.scan(epoch, init, jnp.arange(epochs))
    return {"W": s.w}, {"mult": mult}, s.failed, s.fail_step, s.last, curve


@functools.lru_cache(maxsize=None)
def _program(n: int, batch: int, steps: int, epochs: int):
    one = functools.partial(train_run, n=n, batch=batch, steps=steps, epochs=epochs)
    return jax.jit(lambda per_run, views, labels, text: jax.vmap(one, in_axes=(0, 0, 0, None, None, None))(
        *per_run, views, labels, text))


def epoch_shape(n: int, views: int) -> tuple[int, int]:
    """(batch, steps per epoch) for n shots of ``views`` samples each: batches of BATCH samples (all n * views if
    fewer), ``max(1, n // BATCH)`` of them (Dassl's loader of the n shots with drop_last)."""
    return min(BATCH, n * views), max(1, n // BATCH)


def fit(job: Job, epochs: int = EPOCHS) -> Fitted:
    """CLAP's trainer (``methods.Method.fit``): every run (seed, logit scale) trained at once on the cached
    augmented views of its shots (the plain features when the cache has none, noted); the last epoch's model."""
    views, has_views = peers.augmented_views(job)
    labels = peers.pool_labels(job)
    n = job.rows.shape[1]
    batch, steps = epoch_shape(n, views.shape[1])
    classes, dim = job.text.shape
    per_run = (job.rows.astype(np.int32), np.asarray(job.seeds, np.int32),
               np.array([s.logit_scale for s in job.settings], np.float32))
    run_bytes = 4 * (6 * classes * dim + batch * (dim + 3 * classes) + ROW_BLOCK * views.shape[1] * classes + 2 * n)
    params, consts, failed, fail_step, loss, curve = peers.run_chunked(
        _program(n, batch, steps, epochs), per_run, (views, labels, job.text), len(job.settings), run_bytes,
        job.budget, job.devices)
    settings = [dataclasses.replace(s, use_aug=has_views) for s in job.settings]
    note = "" if has_views else peers.no_views_note(
        "clap", job.dataset, "it trains on the plain features, not on its recipe's augmented views")
    return Fitted(params, consts, failed, fail_step.astype(np.int32), loss, settings, note,
                  np.asarray(curve, np.float32))
