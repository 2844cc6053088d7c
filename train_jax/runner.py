"""The compiled training and prediction programs over a run axis S (seeds x settings), and their placement.

One program trains S runs of one head at once: ``step.train_run`` trains one stream (runs sharing a seed and rows,
folded into one wider step); the runner applies it over the streams of a ``layout.plan_training`` plan (vmap, or
``lax.map`` in CPU groups), cuts the stream axis into the plan's chunks and shards each chunk over all given JAX
devices (``jax.shard_map``: each device trains its share). Each run has its own hyperparameters (arrays [S]), its
own training rows (indices into a shared feature pool) and its own seed (batch order, augmented-view draws).

A program's shapes do not depend on the shot count: ``train_runs`` pads rows per run and the pool to ``Buckets``
(e.g. those of a sweep's largest shot count, ``shot_buckets``); the real row count n is an argument of the program,
which draws jax's permutation of the first n rows, runs ceil(n / batch) steps an epoch and masks padded rows out of
the loss. Predictions take one ``EVAL_BLOCK`` of rows per call. So one compiled program serves every shot count of
a method, and every dataset of the same class count and dim.
"""

from __future__ import annotations

import functools
import math
import os
from dataclasses import dataclass
from typing import Any, Callable, Mapping, Sequence

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec

from data.progress import progress
from train_jax.config import DYNAMIC_FIELDS, Settings
from train_jax.heads import Head
from train_jax.layout import Buckets, LayoutPolicy, chunk_size, estimate_run_bytes, plan_training
from train_jax.layout import shot_buckets  # noqa: F401  (re-exported: callers that import it from here)
from train_jax.step import train_run


Tree = Any
EVAL_BLOCK = 256  # rows per scoring call: validation sets are small (<= 4 per class), padding costs compute
HOST_ALIGN = 64  # bytes: a host array this aligned is used in place by a CPU device (jax.device_put copies no data)


def host_array(shape: Sequence[int], dtype: Any = np.float32) -> np.ndarray:
    """A zero-filled C-contiguous array aligned to ``HOST_ALIGN`` bytes: ``jax.device_put`` on a CPU device shares
    its memory instead of copying it (a pool of views of ImageNet's shots is 2 GB). Zero pages are only mapped
    when written, so unused padding costs no memory."""
    dtype = np.dtype(dtype)
    size = int(np.prod(shape)) * dtype.itemsize
    raw = np.zeros(size + HOST_ALIGN, np.uint8)
    start = -raw.ctypes.data % HOST_ALIGN
    return raw[start : start + size].view(dtype).reshape(shape)


@dataclass(frozen=True)
class Pool:
    """Training features shared by all runs: features [M,V,D] float32 (view 0 = the plain image, views 1.. =
    cached augmentations), labels [M] int32. Rows past the real ones may pad it (zeros no run's rows index):
    a pool of ``Buckets.pool`` rows made with ``host_array`` reaches a CPU device without a copy."""

    features: np.ndarray
    labels: np.ndarray


@dataclass(frozen=True)
class Trained:
    """Outputs of ``train_runs``; every leaf is a numpy array with leading axis S.

    failed [S] bool: a non-finite loss or gradient stopped the run (params are those before that step);
    fail_step [S] int32: the step at which it stopped (-1 if it did not); final_loss [S]: last finite loss;
    loss_curve [S,E] float32: each epoch's mean training loss (NaN past a run's epochs or failure; E = 0 for runs
    of a method's own trainer); loss_parts [S,E,P] float32: each epoch's mean of the head's loss parts
    (``Head.part_names``, P = 0 if it names none; None for runs of a method's own trainer).
    """

    params: Tree
    consts: Tree
    failed: np.ndarray
    fail_step: np.ndarray
    final_loss: np.ndarray
    loss_curve: np.ndarray
    loss_parts: np.ndarray | None = None


def hparam_arrays(settings: Sequence[Settings]) -> dict[str, np.ndarray]:
    """Per-run hyperparameters: each of ``DYNAMIC_FIELDS`` -> [S] (epochs int32, the rest float32)."""
    return {
        k: np.array([getattr(s, k) for s in settings], np.int32 if k == "epochs" else np.float32)
        for k in DYNAMIC_FIELDS
    }


