"""Tip-Adapter-F (Zhang et al. 2022) as its authors run it (Tip-Adapter ``main.py``, ``utils.py`` and
``configs/*.yaml``): cache keys from the augmented views, fine-tuned with AdamW (eps 1e-4, cosine, no warm-up)
at fixed beta 1 and a per-dataset alpha, then a 200 x 20 search of (beta, alpha) -- here on the validation split.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

from data.vectors import l2_normalize
from train_jax.losses import cross_entropy, l2_normalize as unit_rows
from train_jax.runner import Pool, hparam_arrays, train_runs
from train_jax.trainers import Fitted, Job


class Recipe(NamedTuple):
    """A dataset's Tip-Adapter config: init_alpha, search_scale (beta, alpha) and train_epoch."""

    init_alpha: float
    scale: tuple[float, float]
    epochs: int


# Tip-Adapter configs/<dataset>.yaml (d0e2d6f), by this registry's dataset names; lr 1e-3, init_beta 1,
# search_step [200, 20] and augment_epoch 10 are the same for all.
RECIPES: dict[str, Recipe] = {
    "ImageNet": Recipe(1.17, (7, 3), 20), "Caltech101": Recipe(3, (12, 5), 20),
    "OxfordPets": Recipe(1.17, (7, 3), 20), "StanfordCars": Recipe(3, (20, 10), 20),
    "Flowers102": Recipe(10, (50, 50), 20), "Food101": Recipe(1.17, (10, 10), 20),
    "FGVCAircraft": Recipe(5, (30, 30), 20), "SUN397": Recipe(1.17, (12, 10), 20), "DTD": Recipe(2, (13, 13), 20),
    "EuroSAT": Recipe(2, (12, 10), 100), "UCF101": Recipe(3, (7, 3), 20),
}
OTHER = Recipe(2, (12, 10), 20)  # datasets without an upstream config (user folders): a mid-range one
SEARCH_STEPS = (200, 20)  # beta values x alpha values
FORCED = {"lr": 1e-3, "weight_decay": 1e-2, "warmup": 0.0, "adam_eps": 1e-4, "beta": 1.0, "batch_size": 256,
          "logit_scale": 100.0}  # weight decay: torch.optim.AdamW's default, which upstream keeps
NO_VIEWS = ("tip_adapter_f on {}: the cache has no augmented views, so its cache keys and training use the plain "
            "(centre-crop) features, not the recipe's 10 augmented views (extract with --aug-views 10)")


def recipe(dataset: str) -> Recipe:
    """The upstream config of ``dataset`` (case-insensitive), ``OTHER`` if it has none."""
    return {k.lower(): r for k, r in RECIPES.items()}.get(dataset.lower(), OTHER)


def search_values(scale: float, steps: int) -> np.ndarray:
    """Upstream ``search_hp``'s list: ``i * (scale - 0.1) / steps + 0.1`` for i < steps."""
    return np.array([i * (scale - 0.1) / steps + 0.1 for i in range(steps)], np.float32)


@dataclass(frozen=True)
class TipAdapterHead:
    """``s * v T^T + alpha * exp(-beta (1 - v K^T)) L``: keys K [N,D] (trainable) start as the training images'
    features (the runner passes each image's mean over the pool's views, normalised here); values L [N,C] are
    their one-hot labels (constant)."""

    def init(self, feats, labels, text):
        return {"keys": unit_rows(feats)}, {"values": jax.nn.one_hot(labels, text.shape[0], dtype=jnp.float32)}

    def logits(self, params, consts, feats, zs_cos, text, hp):
        return hp["logit_scale"] * zs_cos + hp["alpha"] * _cache_logits(params, consts, feats, hp["beta"])

    def loss(self, params, consts, feats, zs_cos, labels, text, hp):
        return cross_entropy(self.logits(params, consts, feats, zs_cos, text, hp), labels)


def _cache_logits(params, consts, feats: jax.Array, beta: jax.Array) -> jax.Array:
    return jnp.exp(-beta * (1.0 - feats @ params["keys"].T)) @ consts["values"]


def _search_hits(params, consts, feats, labels, valid, zs_logits, betas, alphas) -> jax.Array:
    """Correct predictions among the valid rows (valid [Nv] bool) of feats [Nv,D] for every (beta, alpha):
    -> [B,A] int32. The affinity v K^T is computed once for all betas."""
    affinity = feats @ params["keys"].T

    def per_beta(beta):
        cache = jnp.exp(-beta * (1.0 - affinity)) @ consts["values"]
        preds = jnp.argmax(zs_logits[None] + alphas[:, None, None] * cache[None], axis=-1)
        return jnp.sum((preds == labels) & valid, axis=-1, dtype=jnp.int32)

    return jax.lax.map(per_beta, betas)


