"""The training-free methods, fitted in closed form for every run (seed) at once on its shots, with their one
hyperparameter search on the run's own few-shot validation rows (``Job.members``):

- ``tip_adapter``: training-free Tip-Adapter (Zhang et al., ECCV 2022; gaopengcuhk/Tip-Adapter d0e2d6f,
  ``main.py: run_tip_adapter``, ``utils.py: build_cache_model, search_hp``): keys K = the shots' features (the
  normalised mean of each shot's augmented views), values L = their one-hot labels, logits
  ``100 v T^T + alpha exp(-beta (1 - v K^T)) L``, (beta, alpha) searched on the dataset's grid (``baselines``);
- ``gda``: Gaussian discriminant analysis (Wang et al., ICLR 2024; mrflogs/ICLR24 560fe21,
  ``main_few_shots.py: run``): every augmented view of every shot is a sample; class means mu [C,D] and the
  precision ``D [(n - 1) S + tr(S) I]^+`` of the shared covariance S (n samples), the linear classifier
  ``v W^T + b``, ``W = mu P``, ``b_c = log(1/C) - mu_c P mu_c^T / 2`` it implies, added to zero-shot CLIP as
  ``100 v T^T + alpha (v W^T + b)``, alpha the first best of the authors' 7 values on validation.

Without cached views both use each shot's plain (centre-crop) feature instead, and their runs' notes say so.
Validation-free (``--select none``) neither searches: Tip-Adapter takes upstream's init beta 1 and the dataset's
init alpha (``configs/<dataset>.yaml``, what its ``main.py`` evaluates before the search), GDA alpha 0.1
(``GDA_NO_HIT_ALPHA``, the ``best_alpha`` its code starts from and keeps without a better validation accuracy).
"""

from __future__ import annotations

import dataclasses
import functools
from dataclasses import dataclass

import jax
import jax.numpy as jnp
import numpy as np

from data.cache import l2_normalize
from train_jax import baselines
from train_jax.config import Settings
from train_jax.layout import equal_chunks
from train_jax.losses import cross_entropy
from train_jax.runner import memory_budget
from train_jax.trainers import Fitted, Job

FORCED = {"logit_scale": 100.0}  # both upstreams add 100 v T^T, whatever the model's own scale
GDA_ALPHAS = np.array([1e-4, 1e-3, 1e-2, 0.1, 1.0, 10.0, 100.0], np.float32)  # main_few_shots.py's grid
GDA_NO_HIT_ALPHA = 0.1  # upstream's initial best_alpha: kept when no alpha gets a validation image right
NO_VIEWS = ("{method} on {dataset}: the cache has no augmented views, so {what} the plain (centre-crop) feature of "
            "each shot, not its authors' 10 augmented views (extract with --aug-views 10)")


def _shot_views(job: Job) -> tuple[np.ndarray, np.ndarray, str]:
    """The pooled shots' views [M,A,D] (unit rows; the cached augmented views, or the plain feature as the one
    view when the cache has none), labels [M] int32 and the note for the plain case ("" otherwise)."""
    aug = job.split.aug_features
    views = aug[job.pool_rows] if aug is not None else job.split.features[job.pool_rows][:, None]
    return l2_normalize(views), job.split.labels[job.pool_rows].astype(np.int32), "" if aug is not None else "plain"


def _budget(job: Job) -> int:
    return job.budget if job.budget is not None else memory_budget(list(job.devices or jax.devices()))


def _fitted(params, consts, settings: list[Settings], note: str) -> Fitted:
    """A closed-form fit's Fitted: failed where a parameter is not finite; no loss, no epochs."""
    leaves = jax.tree.leaves(params)
    failed = ~np.all([np.all(np.isfinite(x.reshape(len(x), -1)), axis=1) for x in leaves], axis=0)
    runs = len(settings)
    return Fitted(params, consts, failed, np.where(failed, 0, -1).astype(np.int32), np.full(runs, np.nan, np.float32),
                  settings, note)


# ---- Tip-Adapter ----------------------------------------------------------------------------------------------

@dataclass(frozen=True)
class TipCacheHead(baselines.TipAdapterHead):
    """Tip-Adapter-F's head (keys from the shots, one-hot values, the same logits), used untrained: its own class,
    so that the experiment never groups its runs with Tip-Adapter-F's (a group is one head and one trainer)."""


@functools.partial(jax.jit, static_argnames="head")
def _cache_models(head, feats: jax.Array, labels: jax.Array, text: jax.Array):
    """``head.init`` of every run: feats [S,N,D] (each shot's mean view), labels [S,N], text [C,D]."""
    return jax.vmap(head.init, in_axes=(0, 0, None))(feats, labels, text)


