"""LP++ (Huang et al., CVPR 2024, "LP++: a surprisingly strong linear probe for few-shot CLIP") as its authors run
it: FereshteShakeri/FewShot-CLIP-Strong-Baseline at f81054f995b060f8348d20e7306e15889b70c786
(``methods/linear_probe_p2.py``, ``methods/utils.py``, ``configs/base.yaml``).

Logits ``v W^T + b + alpha (.) v T^T``: a linear probe (W [C,D], b [C]) plus the text logits (prototypes T [C,D],
unscaled) weighted by learned class-wise ratios alpha [C]. Full-batch training for 300 epochs on the n shots'
features F (one augmented view per image, L2-normalised), with the authors' data-derived step sizes and
initialisation:
- W starts at the class sums of F (``compute_centroids`` sums, it does not average), b at torch's ``nn.Linear``
  default (uniform in +-1/sqrt(D)), every alpha_c at ``mean_c 250 * mean_{i in c} f_i . t_c``;
- W and b: SGD with momentum 0.9 at ``lr_w = 4n / lambda_max(F^T F)``, one step per epoch;
- alpha: every 10th epoch ``alpha -= lr_alpha * grad`` with ``lr_alpha = n / (4 max_c sum_i (f_i . t_c)^2)``, where
  grad is the *sum* of alpha's gradients over all epochs so far (upstream never zeroes alpha's gradient; only the
  optimiser's parameters W, b are zeroed);
- after each epoch, the model is kept if its validation accuracy is >= the best so far (later epochs win ties).
"""

from __future__ import annotations

import dataclasses
import functools
from dataclasses import dataclass
from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
import optax

from train_jax import peers
from train_jax.trainers import Fitted, Job

EPOCHS, MOMENTUM, ALPHA_EVERY, ALPHA_INIT_SCALE = 300, 0.9, 10, 250.0
FORCED = {"epochs": EPOCHS}


def lpp_logits(params, x: jax.Array, zs: jax.Array) -> jax.Array:
    """LP++'s logits ``x W^T + b + alpha (.) zs``: x [B,D], zs = x T^T [B,C] -> [B,C]."""
    return x @ params["W"].T + params["b"] + params["alpha"] * zs


def objective(params, x: jax.Array, zs: jax.Array, y: jax.Array, valid: jax.Array, n) -> jax.Array:
    """Mean cross-entropy of ``lpp_logits`` over the valid rows (n of them) of x [N,D], zs [N,C], y [N]."""
    ce = optax.softmax_cross_entropy_with_integer_labels(lpp_logits(params, x, zs), y)
    return jnp.sum(jnp.where(valid, ce, 0.0)) / n


class Start(NamedTuple):
    """LP++'s data-derived start of one run: params {W [C,D], b [C], alpha [C]}, lr_w and lr_alpha scalars."""

    params: dict
    lr_w: jax.Array
    lr_alpha: jax.Array


def top_eigenvalue(x: np.ndarray) -> float:
    """The largest eigenvalue of ``x^T x`` (x [N,D]), in float64 on the host (LAPACK through numpy: XLA's CPU
    eigensolver takes seconds where this takes a fraction of one), from the smaller of the two Gram matrices."""
    x = np.asarray(x, np.float64)
    return float(np.linalg.eigvalsh(x.T @ x if x.shape[1] <= x.shape[0] else x @ x.T)[-1])


