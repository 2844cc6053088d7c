"""Cross-modal adaptation (Lin et al., CVPR 2023, "Multimodality helps unimodality: cross-modal few-shot learning
with multimodal models"), its cross-modal linear probe as its authors run it: linzhiqiu/cross_modal_adaptation at
ac9077ee4e422f768c9b9109551468605e33ec9a (``train.py``, ``engine/optimizer/default.py`` ``HYPER_DICT["linear"]``,
``engine/optimizer/scheduler.py``, ``engine/model/head.py`` and ``logit.py``; ``--classifier_init zeroshot
--logit 4.60517 --image-augmentation flip --image-views 1``).

A bias-free linear head W [C,D], initialised at the class text prototypes, classifies ``exp(4.60517) * v^ W^T``
(inputs normalised, W not). Its training set is the image shots (their plain features plus one augmented view
each) *and* the class text embeddings as extra labelled samples: every iteration takes half a batch of images and
half a batch of texts, each from its own shuffled, drop-last loader that restarts when exhausted; the loss is the
cross-entropy over the concatenated batch. AdamW (betas 0.9/0.999, eps 1e-8) for 12,800 iterations; the lr starts
at 1e-5, rises linearly to its peak over 50 iterations, then follows a cosine over 12,800 iterations (torch's
CosineAnnealingLR behind their LinearWarmupScheduler). Every 100 iterations (0, 100, ...) the head is scored on
validation and the best one (first on ties) is kept. Their grid: lr {1e-3, 1e-4} x weight decay {0, 0.01, 1e-4} x
batch {8, 32}, a batch size run only when its text half is smaller than the text samples (and its image half
smaller than the image samples: ``get_valid_batch_sizes``).
"""

from __future__ import annotations

import dataclasses
import functools
import math
from dataclasses import dataclass
from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

from train_jax import peers
from train_jax.errors import TrainError
from train_jax.losses import cross_entropy, l2_normalize
from train_jax.trainers import Fitted, Job

GRID = {"lr": (1e-3, 1e-4), "weight_decay": (0.0, 0.01, 1e-4), "batch_size": (8, 32)}  # their loop order
# Validation-free (--select none): upstream has no default outside its search; the first value of each of its lists
# (HYPER_DICT["linear"]); batch 8 is also the one size get_valid_batch_sizes admits on every dataset of >= 5 classes
FIXED = {"lr": 1e-3, "weight_decay": 0.0, "batch_size": 8}
ITERS, WARMUP_ITERS, WARMUP_MIN_LR, EVAL_EVERY = 12800, 50, 1e-5, 100
TEXT_RATIO = 0.5  # CROSS_MODAL_BATCH_RATIO: half of each batch is text
BETA1, BETA2, EPS = 0.9, 0.999, 1e-8  # torch.optim.AdamW's defaults, which upstream keeps
SCALE = math.exp(4.60517)  # --logit 4.60517: CLIP's 100, fixed whatever the model's own scale
FORCED = {"logit_scale": SCALE, "adam_eps": EPS}


def halves(batch_size: int) -> tuple[int, int]:
    """(image, text) samples of a batch: text ``int(batch * TEXT_RATIO)``, images the rest."""
    text = int(batch_size * TEXT_RATIO)
    return batch_size - text, text


def admits(batch_size: int, classes: int, image_samples: int | None = None) -> bool:
    """Upstream's ``get_valid_batch_sizes``: the text half is smaller than the text samples (one per class here)
    and the image half smaller than the image samples (when given)."""
    image, text = halves(batch_size)
    return text < classes and (image_samples is None or image < image_samples)


def lr_at(i: jax.Array, peak: jax.Array, iters: int = ITERS) -> jax.Array:
    """The learning rate of iteration i (0-based): WARMUP_MIN_LR, then ``peak * i / WARMUP_ITERS`` up to
    WARMUP_ITERS, then ``peak * (1 + cos(pi (i - WARMUP_ITERS) / iters)) / 2``."""
    i = jnp.asarray(i, jnp.float32)
    warm = jnp.where(i == 0, WARMUP_MIN_LR, peak * i / WARMUP_ITERS)
    return jnp.where(i <= WARMUP_ITERS, warm, peak * 0.5 * (1.0 + jnp.cos(jnp.pi * (i - WARMUP_ITERS) / iters)))


def head_logits(w: jax.Array, x: jax.Array) -> jax.Array:
    """``SCALE * x^ w^T``: w [C,D] (not normalised), x [B,D] -> [B,C]."""
    return SCALE * l2_normalize(x) @ w.T