def tip_adapter_fit(job: Job) -> Fitted:
    """Training-free Tip-Adapter (``methods.Method.fit``): each run's cache model from its shots
    (``baselines.TipAdapterHead.init`` on each shot's mean view), then its (beta, alpha) searched on its own
    validation rows over the dataset's grid (``baselines.recipe``), runs in chunks that fit the memory budget;
    validation-free (``Job.validation_free``): upstream's init beta 1 and the dataset's init alpha, no search.
    The keys are the shots themselves, so the models' shapes follow the shot count (no buckets)."""
    views, labels, plain = _shot_views(job)
    params, consts = jax.device_get(_cache_models(job.head, views.mean(axis=1)[job.rows], labels[job.rows],
                                                  job.text))
    rec = baselines.recipe(job.dataset)
    runs, n = job.rows.shape
    if job.validation_free:  # upstream's init beta and alpha, which it evaluates before its search
        return _fitted(params, consts, [dataclasses.replace(s, **FORCED, beta=1.0, alpha=float(rec.init_alpha))
                                        for s in job.settings], _tip_note(job, plain))
    own = int(job.members.sum(axis=1).max(initial=0))
    dim, classes = job.text.shape[1], job.text.shape[0]
    per_run = 4 * (3 * own * n + own * (dim + 2 * classes) + n * (dim + classes))
    betas, alphas = np.zeros(runs, np.float32), np.zeros(runs, np.float32)
    for idx in equal_chunks(runs, per_run, _budget(job)):
        part = jax.tree.map(lambda x: x[idx], (params, consts))
        betas[idx], alphas[idx] = baselines.search_runs(*part, job.val_feats, job.val_labels, job.members[idx],
                                                        job.text, rec.scale, FORCED["logit_scale"])
    settings = [dataclasses.replace(s, **FORCED, beta=float(b), alpha=float(a))
                for s, b, a in zip(job.settings, betas, alphas)]
    return _fitted(params, consts, settings, _tip_note(job, plain))


def _tip_note(job: Job, plain: str) -> str:
    return NO_VIEWS.format(method="tip_adapter", dataset=job.dataset, what="its cache keys are") if plain else ""


# ---- GDA --------------------------------------------------------------------------------------------------------

def gda_classifier(samples: jax.Array, labels: jax.Array, valid: jax.Array, classes: int) -> dict[str, jax.Array]:
    """The GDA classifier of the valid shots: samples [N,A,D] (A views of each shot, every one a sample), labels
    [N] int, valid [N] bool (rows past the real ones pad) -> {"W": [C,D], "b": [C]}. The precision is upstream's
    ``D * pinv((n - 1) S + tr(S) I)`` with S the sample covariance (normalised by n - 1) of the samples centred on
    their class means; its pinv cuts eigenvalues below ``D * eps`` of the largest (torch.linalg.pinv's default)."""
    dim, views = samples.shape[2], samples.shape[1]
    onehot = jax.nn.one_hot(labels, classes, dtype=jnp.float32) * valid[:, None]  # [N,C]
    counts = views * jnp.sum(onehot, axis=0)
    means = jnp.einsum("nc,nad->cd", onehot, samples) / jnp.maximum(counts, 1.0)[:, None]
    centred = (samples - (onehot @ means)[:, None]) * valid[:, None, None]
    flat = centred.reshape(-1, dim)
    scatter = flat.T @ flat  # (n - 1) S
    n = views * jnp.sum(valid)
    ridge = jnp.trace(scatter) / (n - 1)  # tr(S)
    precision = dim * jnp.linalg.pinv(scatter + ridge * jnp.eye(dim), rtol=dim * jnp.finfo(jnp.float32).eps,
                                      hermitian=True)
    weights = means @ precision
    return {"W": weights, "b": jnp.log(1.0 / classes) - 0.5 * jnp.sum(weights * means, axis=1)}


def gda_logits(params, feats: jax.Array) -> jax.Array:
    """The GDA classifier's logits: feats [B,D] -> [B,C]."""
    return feats @ params["W"].T + params["b"]