def target_log_prob(logits: jax.Array, targets: jax.Array) -> jax.Array:
    """log softmax(logits)[target] per row: logits [B,C], targets [B] -> [B]. With d = logits - logits[target] and
    M = max(d) it is -(M + log1p(s)), s the sum of exp(d - M) without the max's own 1, so a confidently correct
    row keeps its small negative value (about -exp(-margin)) where ``jax.nn.log_softmax`` rounds it to 0."""
    d = logits - jnp.take_along_axis(logits, targets[:, None], axis=1)
    top = jnp.argmax(d, axis=1)
    m = jnp.take_along_axis(d, top[:, None], axis=1)
    rest = jnp.where(jnp.arange(d.shape[1]) == top[:, None], 0.0, jnp.exp(d - m))
    return -(m[:, 0] + jnp.log1p(jnp.sum(rest, axis=1)))


def _predict_one(params, consts, hp, blocks, targets, classes, text, *, head: Head):
    """blocks [nb, EVAL_BLOCK, D], targets [nb, EVAL_BLOCK] (true classes, indices into ``classes``) ->
    predictions [nb*EVAL_BLOCK] int32 over the class subset ``classes`` and the log-probability of the target under
    the softmax of the logits over ``classes`` [nb*EVAL_BLOCK]."""

    def block(_, xt):
        x, t = xt
        logits = head.logits(params, consts, x, x @ text.T, text, hp)[:, classes]
        return None, (jnp.argmax(logits, axis=-1).astype(jnp.int32), target_log_prob(logits, t))

    return jax.tree.map(lambda a: a.reshape(-1), jax.lax.scan(block, None, (blocks, targets))[1])


def _train_local(rows, seeds, hp, n, pool_x, pool_y, text, *, one: Callable, group: int):
    """Train one device's streams (leading axis R of the first three arguments), ``group`` at a time: one by one
    (a scan), all at once (vmap), or in vmapped groups of ``group`` (R a multiple of it). A pool of one view
    [M,1,D] gets its zero-shot cosines [M,C] computed once here, not per step."""
    zs_pool = pool_x[:, 0] @ text.T if pool_x.shape[1] == 1 else None
    train = lambda a: one(*a, n, pool_x, pool_y, zs_pool, text)  # noqa: E731
    per_stream = (rows, seeds, hp)
    if group > 1 and group >= len(seeds):
        return jax.vmap(train)(per_stream)
    return jax.lax.map(train, per_stream, batch_size=group if group > 1 else None)


@functools.lru_cache(maxsize=None)
def _train_program(head: Head, batch: int, max_epochs: int, streams: NamedSharding, group: int) -> Callable:
    """The jitted training program for one head and static shape settings, outputs split along the stream axis
    (``streams``); each device trains its share in groups of ``group`` streams; jax caches its compilations."""
    one = functools.partial(train_run, head=head, batch=batch, max_epochs=max_epochs)
    local = functools.partial(_train_local, one=one, group=group)
    split, shared = streams.spec, PartitionSpec()
    per_device = jax.shard_map(local, mesh=streams.mesh, in_specs=(split,) * 3 + (shared,) * 4, out_specs=split,
                               check_vma=False)  # no collectives: the devices' streams are independent
    return jax.jit(per_device, out_shardings=streams)


@functools.lru_cache(maxsize=None)
def _predict_program(head: Head, runs: NamedSharding) -> Callable:
    """Jitted, vmapped predictions of one head, split along the run axis."""
    return jax.jit(jax.vmap(functools.partial(_predict_one, head=head), in_axes=(0, 0, 0) + (None,) * 4),
                   out_shardings=runs)


def memory_budget(devices: Sequence[jax.Device]) -> int:
    """Bytes the run axis may use: half of the accelerators' memory, or half of the free host memory on CPU."""
    if devices[0].platform != "cpu":
        stats = [d.memory_stats() or {} for d in devices]
        if all("bytes_limit" in s for s in stats):
            return sum(s["bytes_limit"] - s.get("bytes_in_use", 0) for s in stats) // 2
    try:
        return os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE") // 2
    except (ValueError, OSError):
        return 4 << 30