@dataclass(frozen=True)
class CrossModalHead:
    """The cross-modal linear head ``s * v^ W^T`` (W [C,D] from the text prototypes; s = ``hp["logit_scale"]``,
    which the method fixes at upstream's exp(4.60517)); ``loss``: cross-entropy on image rows alone (the runner has
    no text samples); ``cross_modal.fit`` trains it as upstream does."""

    def init(self, feats, labels, text):
        return {"W": l2_normalize(jnp.asarray(text, jnp.float32))}, {}

    def logits(self, params, consts, feats, zs_cos, text, hp):
        return hp["logit_scale"] * l2_normalize(feats) @ params["W"].T

    def loss(self, params, consts, feats, zs_cos, labels, text, hp):
        return cross_entropy(self.logits(params, consts, feats, zs_cos, text, hp), labels)


class _State(NamedTuple):
    w: jax.Array
    m: jax.Array
    v: jax.Array
    best: jax.Array
    best_hits: jax.Array
    failed: jax.Array
    fail_step: jax.Array


def adamw_step(w, m, v, g, t, lr, wd):
    """torch.optim.AdamW's update of w at step t (1-based): decay ``w *= 1 - lr wd``, then Adam with bias
    correction -> (w, m, v)."""
    m = BETA1 * m + (1.0 - BETA1) * g
    v = BETA2 * v + (1.0 - BETA2) * g * g
    denom = jnp.sqrt(v) / jnp.sqrt(1.0 - BETA2 ** t) + EPS
    return w * (1.0 - lr * wd) - (lr / (1.0 - BETA1 ** t)) * m / denom, m, v


def train_run(image_idx, text_idx, lr, wd, members, images, image_y, text, val_x, val_y, *, iters: int):
    """One run: image_idx [I,Bi] into images [P,D] (labels image_y [P]) and text_idx [I,Bt] into the text samples
    text [C,D] (sample c is class c), per iteration; peak lr and weight decay; its validation rows ``members`` [V]
    of val_x [V,D], val_y [V] -> (W of the kept checkpoint, failed, fail_step, mean loss per EVAL_EVERY iterations
    [ceil(I / EVAL_EVERY)]). A run without validation rows keeps its last iterate."""
    images, image_y, text = jnp.asarray(images), jnp.asarray(image_y), jnp.asarray(text, jnp.float32)
    grad = jax.value_and_grad(lambda w, x, y: cross_entropy(head_logits(w, x), y))
    no_val = ~jnp.any(members)

    def step(s: _State, a):
        i, img, txt = a
        x = jnp.concatenate([images[img], text[txt]])
        y = jnp.concatenate([image_y[img], txt])
        loss, g = grad(s.w, x, y)
        ok = jnp.isfinite(loss) & jnp.all(jnp.isfinite(g)) & ~s.failed
        w, m, v = adamw_step(s.w, s.m, s.v, g, (i + 1).astype(jnp.float32), lr_at(i, lr, iters), wd)
        keep = lambda new, old: jnp.where(ok, new, old)  # noqa: E731
        s = s._replace(w=keep(w, s.w), m=keep(m, s.m), v=keep(v, s.v), failed=s.failed | ~ok,
                       fail_step=jnp.where(~ok & ~s.failed, i, s.fail_step))

        def evaluate(s: _State) -> _State:
            hits = peers.val_hits(head_logits(s.w, val_x), val_y, members)
            better = (hits > s.best_hits) & ~s.failed
            return s._replace(best=jnp.where(better, s.w, s.best), best_hits=jnp.where(better, hits, s.best_hits))

        s = jax.lax.cond(i % EVAL_EVERY == 0, evaluate, lambda s: s, s)
        return s, jnp.where(ok, loss, jnp.nan)

    w0 = l2_normalize(text)
    init = _State(w0, jnp.zeros_like(w0), jnp.zeros_like(w0), w0, jnp.int32(-1), jnp.bool_(False), jnp.int32(-1))
    s, losses = jax.lax.scan(step, init, (jnp.arange(iters), image_idx, text_idx))
    pad = -iters % EVAL_EVERY
    blocks = jnp.concatenate([losses, jnp.full(pad, jnp.nan)]).reshape(-1, EVAL_EVERY)
    curve = jnp.nanmean(blocks, axis=1)
    return jnp.where(no_val, s.w, s.best), s.failed, s.fail_step, curve


@functools.lru_cache(maxsize=None)
def _program(iters: int):
    one = functools.partial(train_run, iters=iters)
    return jax.jit(jax.vmap(one, in_axes=(0, 0, 0, 0, 0, None, None, None, None, None)))