@dataclass(frozen=True)
class GDAHead:
    """``s * v T^T + alpha * (v W^T + b)``: the GDA classifier (W [C,D], b [C]) added to zero-shot CLIP. ``init``
    fits it on the given rows (one sample each); its loss is the logits' cross-entropy."""

    def init(self, feats, labels, text):
        return gda_classifier(feats[:, None], labels, jnp.ones(labels.shape, bool), text.shape[0]), {}

    def logits(self, params, consts, feats, zs_cos, text, hp):
        return hp["logit_scale"] * zs_cos + hp["alpha"] * gda_logits(params, feats)

    def loss(self, params, consts, feats, zs_cos, labels, text, hp):
        return cross_entropy(self.logits(params, consts, feats, zs_cos, text, hp), labels)


@functools.partial(jax.jit, static_argnames="classes")
def _gda_runs(views: jax.Array, labels: jax.Array, rows: jax.Array, n: jax.Array, *, classes: int):
    """``gda_classifier`` of S runs: pool views [M,A,D], labels [M], each run's rows [S,N] of which the first n
    (traced, so one program serves every shot count) are its own -> params with leading axis S."""
    valid = jnp.arange(rows.shape[1]) < n
    return jax.vmap(lambda r: gda_classifier(views[r], labels[r], valid, classes))(rows)


@jax.jit
def _gda_hits(params, feats: jax.Array, labels: jax.Array, members: jax.Array, zs_logits: jax.Array,
              alphas: jax.Array) -> jax.Array:
    """Correct predictions of every run (params with leading axis S) on its own rows (members [S,Nv]) of
    feats [Nv,D], labels [Nv], for every alpha [A]: zs_logits [Nv,C] -> [S,A] int32."""

    def one(p, own):
        logits = zs_logits[None] + alphas[:, None, None] * gda_logits(p, feats)[None]
        return jnp.sum((jnp.argmax(logits, axis=-1) == labels) & own, axis=-1, dtype=jnp.int32)

    return jax.vmap(one)(params, members)


def gda_search(params, feats: np.ndarray, labels: np.ndarray, members: np.ndarray, text: np.ndarray,
               logit_scale: float = 100.0) -> np.ndarray:
    """Upstream's choice of alpha for S models on their own validation rows (members [S,Nv] of feats [Nv,D],
    labels [Nv]): the first alpha of ``GDA_ALPHAS`` with the best accuracy (its strict ">"), or
    ``GDA_NO_HIT_ALPHA`` where none gets an image right -> [S] float32."""
    zs_logits = logit_scale * (np.asarray(feats, np.float32) @ np.asarray(text, np.float32).T)
    hits = np.asarray(_gda_hits(params, feats, labels, members, zs_logits, GDA_ALPHAS))
    return np.where(hits.max(axis=1) > 0, GDA_ALPHAS[np.argmax(hits, axis=1)], GDA_NO_HIT_ALPHA).astype(np.float32)


def gda_fit(job: Job) -> Fitted:
    """GDA (``methods.Method.fit``): each run's classifier from every view of its shots, in chunks of runs that
    fit the memory budget, rows per run and the pool padded to ``job.buckets`` (one program for every shot
    count); then its alpha chosen on its own validation rows (``gda_search``), or, validation-free
    (``Job.validation_free``), the settings' alpha (the method's fixed default)."""
    views, labels, plain = _shot_views(job)
    pad = max(0, job.buckets.pool - len(labels))  # zero rows no run's own rows index
    views = np.concatenate([views, np.zeros((pad,) + views.shape[1:], np.float32)])
    labels = np.concatenate([labels, np.zeros(pad, np.int32)])
    runs, n = job.rows.shape
    rows = np.pad(job.rows, ((0, 0), (0, max(0, job.buckets.rows - n))))  # padded rows: past n, masked out
    dim, classes, count = views.shape[2], job.text.shape[0], rows.shape[1] * views.shape[1]
    per_run = 4 * (2 * count * dim + 4 * dim * dim + 2 * classes * dim)
    outs = [_gda_runs(views, labels, rows[idx], np.int32(n), classes=classes)
            for idx in equal_chunks(runs, per_run, _budget(job))]
    params = jax.tree.map(lambda *x: np.concatenate(x)[:runs], *jax.device_get(outs))
    if job.validation_free:  # the settings' alpha: the method's fixed default (GDA_NO_HIT_ALPHA)
        settings = [dataclasses.replace(s, **FORCED) for s in job.settings]
    else:
        alphas = gda_search(params, job.val_feats, job.val_labels, job.members, job.text, FORCED["logit_scale"])
        settings = [dataclasses.replace(s, **FORCED, alpha=float(a)) for s, a in zip(job.settings, alphas)]
    what = "its class means and covariance are estimated from"
    return _fitted(params, {}, settings, NO_VIEWS.format(method="gda", dataset=job.dataset, what=what) if plain else "")