class _Placement:
    """A 1-D mesh over the devices: per-run arrays split along the run axis, shared arrays replicated."""

    def __init__(self, devices: Sequence[jax.Device]):
        mesh = Mesh(np.array(devices), ("runs",))
        self.runs = NamedSharding(mesh, PartitionSpec("runs"))
        self.shared = NamedSharding(mesh, PartitionSpec())

    def split(self, tree: Tree, start: int, size: int) -> Tree:
        """Rows [start, start+size) of every leaf, padded by repeating row ``start``, placed along the first axis."""

        def take(x):
            idx = np.arange(start, start + size)
            return jax.device_put(np.asarray(x)[np.where(idx < len(x), idx, start)], self.runs)

        return jax.tree.map(take, tree)

    def replicate(self, tree: Tree) -> Tree:
        return jax.tree.map(lambda x: None if x is None else jax.device_put(x, self.shared), tree)


def _gather(chunks: list[Tree], runs: int) -> Tree:
    return jax.tree.map(lambda *xs: np.concatenate([np.asarray(x) for x in xs])[:runs], *chunks)


def _plan(devices, units: int, per_unit: int, budget: int | None) -> tuple[_Placement, int]:
    devices = list(devices or jax.devices())
    chunk = chunk_size(units, per_unit, memory_budget(devices) if budget is None else budget, len(devices))
    return _Placement(devices), chunk


def _rows_shape_free(head: Head, n: int, dim: int, text: np.ndarray) -> bool:
    """Whether ``head.init``'s outputs have the same shapes for n and n + 1 training rows."""
    def shapes(m):
        feats, labels = jax.ShapeDtypeStruct((m, dim), jnp.float32), jax.ShapeDtypeStruct((m,), jnp.int32)
        return jax.tree.map(lambda x: x.shape, jax.eval_shape(head.init, feats, labels, text))

    return shapes(n) == shapes(n + 1)


def train_runs(
    head: Head,
    hp: Mapping[str, np.ndarray],
    rows: np.ndarray,
    seeds: np.ndarray,
    pool: Pool,
    text: np.ndarray,
    *,
    batch_size: int,
    use_aug: bool,
    buckets: Buckets = Buckets(),
    budget: int | None = None,
    devices: Sequence[jax.Device] | None = None,
    max_stream: int | None = None,
    policy: LayoutPolicy = LayoutPolicy(),
    desc: str = "train",
) -> Trained:
    """Train S runs of ``head``. hp: field -> [S] (see ``hparam_arrays``); rows [S,N] int indices into the pool
    (N equal for all runs); seeds [S] int (batch order, view draws); text [C,D] prototypes. Without ``use_aug``
    only view 0 of the pool is used and the zero-shot cosines are computed once for the whole pool.
    ``buckets``: padded sizes to compile for (default: the actual ones; the runs' results do not depend on them);
    ``budget``: bytes for the run axis (default ``memory_budget``); ``devices``: default all JAX devices;
    ``max_stream``: most runs per stream (default ``layout.stream_limit``); ``policy``: the layout's thresholds.
    """
    runs, n = rows.shape
    dim = pool.features.shape[2]
    size = max(n, buckets.rows) if _rows_shape_free(head, n, dim, text) else n
    batch = min(batch_size, size)
    max_epochs = int(np.max(hp["epochs"]))
    shapes = jax.eval_shape(head.init, jax.ShapeDtypeStruct((size, dim), jnp.float32),
                            jax.ShapeDtypeStruct((size,), jnp.int32), text)
    n_params, n_consts = (sum(x.size for x in jax.tree.leaves(t)) for t in shapes)
    devices = list(devices or jax.devices())
    platform = devices[0].platform
    rows = np.asarray(rows, np.int32)
    rows = np.concatenate([rows, np.repeat(rows[:, :1], size - n, axis=1)], axis=1)  # pads repeat a run's row
    plan = plan_training(rows, np.asarray(seeds, np.int32),
                         per_run=estimate_run_bytes(n_params, n_consts, batch, dim, text.shape[0], size),
                         n_params=n_params, batch=batch, platform=platform, n_devices=len(devices),
                         budget=memory_budget(devices) if budget is None else budget, max_stream=max_stream,
                         policy=policy)
    streams, chunk = plan.streams, plan.chunk
    n_streams, k = streams.index.shape
    placement = _Placement(devices)
    train = _train_program(head, batch, max_epochs, placement.runs, plan.group)

    pad = max(0, buckets.pool - len(pool.labels))
    pool_x = pool.features if use_aug else pool.features[:, :1]
    if pad:  # a pool padded by its maker is used as it is (no copy of the views; see ``host_array``)
        pool_x = np.concatenate([pool_x, np.zeros((pad,) + pool_x.shape[1:], np.float32)])
    pool_y = np.concatenate([pool.labels, np.zeros(pad, pool.labels.dtype)]).astype(np.int32)
    n_d, pool_x, pool_y, text_d = placement.replicate((np.int32(n), pool_x, pool_y, text))
    stream_args = (streams.rows, streams.seeds, {f: np.asarray(v)[streams.index] for f, v in hp.items()})
    outputs = []
    for start in progress(range(0, n_streams, chunk), desc=desc, unit="chunk", leave=False):
        rows_c, seeds_c, hp_c = placement.split(stream_args, start, chunk)
        outputs.append(jax.device_get(train(rows_c, seeds_c, hp_c, n_d, pool_x, pool_y, text_d)))
    per_run = jax.tree.map(lambda x: x.reshape(n_streams * k, *x.shape[2:])[streams.slot], _gather(outputs, n_streams))
    return Trained(*per_run)