_search_hits_runs = jax.jit(jax.vmap(_search_hits, in_axes=(0,) * 6 + (None,) * 2))


def _own_rows(members: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Each run's own rows of a shared set, members [S,Nv] bool -> (indices [S,n] into the set, valid [S,n] bool),
    n the most rows a run owns; a run with fewer repeats its first (or row 0) where valid is False."""
    n = int(members.sum(axis=1).max(initial=0))
    idx, valid = np.zeros((len(members), n), np.int64), np.zeros((len(members), n), bool)
    for i, own in enumerate(members):
        rows = np.flatnonzero(own)
        idx[i, : len(rows)], valid[i, : len(rows)] = rows, True
        idx[i, len(rows):] = rows[0] if len(rows) else 0
    return idx, valid


def search_runs(params, consts, feats: np.ndarray, labels: np.ndarray, members: np.ndarray, text: np.ndarray,
                scale: tuple[float, float], logit_scale: float = 100.0) -> tuple[np.ndarray, np.ndarray]:
    """Upstream's post-training search for S models at once (params, consts with leading axis S), each on its own
    rows (members [S,Nv] bool) of the shared validation set feats [Nv,D], labels [Nv]: the (beta, alpha) of the
    best accuracy, the first in beta-major order on ties (upstream's strict ">") -> betas [S], alphas [S]."""
    betas, alphas = (search_values(s, n) for s, n in zip(scale, SEARCH_STEPS))
    idx, valid = _own_rows(np.asarray(members, bool))
    own_feats = np.asarray(feats, np.float32)[idx]
    zs_logits = logit_scale * (own_feats @ np.asarray(text, np.float32).T)
    hits = np.asarray(_search_hits_runs(params, consts, own_feats, np.asarray(labels)[idx], valid, zs_logits,
                                        betas, alphas))
    b, a = np.unravel_index(np.argmax(hits.reshape(len(hits), -1), axis=1), hits.shape[1:])
    return betas[b], alphas[a]


def search(params, consts, feats: np.ndarray, labels: np.ndarray, text: np.ndarray, scale: tuple[float, float],
           logit_scale: float = 100.0) -> tuple[float, float]:
    """``search_runs`` for one model on all the given (validation) rows feats [Nv,D], labels [Nv]."""
    one = jax.tree.map(lambda x: np.asarray(x)[None], (params, consts))
    betas, alphas = search_runs(*one, feats, labels, np.ones((1, len(labels)), bool), text, scale, logit_scale)
    return float(betas[0]), float(alphas[0])


def fit(job: Job) -> Fitted:
    """Tip-Adapter-F's trainer (``methods.Method.fit``): the runner trains the keys with the recipe's settings
    (alpha and epochs of ``job.dataset``), drawing one cached view per image and epoch; then each run's (beta,
    alpha) are searched on its own validation rows; a validation-free job (``Job.validation_free``) keeps the
    recipe's init beta (1) and alpha, the values upstream trains with before its search. Without cached views,
    the plain features stand in (noted)."""
    rec = recipe(job.dataset)
    aug = job.split.aug_features
    views = aug[job.pool_rows] if aug is not None else job.split.features[job.pool_rows][:, None]
    pool = Pool(l2_normalize(views), job.split.labels[job.pool_rows].astype(np.int32))
    settings = [dataclasses.replace(s, **FORCED, alpha=float(rec.init_alpha), epochs=rec.epochs,
                                    use_aug=aug is not None) for s in job.settings]
    hp = hparam_arrays(settings)
    trained = train_runs(job.head, hp, job.rows, job.seeds, pool, job.text, batch_size=settings[0].batch_size,
                         use_aug=aug is not None, budget=job.budget, devices=job.devices,
                         desc=f"{job.dataset} Tip-Adapter-F")
    for i, st in enumerate([] if job.validation_free else settings):
        own = job.members[i]
        params, consts = jax.tree.map(lambda x: x[i], (trained.params, trained.consts))
        beta, alpha = search(params, consts, job.val_feats[own], job.val_labels[own], job.text, rec.scale,
                             st.logit_scale)
        settings[i] = dataclasses.replace(st, beta=beta, alpha=alpha)
    return Fitted(trained.params, trained.consts, trained.failed, trained.fail_step, trained.final_loss, settings,
                  "" if aug is not None else NO_VIEWS.format(job.dataset), trained.loss_curve)