def start(x: jax.Array, zs: jax.Array, y: jax.Array, valid: jax.Array, n, bias: jax.Array, top_eig) -> Start:
    """Upstream's initialisation and step sizes from the valid rows (n) of x [N,D], zs [N,C], y [N]; bias [C] is the
    run's draw of torch's default bias init, top_eig the largest eigenvalue of x^T x (``top_eigenvalue``)."""
    onehot = jax.nn.one_hot(y, zs.shape[1], dtype=jnp.float32) * valid[:, None]
    x = jnp.where(valid[:, None], x, 0.0)
    zs = jnp.where(valid[:, None], zs, 0.0)
    lr_w = 4.0 * n / top_eig
    per_class = jnp.sum(onehot * zs, axis=0) / jnp.maximum(jnp.sum(onehot, axis=0), 1.0)  # mean_{i in c} f_i.t_c
    alpha0 = jnp.mean(ALPHA_INIT_SCALE * per_class)
    lr_alpha = n / (4.0 * jnp.max(jnp.sum(zs * zs, axis=0)))
    params = {"W": onehot.T @ x, "b": bias, "alpha": jnp.full(zs.shape[1], alpha0, jnp.float32)}
    return Start(params, lr_w, lr_alpha)


@dataclass(frozen=True)
class LPPHead:
    """LP++'s classifier ``v W^T + b + alpha (.) v T^T``; ``init`` is its data-derived start (bias 0: the trainer
    draws it), ``loss`` its cross-entropy; ``lpp.fit`` trains it as upstream does."""

    def init(self, feats, labels, text):
        zs = feats @ text.T
        valid = jnp.ones(len(labels), bool)
        top = jnp.linalg.eigvalsh(feats.T @ feats)[-1]
        return start(feats, zs, labels, valid, len(labels), jnp.zeros(text.shape[0], jnp.float32), top).params, {}

    def logits(self, params, consts, feats, zs_cos, text, hp):
        return lpp_logits(params, feats, zs_cos)

    def loss(self, params, consts, feats, zs_cos, labels, text, hp):
        return objective(params, feats, zs_cos, labels, jnp.ones(len(labels), bool), len(labels))


class _State(NamedTuple):
    params: dict
    buf: dict  # momentum of W, b
    alpha_grad: jax.Array  # alpha's accumulated gradient [C]
    best: dict
    best_hits: jax.Array
    failed: jax.Array
    fail_step: jax.Array


def train_run(x, valid, y, bias, top_eig, members, n, text, val_x, val_y, *, epochs: int):
    """One LP++ run on its features x [N,D] (valid [N]: the first n real, the rest padding), labels y [N], bias
    init [C], the largest eigenvalue of its x^T x, its validation rows ``members`` [V] of val_x [V,D], val_y [V]
    -> (params of the kept epoch, failed, fail_step, loss per epoch [epochs], kept epoch). A run without
    validation rows keeps the last epoch."""
    zs, val_zs = x @ text.T, val_x @ text.T
    s0 = start(x, zs, y, valid, n, bias, top_eig)
    lr_w, lr_alpha = s0.lr_w, s0.lr_alpha
    grad = jax.value_and_grad(objective)
    no_val = ~jnp.any(members)

    def epoch(s: _State, e):
        loss, g = grad(s.params, x, zs, y, valid, n)
        ok = jnp.isfinite(loss) & peers.all_finite(g) & ~s.failed
        buf = {k: MOMENTUM * s.buf[k] + g[k] for k in ("W", "b")}  # torch SGD (first buffer = the gradient)
        alpha_grad = s.alpha_grad + g["alpha"]
        alpha = jnp.where((e + 1) % ALPHA_EVERY == 0, s.params["alpha"] - lr_alpha * alpha_grad, s.params["alpha"])
        new = {"W": s.params["W"] - lr_w * buf["W"], "b": s.params["b"] - lr_w * buf["b"], "alpha": alpha}
        params = jax.tree.map(lambda a, b: jnp.where(ok, a, b), new, s.params)
        hits = peers.val_hits(lpp_logits(params, val_x, val_zs), val_y, members)
        better = ok & ((hits >= s.best_hits) | no_val)
        best = jax.tree.map(lambda a, b: jnp.where(better, a, b), params, s.best)
        newly_failed = ~ok & ~s.failed
        state = _State(params, jax.tree.map(lambda a, b: jnp.where(ok, a, b), buf, s.buf),
                       jnp.where(ok, alpha_grad, s.alpha_grad), best, jnp.where(better, hits, s.best_hits),
                       s.failed | newly_failed, jnp.where(newly_failed, e, s.fail_step))
        return state, (jnp.where(ok, loss, jnp.nan), jnp.where(better, e, -1))

    p0 = s0.params
    init = _State(p0, {"W": jnp.zeros_like(p0["W"]), "b": jnp.zeros_like(p0["b"])}, jnp.zeros_like(p0["alpha"]),
                  p0, jnp.int32(-1), jnp.bool_(False), jnp.int32(-1))
    s, (curve, kept) = jax.lax.scan(epoch, init, jnp.arange(epochs))
    return s.best, s.failed, s.fail_step, curve, jnp.max(kept)


