"""What the peer methods' own trainers (``clap``, ``lpp``, ``cross_modal``) share: the training views of a
``trainers.Job``, validation rows padded to a size that serves several shot counts, the accuracy hits that pick a
checkpoint, and vmapped programs run over chunks of runs that fit the memory budget."""

from __future__ import annotations

import dataclasses
import math
from typing import Any, Callable, Sequence

import jax
import jax.numpy as jnp
import numpy as np

from data.cache import l2_normalize
from train_jax.runner import memory_budget
from train_jax.trainers import Job

Tree = Any


def plain_features(job: Job) -> np.ndarray:
    """The pool rows' plain (centre-crop) features, L2-normalised: [M,D] float32."""
    return l2_normalize(job.split.features[job.pool_rows])


def augmented_views(job: Job) -> tuple[np.ndarray, bool]:
    """The pool rows' cached augmented views [M,A,D] (L2-normalised) and True; without cached views the plain
    features as the one view [M,1,D] and False."""
    aug = job.split.aug_features
    if aug is None:
        return plain_features(job)[:, None], False
    return l2_normalize(aug[job.pool_rows]), True


def pool_labels(job: Job) -> np.ndarray:
    """Labels [M] int32 of the pool rows."""
    return job.split.labels[job.pool_rows].astype(np.int32)


def no_views_note(method: str, dataset: str, instead: str) -> str:
    """The results note of a trainer whose recipe needs augmented views the cache lacks."""
    return (f"{method} on {dataset}: the cache has no augmented views, so {instead} (extract with --aug-views 10 "
            "for the recipe's views)")


VAL_PER_CLASS = 4  # the most validation rows a class gives a seed (min(K, 4), data.fewshot)


def padded_validation(job: Job) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """The validation rows padded with zero rows (members False) to the power of two (at least 8) that holds the
    seeds' rows at the sweep's largest shot count (``job.buckets.rows`` / classes), so that programs compiled for
    one shot count serve the others: feats [V,D] float32, labels [V] int32, members [S,V] bool. A validation-free
    job (``Job.validation_free``) gets only padding (no member rows: its trainers keep their last iterate)."""
    if job.validation_free:
        job = dataclasses.replace(job, val_feats=np.zeros((0, job.text.shape[1]), np.float32),
                                  val_labels=np.zeros(0, np.int32), members=np.zeros((len(job.settings), 0), bool))
    n, classes = len(job.val_labels), job.text.shape[0]
    most = len(set(np.asarray(job.seeds).tolist())) * min(VAL_PER_CLASS, job.buckets.rows // classes) * classes
    size = max(8, 1 << max(0, max(n, most) - 1).bit_length())
    feats = np.zeros((size, job.text.shape[1]), np.float32)
    feats[:n] = job.val_feats
    labels = np.zeros(size, np.int32)
    labels[:n] = job.val_labels
    members = np.zeros((len(job.settings), size), bool)
    members[:, :n] = job.members
    return feats, labels, members


def val_hits(logits: jax.Array, labels: jax.Array, members: jax.Array) -> jax.Array:
    """Correct top-1 predictions among a run's own validation rows: logits [V,C], labels [V], members [V] -> int32
    scalar (a run compares its checkpoints by hits: its row count is fixed)."""
    return jnp.sum((jnp.argmax(logits, axis=-1) == labels) & members, dtype=jnp.int32)


def all_finite(tree: Tree) -> jax.Array:
    """Whether every entry of every leaf is finite (a bool scalar)."""
    return jnp.all(jnp.stack([jnp.all(jnp.isfinite(x)) for x in jax.tree.leaves(tree)]))


def last_finite(curve: np.ndarray) -> np.ndarray:
    """Each run's last finite value of its per-epoch losses [S,E] -> [S] float32 (NaN if none)."""
    curve = np.asarray(curve, np.float32)
    finite = np.isfinite(curve)
    last = np.where(finite.any(axis=1), curve.shape[1] - 1 - np.argmax(finite[:, ::-1], axis=1), 0)
    return np.where(finite.any(axis=1), curve[np.arange(len(curve)), last], np.nan).astype(np.float32)


def run_chunked(program: Callable, per_run: Tree, shared: Sequence[Any], runs: int, run_bytes: int,
                budget: int | None, devices: Sequence[Any] | None) -> Tree:
    """``program(per_run_chunk, *shared)`` over equal chunks of the run axis that fit ``budget`` bytes (default:
    ``runner.memory_budget``), the last chunk padded with copies of the last run; per_run: leaves with leading axis
    ``runs``. Returns the outputs' leaves concatenated along the run axis [runs, ...] as numpy arrays."""
    budget = budget if budget is not None else memory_budget(list(devices or jax.devices()))
    chunks = math.ceil(runs / max(1, budget // max(1, run_bytes)))
    size = math.ceil(runs / chunks)
    take = np.minimum(np.arange(chunks * size), runs - 1)
    outs = [program(jax.tree.map(lambda x: np.asarray(x)[idx], per_run), *shared)
            for idx in take.reshape(chunks, size)]
    return jax.tree.map(lambda *x: np.concatenate(x)[:runs], *jax.device_get(outs))