def loader_order(rng: np.random.Generator, size: int, batch: int, iters: int) -> np.ndarray:
    """The samples a shuffled, drop-last loader of ``size`` samples gives ``iters`` iterations, restarted (a new
    shuffle) whenever exhausted, as upstream's train loop: [iters, batch] indices."""
    per_pass = size // batch
    passes = math.ceil(iters / per_pass)
    order = np.concatenate([rng.permutation(size)[: per_pass * batch] for _ in range(passes)])
    return order[: iters * batch].reshape(iters, batch).astype(np.int32)


def image_samples(job: Job) -> tuple[np.ndarray, np.ndarray, bool]:
    """The image training samples of the pool: its plain features and, when the cache has views, the first cached
    augmented view of each row (upstream: the centre crop and one flipped view) -> (features [M*V,D] with row r's
    view j at r*V + j, labels [M*V], whether the views were there)."""
    plain = peers.plain_features(job)
    views, has_views = peers.augmented_views(job)
    stacked = np.stack([plain, views[:, 0]], axis=1) if has_views else plain[:, None]
    per_row = stacked.shape[1]
    return stacked.reshape(-1, plain.shape[1]), np.repeat(peers.pool_labels(job), per_row), has_views


def fit(job: Job, iters: int = ITERS) -> Fitted:
    """Cross-modal adaptation's trainer (``methods.Method.fit``) for one group of runs of one batch size: every
    run (seed x lr x weight decay) at once; batches drawn on the host by each run's seed (the same order for every
    setting of a seed); the checkpoint best on the run's own validation rows. The image pool is padded to
    ``job.buckets`` and the validation rows to a power of two, so that one program serves every shot count."""
    images, image_y, has_views = image_samples(job)
    per_row = len(images) // len(job.pool_rows)
    pad = max(0, job.buckets.pool - len(job.pool_rows)) * per_row  # zero rows no run indexes: one program for all K
    images = np.concatenate([images, np.zeros((pad, images.shape[1]), np.float32)])
    image_y = np.concatenate([image_y, np.zeros(pad, image_y.dtype)]).astype(np.int32)
    runs, n = job.rows.shape
    classes, dim = job.text.shape
    batch = {s.batch_size for s in job.settings}
    if len(batch) != 1:
        raise TrainError(f"cross_modal_lp trains one batch size per group, got {sorted(batch)}")
    b_img, b_txt = halves(batch.pop())
    if not admits(b_img + b_txt, classes, n * per_row):
        raise TrainError(f"cross_modal_lp: batch size {b_img + b_txt} needs more than {b_txt} classes and {b_img} "
                         f"image samples (upstream skips it); this run has {classes} and {n * per_row}")
    orders = {}
    for seed in dict.fromkeys(int(s) for s in job.seeds):
        rng_img, rng_txt = (np.random.default_rng([seed, stream, b_img]) for stream in (0, 1))
        k = loader_order(rng_img, n * per_row, b_img, iters)  # sample k: view k // n of the run's k % n-th shot
        orders[seed] = (k, loader_order(rng_txt, classes, b_txt, iters))
    flat = lambda rows, k: (rows[k % n] * per_row + k // n).astype(np.int32)  # noqa: E731
    image_idx = np.stack([flat(rows, orders[int(seed)][0]) for rows, seed in zip(job.rows, job.seeds)])
    text_idx = np.stack([orders[int(seed)][1] for seed in job.seeds])
    lr = np.array([s.lr for s in job.settings], np.float32)
    wd = np.array([s.weight_decay for s in job.settings], np.float32)
    val_x, val_y, members = peers.padded_validation(job)
    per_run = (image_idx, text_idx, lr, wd, members)
    shared = (images, image_y, job.text, val_x, val_y)
    run_bytes = 4 * (5 * classes * dim + iters * (b_img + b_txt) + (b_img + b_txt + len(val_y)) * (dim + classes))
    w, failed, fail_step, curve = peers.run_chunked(
        lambda per, *sh: _program(iters)(*per, *sh), per_run, shared, runs, run_bytes, job.budget, job.devices)
    settings = [dataclasses.replace(s, use_aug=has_views) for s in job.settings]
    note = "" if has_views else peers.no_views_note(
        "cross_modal_lp", job.dataset, "its image samples are the plain features alone, without an augmented view")
    return Fitted({"W": w}, {}, failed, fail_step.astype(np.int32), peers.last_finite(curve), settings, note,
                  np.asarray(curve, np.float32))