@functools.lru_cache(maxsize=None)
def _program(epochs: int):
    one = functools.partial(train_run, epochs=epochs)
    return jax.jit(jax.vmap(one, in_axes=(0,) * 6 + (None,) * 4))


def run_features(job: Job, draw_views: bool) -> tuple[np.ndarray, bool]:
    """Each run's training features [S,N,D]: per image one cached augmented view, drawn by the run's seed (upstream
    encodes each shot once through its random crop + flip); the plain features without cached views (False)."""
    views, has_views = peers.augmented_views(job)
    if not (has_views and draw_views):
        return peers.plain_features(job)[job.rows], False
    picks = np.stack([np.random.default_rng([int(seed), 0x1CC]).integers(0, views.shape[1], job.rows.shape[1])
                      for seed in job.seeds])
    return views[job.rows, picks], True


def bias_init(seed: int, classes: int, dim: int) -> np.ndarray:
    """A draw of torch's ``nn.Linear`` bias init, uniform in [-1/sqrt(D), 1/sqrt(D)), by seed: [C] float32."""
    bound = 1.0 / np.sqrt(dim)
    return np.random.default_rng([int(seed), 0xB1A5]).uniform(-bound, bound, classes).astype(np.float32)


def fit(job: Job, epochs: int = EPOCHS) -> Fitted:
    """LP++'s trainer (``methods.Method.fit``): every run at once, full batch, rows padded to ``job.buckets``
    (padded rows masked out) and validation rows to a power of two, so that one program serves every shot count;
    the model of the best validation epoch on each run's own validation rows."""
    x, has_views = run_features(job, draw_views=True)
    runs, n = job.rows.shape
    classes, dim = job.text.shape
    size = max(n, job.buckets.rows)
    x = np.concatenate([x, np.zeros((runs, size - n, dim), np.float32)], axis=1)
    y = np.concatenate([peers.pool_labels(job)[job.rows], np.zeros((runs, size - n), np.int32)], axis=1)
    valid = np.broadcast_to(np.arange(size) < n, (runs, size))
    bias = np.stack([bias_init(seed, classes, dim) for seed in job.seeds])
    top = np.array([top_eigenvalue(run[:n]) for run in x], np.float32)
    val_x, val_y, members = peers.padded_validation(job)
    per_run = (x, valid, y, bias, top, members)
    shared = (np.float32(n), job.text, val_x, val_y)
    run_bytes = 4 * (size * (dim + 4 * classes) + 8 * classes * (dim + 2))
    best, failed, fail_step, curve, _ = peers.run_chunked(
        lambda per, *sh: _program(epochs)(*per, *sh), per_run, shared, runs, run_bytes, job.budget, job.devices)
    settings = [dataclasses.replace(s, use_aug=has_views) for s in job.settings]
    note = "" if has_views else peers.no_views_note(
        "lp_plus_plus", job.dataset, "it trains on the plain features, not on one augmented view per image")
    return Fitted(best, {}, failed, fail_step.astype(np.int32), peers.last_finite(curve), settings, note,
                  np.asarray(curve, np.float32))