def predict_runs(
    head: Head,
    trained: Trained,
    hp: Mapping[str, np.ndarray],
    feats: np.ndarray,
    text: np.ndarray,
    classes: np.ndarray | None = None,
    *,
    budget: int | None = None,
    devices: Sequence[jax.Device] | None = None,
    desc: str = "predict",
) -> np.ndarray:
    """Predictions of every trained run on shared features [Ne,D] -> [S,Ne] int32, as indices into ``classes``
    ([Cs] class ids of ``text``; default all classes)."""
    return _predict(head, trained, hp, feats, None, text, classes, budget, devices, desc)


def score_runs(
    head: Head,
    trained: Trained,
    hp: Mapping[str, np.ndarray],
    feats: np.ndarray,
    labels: np.ndarray,
    text: np.ndarray,
    *,
    budget: int | None = None,
    devices: Sequence[jax.Device] | None = None,
    desc: str = "score",
) -> tuple[np.ndarray, np.ndarray]:
    """Predictions [S,Ne] int32 of every trained run on features [Ne,D] with labels [Ne] (class ids of ``text``),
    and the log-probability of each row's label under the run's softmax over all classes [S,Ne] float32."""
    return _predict(head, trained, hp, feats, labels, text, None, budget, devices, desc)


def _predict(head: Head, trained: Trained, hp: Mapping[str, np.ndarray], feats: np.ndarray, labels: np.ndarray | None,
             text: np.ndarray, classes: np.ndarray | None, budget: int | None,
             devices: Sequence[jax.Device] | None, desc: str) -> Tree:
    """``predict_runs`` (labels None: predictions [S,Ne]) and ``score_runs`` (labels [Ne]: a pair of [S,Ne]). One
    program call per ``EVAL_BLOCK`` rows, so that sets of any size share one compiled program; predictions alone
    run the scoring program too (on targets 0, scores dropped): one program per head, not two."""
    runs = len(trained.failed)
    classes = np.arange(text.shape[0]) if classes is None else np.asarray(classes)
    n_params = sum(np.asarray(x)[0].size for x in jax.tree.leaves((trained.params, trained.consts)))
    per_run = 4 * (n_params + EVAL_BLOCK * (2 * text.shape[0] + text.shape[1]))
    placement, chunk = _plan(devices, runs, per_run, budget)
    predict = _predict_program(head, placement.runs)

    n = len(feats)
    padded = math.ceil(max(n, 1) / EVAL_BLOCK) * EVAL_BLOCK
    blocks = np.zeros((padded, feats.shape[1]), np.float32)
    blocks[:n] = feats
    targets = np.zeros(padded, np.int32)
    targets[:n] = 0 if labels is None else labels
    per_block = [placement.replicate(xt) for xt in zip(blocks.reshape(-1, 1, EVAL_BLOCK, feats.shape[1]),
                                                        targets.reshape(-1, 1, EVAL_BLOCK))]
    shared = placement.replicate((classes.astype(np.int32), text))
    outputs = []
    for start in progress(range(0, runs, chunk), desc=desc, unit="chunk", leave=False):
        params, consts, hp_c = placement.split((trained.params, trained.consts, dict(hp)), start, chunk)
        parts = [predict(params, consts, hp_c, x, t, *shared) for x, t in per_block]  # dispatched before a wait
        outputs.append(jax.tree.map(lambda *xs: np.concatenate(xs, axis=1), *jax.device_get(parts)))
    preds, logp = jax.tree.map(lambda x: x[:, :n], _gather(outputs, runs))
    return preds if labels is None else (preds, logp)
