"""CoOp's "Linear probe CLIP": L2-regularised multinomial logistic regression on the image features, as
scikit-learn's ``LogisticRegression(solver="lbfgs", penalty="l2", C=C, max_iter=1000)`` that CoOp's ``lpclip``
fits, solved full-batch by L-BFGS along each seed's path of C values (``train_jax.lbfgs_path``: ascending C, warm
starts, vmapped over seeds).

The objective (scikit-learn's scaling; its minimiser is that of ``C * sum(CE) + ||W||^2 / 2``) is
``mean_i CE(x_i W^T + b, y_i) + ||W||^2 / (2 C N)``: the intercept b is not penalised.
"""

from __future__ import annotations

from dataclasses import dataclass

import jax
import jax.numpy as jnp
import numpy as np
import optax

from data.cache import l2_normalize
from train_jax.layout import equal_chunks
from train_jax.lbfgs_path import MAX_ITER, MEMORY, TOL, block_rows, solve_paths
from train_jax.losses import cross_entropy
from train_jax.runner import memory_budget
from train_jax.trainers import Fitted, Job


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
    """The probe's linear classifier ``x W^T + b`` (W [C,D], b [C], zero-initialised) on raw features x (norm *
    unit feature, as CoOp's lpclip: ``raw_features``; ``heads.head_inputs``); its loss is ``objective`` on the
    batch with ``hp["c"]`` (the runner can train it too, as the layout tests do)."""

    raw_features = True

    def init(self, feats, labels, text):
        classes, dim = text.shape
        return {"W": jnp.zeros((classes, dim), jnp.float32), "b": jnp.zeros((classes,), jnp.float32)}, {}

    def logits(self, params, consts, feats, zs_cos, text, hp):
        return feats @ params["W"].T + params["b"]

    def loss(self, params, consts, feats, zs_cos, labels, text, hp):
        return objective(params, feats, labels, hp["c"])


def solve_runs(feats: jax.Array, labels: jax.Array, rows: jax.Array, c: jax.Array, n: jax.Array | None = None, *,
               classes: int, max_iter: int = MAX_ITER, tol: float = TOL) -> tuple[dict, jax.Array, jax.Array]:
    """S independent solves from zero: pool feats [M,D], labels [M], each run's rows [S,N] of which the first n
    (default N) are its own, and c [S] -> (params {"W": [S,C,D], "b": [S,C]}, final loss [S], iterations [S])."""
    n = np.shape(rows)[1] if n is None else n
    params, loss, iters = solve_paths(feats, labels, rows, jnp.asarray(c, jnp.float32)[:, None], n, classes=classes,
                                      max_iter=max_iter, tol=tol)
    return jax.tree.map(lambda x: x[:, 0], params), loss[:, 0], iters[:, 0]


def run_bytes(n: int, dim: int, classes: int, length: int = 1) -> int:
    """Rough peak bytes of one path of ``length`` C values on n rows: its rows' features, the L-BFGS pairs
    (2 x ``MEMORY`` copies of the params), a few more params-sized arrays, the result at every C, and one block's
    logits-sized temporaries."""
    params = classes * (dim + 1)
    return 4 * (n * (dim + 1) + (2 * MEMORY + 10 + length) * params + 4 * block_rows(n, dim, classes) * classes)


def _paths(seeds: np.ndarray, rows: np.ndarray, cs: np.ndarray
           ) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """Runs (seeds [S], rows [S,N], C values [S]) as paths: one per seed and row set (a seed's draw: so that the
    path count, a compiled shape, stays the seed count even where two seeds draw the same rows), its distinct C
    values ascending (padded with its largest, a repeat that costs nothing) -> (path rows [P,N], path C values
    [P,L], each run's path [S] and place on it [S])."""
    keys, path_of = np.unique(np.column_stack([seeds, rows]), axis=0, return_inverse=True)
    path_of = path_of.reshape(-1)
    values = [np.unique(cs[path_of == p]) for p in range(len(keys))]
    length = max(len(v) for v in values)
    path_cs = np.stack([np.pad(v, (0, length - len(v)), mode="edge") for v in values]).astype(np.float32)
    place = np.array([np.searchsorted(values[p], c) for p, c in zip(path_of, cs)])
    return keys[:, 1:], path_cs, path_of, place


def fit(job: Job) -> Fitted:
    """The linear probe's trainer (``methods.Method.fit``): L-BFGS on the training images' plain (centre-crop) raw
    features (norm * unit feature, as CoOp's lpclip), one path of C values per seed (its runs' C values ascending,
    each solve warm-started from the previous), in equal chunks of paths that fit the memory budget; rows per run
    and the pool are padded to ``job.buckets`` (padded rows skipped by the objective), so one compiled program
    serves every shot count. C is chosen among the settings on validation like any other setting."""
    feats = l2_normalize(job.split.features[job.pool_rows])
    if job.split.norms is not None:  # raw features (a Split made without norms: unit ones)
        feats *= job.split.norms[job.pool_rows][:, None]
    labels = job.split.labels[job.pool_rows].astype(np.int32)
    pad = max(0, job.buckets.pool - len(labels))  # zero rows no run's own rows index
    feats = np.concatenate([feats, np.zeros((pad, feats.shape[1]), np.float32)])
    labels = np.concatenate([labels, np.zeros(pad, np.int32)])
    c = np.array([s.c for s in job.settings], np.float32)
    n, classes = job.rows.shape[1], job.text.shape[0]
    path_rows, path_cs, path_of, place = _paths(np.asarray(job.seeds), job.rows, c)
    path_rows = np.pad(path_rows, ((0, 0), (0, max(0, job.buckets.rows - n))))  # padded rows: past n, skipped
    paths, length = path_cs.shape
    budget = job.budget if job.budget is not None else memory_budget(list(job.devices or jax.devices()))
    outs = [solve_paths(feats, labels, path_rows[idx], path_cs[idx], np.int32(n), classes=classes)
            for idx in equal_chunks(paths, run_bytes(path_rows.shape[1], feats.shape[1], classes, length), budget)]
    params, loss, _ = jax.tree.map(lambda *x: np.concatenate(x)[:paths], *jax.device_get(outs))
    params, loss = jax.tree.map(lambda x: x[path_of, place], params), loss[path_of, place]
    failed = ~np.isfinite(loss) | ~np.all(np.isfinite(params["W"]), axis=(1, 2))
    return Fitted(params, {}, failed, np.where(failed, 0, -1).astype(np.int32), np.asarray(loss, np.float32),
                  list(job.settings))
