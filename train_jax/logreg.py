"""CoOp's "Linear probe CLIP": L2-regularised multinomial logistic regression on the image features, as
scikit-learn's ``LogisticRegression(solver="lbfgs", penalty="l2", C=C, max_iter=1000)`` that CoOp's ``lpclip``
fits, solved full-batch with optax's L-BFGS and vmapped over runs (seeds x C values).

The objective (scikit-learn's scaling; its minimiser is that of ``C * sum(CE) + ||W||^2 / 2``) is
``mean_i CE(x_i W^T + b, y_i) + ||W||^2 / (2 C N)``: the intercept b is not penalised.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass

import jax
import jax.numpy as jnp
import numpy as np
import optax
import optax.tree_utils as otu

from data.cache import l2_normalize
from train_jax.layout import equal_chunks
from train_jax.losses import cross_entropy
from train_jax.runner import memory_budget
from train_jax.trainers import Fitted, Job

MAX_ITER = 1000  # scikit-learn's max_iter as CoOp sets it
TOL = 1e-4  # scikit-learn's tol: stop when every gradient entry is at most this


def objective(params, feats: jax.Array, labels: jax.Array, c: jax.Array, valid: jax.Array | None = None) -> jax.Array:
    """The regularised loss of W [C,D], b [C] on feats [N,D], labels [N]: mean CE + ||W||^2 / (2 c N). valid [N]
    bool (default all): only these rows count, as if the others were absent (N = their count; padded rows)."""
    logits = feats @ params["W"].T + params["b"]
    if valid is None:
        return cross_entropy(logits, labels) + jnp.sum(params["W"] ** 2) / (2.0 * c * feats.shape[0])
    n = jnp.sum(valid).astype(jnp.float32)
    ce = optax.softmax_cross_entropy_with_integer_labels(logits, labels)
    return jnp.sum(jnp.where(valid, ce, 0.0)) / n + jnp.sum(params["W"] ** 2) / (2.0 * c * n)


@dataclass(frozen=True)
class LinearProbeHead:
    """The probe's linear classifier ``v W^T + b`` (W [C,D], b [C], zero-initialised); its loss is ``objective``
    on the batch with ``hp["c"]`` (the runner can train it too, as the layout tests do)."""

    def init(self, feats, labels, text):
        classes, dim = text.shape
        return {"W": jnp.zeros((classes, dim), jnp.float32), "b": jnp.zeros((classes,), jnp.float32)}, {}

    def logits(self, params, consts, feats, zs_cos, text, hp):
        return feats @ params["W"].T + params["b"]

    def loss(self, params, consts, feats, zs_cos, labels, text, hp):
        return objective(params, feats, labels, hp["c"])


def solve(feats: jax.Array, labels: jax.Array, c: jax.Array, n: jax.Array, classes: int, max_iter: int = MAX_ITER,
          tol: float = TOL) -> tuple[dict, jax.Array, jax.Array]:
    """Minimise ``objective`` on the first n rows from zeros with L-BFGS (zoom line search: strong Wolfe
    conditions, as scipy's L-BFGS-B behind scikit-learn) until every gradient entry is <= ``tol`` or ``max_iter``
    iterations. feats [N,D], labels [N], c scalar, n scalar <= N (rows past it pad) -> (params, final loss,
    iterations)."""
    params = {"W": jnp.zeros((classes, feats.shape[1]), jnp.float32), "b": jnp.zeros((classes,), jnp.float32)}
    fun = functools.partial(objective, feats=feats, labels=labels, c=c, valid=jnp.arange(len(labels)) < n)
    solver = optax.lbfgs()
    value_and_grad = optax.value_and_grad_from_state(fun)

    def step(carry):
        params, state = carry
        value, grad = value_and_grad(params, state=state)
        updates, state = solver.update(grad, state, params, value=value, grad=grad, value_fn=fun)
        return optax.apply_updates(params, updates), state

    def going(carry):
        _, state = carry
        count, grad = otu.tree_get(state, "count"), otu.tree_get(state, "grad")
        largest = otu.tree_max(jax.tree.map(jnp.abs, grad))
        return (count == 0) | ((count < max_iter) & (largest > tol) & jnp.isfinite(largest))

    params, state = jax.lax.while_loop(going, step, (params, solver.init(params)))
    return params, otu.tree_get(state, "value"), otu.tree_get(state, "count")


@functools.partial(jax.jit, static_argnames=("classes", "max_iter", "tol"))
def solve_runs(feats: jax.Array, labels: jax.Array, rows: jax.Array, c: jax.Array, n: jax.Array | None = None, *,
               classes: int, max_iter: int = MAX_ITER, tol: float = TOL) -> tuple[dict, jax.Array, jax.Array]:
    """``solve`` for S runs at once: pool feats [M,D], labels [M], each run's rows [S,N] of which the first n
    (default N; a traced scalar, so one program serves every n) are its own, and c [S] -> (params with leading
    axis S, final loss [S], iterations [S])."""
    n = rows.shape[1] if n is None else n
    one = lambda r, cc: solve(feats[r], labels[r], cc, n, classes, max_iter, tol)  # noqa: E731
    return jax.vmap(one)(rows, c)


def run_bytes(n: int, dim: int, classes: int, memory: int = 10) -> int:
    """Rough peak bytes of one solve: its rows' features, params, gradient, the L-BFGS memory (2 x ``memory``
    copies of the params) and line-search copies, and a few logits-sized temporaries."""
    return 4 * (n * dim + (2 * memory + 8) * classes * (dim + 1) + 4 * n * classes)


def fit(job: Job) -> Fitted:
    """The linear probe's trainer (``methods.Method.fit``): one L-BFGS solve per run on its training images'
    plain (centre-crop) features, in equal chunks of runs that fit the memory budget; rows per run and the pool
    are padded to ``job.buckets`` (padded rows masked out of the objective), so one compiled program serves every
    shot count. C is chosen among the settings on validation like any other setting."""
    feats = l2_normalize(job.split.features[job.pool_rows])
    labels = job.split.labels[job.pool_rows].astype(np.int32)
    pad = max(0, job.buckets.pool - len(labels))  # zero rows no run's own rows index
    feats = np.concatenate([feats, np.zeros((pad, feats.shape[1]), np.float32)])
    labels = np.concatenate([labels, np.zeros(pad, np.int32)])
    c = np.array([s.c for s in job.settings], np.float32)
    runs, (n, classes) = len(c), (job.rows.shape[1], job.text.shape[0])
    rows = np.pad(job.rows, ((0, 0), (0, max(0, job.buckets.rows - n))))  # padded rows: past n, masked out
    budget = job.budget if job.budget is not None else memory_budget(list(job.devices or jax.devices()))
    outs = [solve_runs(feats, labels, rows[idx], c[idx], np.int32(n), classes=classes)
            for idx in equal_chunks(runs, run_bytes(rows.shape[1], feats.shape[1], classes), budget)]
    params, loss, _ = jax.tree.map(lambda *x: np.concatenate(x)[:runs], *jax.device_get(outs))
    failed = ~np.isfinite(loss) | ~np.all(np.isfinite(params["W"]), axis=(1, 2))
    return Fitted(params, {}, failed, np.where(failed, 0, -1).astype(np.int32), np.asarray(loss, np.float32),
                  list(job.settings))
