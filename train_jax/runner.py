"""The vmapped, jitted training and prediction programs over a run axis S (seeds x settings).

One program trains S runs of one head at once. Each run has its own hyperparameters (arrays [S]), its own
training rows (indices into a shared feature pool) and its own seed (batch order, augmented-view draws). Runs
with the same seed and rows draw the same batches, so the runner lays the runs out as *streams*: G streams of k
runs that share a seed and rows (a seed's grid of settings). A stream draws one batch per step for its k runs,
whose parameters are stacked, so their matmuls become single products k times wider (``[B,D] x [D,k*D]`` for
the mapping, ``[k*B,D] x [D,C]`` for the logits) instead of k small ones. Inside jit, ``lax.scan`` runs over
epochs and steps; a run whose epochs are over, or whose loss/gradients became non-finite, keeps its params (the
latter is reported as failed). The stream axis is cut into equal chunks when the estimated memory is too large
(the last chunk is padded, so each chunk reuses one compiled program) and sharded over all given JAX devices
(``jax.shard_map``: each device trains its share).

On an accelerator a device trains all its streams in one vmapped step. On a CPU, streams share nothing but the
pool, so batching them buys no arithmetic efficiency, while their stacked parameters and Adam moments outgrow the
caches: there a device trains its streams in groups whose state fits in ``CPU_GROUP_BYTES``, one group after
another inside the same program.

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
from typing import TYPE_CHECKING, Any, Callable, Mapping, Sequence

import jax
import jax.numpy as jnp
import numpy as np
import optax
from jax.sharding import Mesh, NamedSharding, PartitionSpec
from tqdm import tqdm

from train_jax.config import DYNAMIC_FIELDS, Settings

if TYPE_CHECKING:  # methods imports the baselines, whose trainers use this runner
    from train_jax.methods import Head

Tree = Any
EVAL_BLOCK = 1024
CPU_GROUP_BYTES = 4 << 20  # estimate_run_bytes of the streams a CPU trains together: about a share of its caches
CPU_STREAM_BYTES = 16 << 20  # a stream's params, Adam moments and grads on a CPU: half a last-level cache
CPU_STREAM_MIN_BATCH = 64  # smaller CPU steps are bound by elementwise work, which folding runs does not shrink
STREAM_PADDING = 0.125  # plan_streams: at most this share of repeated runs to make the streams equal


@dataclass(frozen=True)
class Pool:
    """Training features shared by all runs: features [M,V,D] float32 (view 0 = the plain image, views 1.. =
    cached augmentations), labels [M] int32."""

    features: np.ndarray
    labels: np.ndarray


@dataclass(frozen=True)
class Trained:
    """Outputs of ``train_runs``; every leaf is a numpy array with leading axis S.

    failed [S] bool: a non-finite loss or gradient stopped the run (params are those before that step);
    fail_step [S] int32: the step at which it stopped (-1 if it did not); final_loss [S]: last finite loss.
    """

    params: Tree
    consts: Tree
    failed: np.ndarray
    fail_step: np.ndarray
    final_loss: np.ndarray


def hparam_arrays(settings: Sequence[Settings]) -> dict[str, np.ndarray]:
    """Per-run hyperparameters: each of ``DYNAMIC_FIELDS`` -> [S] (epochs int32, the rest float32)."""
    return {
        k: np.array([getattr(s, k) for s in settings], np.int32 if k == "epochs" else np.float32)
        for k in DYNAMIC_FIELDS
    }


def lr_multiplier(count: jax.Array, total_steps: jax.Array, warmup: jax.Array) -> jax.Array:
    """Linear warm-up over ``floor(warmup * total_steps)`` steps, then optax's cosine decay to 0 at the end."""
    count = count.astype(jnp.float32)
    warm = jnp.floor(warmup * total_steps)
    ramp = (count + 1.0) / jnp.maximum(warm, 1.0)
    decay = optax.cosine_decay_schedule(1.0, 1)((count - warm) / jnp.maximum(total_steps - warm, 1.0))
    return jnp.where(count < warm, ramp, decay)


def make_optimizer(hp: Mapping[str, jax.Array], total_steps: jax.Array) -> optax.GradientTransformation:
    """AdamW with this run's peak lr, epsilon, weight decay and warm-up + cosine schedule (the state layout does
    not depend on the values, so one ``init`` serves all runs)."""
    schedule = lambda count: hp["lr"] * lr_multiplier(count, total_steps, hp["warmup"])  # noqa: E731
    return optax.adamw(schedule, eps=hp["adam_eps"], weight_decay=hp["weight_decay"])


def _all_finite(tree: Tree) -> jax.Array:
    """Whether every entry of every leaf is finite, as one fused reduction per leaf: sum(x * 0) is 0 if all x are
    finite and NaN otherwise (inf * 0 = NaN)."""
    return jnp.isfinite(sum(jnp.sum(x * 0.0) for x in jax.tree.leaves(tree)))


def _over_runs(k: int, fn: Callable, in_axes: tuple) -> Callable:
    """``fn`` of one run applied to a stream's k runs: vmapped (``in_axes``: 0 per run, None shared) for k > 1;
    for k = 1 ``fn`` itself, which the caller gives the run's arrays without their size-1 axis (a size-1 vmap axis
    costs XLA copies and slower kernels)."""
    return jax.vmap(fn, in_axes=in_axes) if k > 1 else fn


def _shuffle_rounds(n: int | np.ndarray) -> int | np.ndarray:
    """Sorting rounds of ``jax.random.permutation`` for n elements (jax's static rule, here as numpy)."""
    return np.ceil(3 * np.log(np.maximum(1, n)) / np.log(np.iinfo(np.uint32).max)).astype(int)


def permutation_prefix(key: jax.Array, n: jax.Array, size: int) -> jax.Array:
    """``jax.random.permutation(key, n)`` for a traced n <= size, padded to [size] (positions n.. hold n..size-1):
    jax's own draws (rounds of stable sorts by random 32-bit keys, as many rounds as jax takes for n), with the
    keys of padded positions set to the largest value so that they sort last and leave the first n as they were."""
    rounds = _shuffle_rounds(np.arange(size + 1))
    x = pos = jnp.arange(size)
    for r in range(int(rounds[-1])):
        key, sub = jax.random.split(key)
        keys = jnp.where(pos < n, jax.random.bits(sub, (size,), jnp.uint32), jnp.uint32(0xFFFFFFFF))
        x = jnp.where(n >= int(np.argmax(rounds > r)), jax.lax.sort_key_val(keys, x)[1], x)
    return x


def _masked_loss(head: Head, params, consts, x, zs, y, valid, text, hp) -> jax.Array:
    """``head.loss`` over the valid rows of a padded batch x [B,D], zs [B,C], y [B], valid [B] bool: a head's loss
    is a mean over rows (``methods.Head``), so this is the mean of its one-row losses where valid; padded rows get
    no gradient. A term that is not a row mean is taken at one row (``logreg.LinearProbeHead``'s regulariser
    ||W||^2 / (2cN) counts with N = 1 here; that head trains with its own L-BFGS solver, the runner only in tests)."""
    one = lambda xi, zi, yi: head.loss(params, consts, xi[None], zi[None], yi[None], text, hp)  # noqa: E731
    per_row = jax.vmap(one)(x, zs, y)
    return jnp.sum(jnp.where(valid, per_row, 0.0)) / jnp.sum(valid)


def _train_stream(rows, seed, hp, n, pool_x, pool_y, zs_pool, text, *, head: Head, batch: int, max_epochs: int):
    """Initialise and train the k runs of one stream -> (params, consts, failed, fail_step, last loss), leading
    axis k. rows [N] into the pool and seed (batch order, view draws) are the stream's, hp: field -> [k]; only the
    first n (a traced scalar, shared by all streams) of the N rows are the run's, the rest pad it to the program's
    shape: they draw in no batch order, and rows of a batch past n are masked out of the loss. Every step draws one
    batch for all k runs; an epoch has ceil(n / batch) steps, the last one possibly of fewer valid rows; steps of
    the N rows' epoch beyond that are skipped. pool_x [M,V,D]; zs_pool [M,C] (= pool_x[:,0] T^T) or None when
    V > 1 (then the zero-shot cosine of the drawn view is computed per step). Each run's AdamW state starts (zeros)
    and ends here: nothing outside needs it."""
    k = hp["lr"].shape[0]
    hp = hp if k > 1 else jax.tree.map(lambda x: x[0], hp)
    size, views = rows.shape[0], pool_x.shape[1]
    max_steps = math.ceil(size / batch)
    steps_per_epoch = (n + batch - 1) // batch
    params0, consts = head.init(jnp.mean(pool_x[rows], axis=1), pool_y[rows], text)  # the same for all k runs
    optimizer = lambda h: make_optimizer(h, (h["epochs"] * steps_per_epoch).astype(jnp.float32))  # noqa: E731

    def run_init(h):
        return params0, optimizer(h).init(params0), jnp.bool_(False), jnp.int32(-1), jnp.float32(jnp.nan)

    def run_step(state, h, x, zs, y, valid, e, b):
        """One optimiser step of one run on the stream's batch x [B,D], zs [B,C], y [B] (valid [B]: real rows)."""
        params, opt_state, failed, fail_step, last_loss = state
        opt = optimizer(h)
        loss, grads = jax.value_and_grad(functools.partial(_masked_loss, head))(params, consts, x, zs, y, valid,
                                                                                 text, h)
        updates, new_opt = opt.update(grads, opt_state, params)
        # finite params, grads, lr and weight decay give finite AdamW updates: checking them before the update
        # lets the update and the keep-or-skip choice be one pass over the params
        ok = jnp.isfinite(loss) & _all_finite((grads, h["lr"], h["weight_decay"]))
        live = (e < h["epochs"]) & ~failed
        take = live & ok
        newly_failed = live & ~ok
        return (  # a run that skips a step never takes another, so its optimiser state no longer matters
            jax.tree.map(lambda p, u: jnp.where(take, p + u, p), params, updates),
            new_opt,
            failed | newly_failed,
            jnp.where(newly_failed, e * steps_per_epoch + b, fail_step),
            jnp.where(take, loss, last_loss),
        )

    step_runs = _over_runs(k, run_step, (0, 0) + (None,) * 6)
    key = jax.random.PRNGKey(seed)

    def epoch(state, e):
        k_perm, k_view = jax.random.split(jax.random.fold_in(key, e))
        order = jnp.where(steps_per_epoch > 1, permutation_prefix(k_perm, n, size), jnp.arange(size))
        view = jax.random.randint(k_view, (size,), 0, views) if views > 1 else jnp.zeros(size, jnp.int32)
        order = jnp.pad(order, (0, max_steps * batch - size))  # equal batches; the padding is masked out

        def step(state, b, idx):
            r = rows[idx]
            x = pool_x[r, view[idx]]
            zs = zs_pool[r] if zs_pool is not None else x @ text.T
            valid = b * batch + jnp.arange(batch) < n
            return step_runs(state, hp, x, zs, pool_y[r], valid, e, b)

        def maybe_step(state, a):  # n is shared by all streams and runs: a real branch, not a select
            return jax.lax.cond(a[0] < steps_per_epoch, lambda s: step(s, *a), lambda s: s, state), None

        batches = (jnp.arange(max_steps), order.reshape(max_steps, batch))
        return jax.lax.scan(maybe_step, state, batches)[0], None

    state, _ = jax.lax.scan(epoch, _over_runs(k, run_init, (0,))(hp), jnp.arange(max_epochs))
    params, _, failed, fail_step, last_loss = state
    if k == 1:
        params, failed, fail_step, last_loss = jax.tree.map(lambda x: x[None], (params, failed, fail_step, last_loss))
    consts = jax.tree.map(lambda x: jnp.broadcast_to(x, (k,) + x.shape), consts)
    return params, consts, failed, fail_step, last_loss


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
    one = functools.partial(_train_stream, head=head, batch=batch, max_epochs=max_epochs)
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


def estimate_run_bytes(n_params: int, n_consts: int, batch: int, dim: int, classes: int, n_train: int) -> int:
    """Rough peak bytes of one run: params, Adam moments, gradients and updated copies (x8), constants,
    per-step activations and the epoch's index arrays."""
    return 4 * (8 * n_params + n_consts + batch * (6 * dim + 8 * classes) + 4 * n_train)


def chunk_size(units: int, per_unit: int, budget: int, n_devices: int) -> int:
    """Units (streams to train, runs to predict) per chunk: as many as the budget allows, a multiple of the device
    count, no more than needed."""
    fit = max(1, budget // max(per_unit, 1)) // n_devices * n_devices
    return min(max(fit, n_devices), math.ceil(units / n_devices) * n_devices)


def group_size(local: int, per_stream: int, platform: str) -> int:
    """Streams a device trains together, of its ``local`` ones: all on an accelerator; on a CPU as many as fit in
    ``CPU_GROUP_BYTES`` (at least 1), evened out so that equal groups cover them with the least padding."""
    if platform != "cpu":
        return local
    fit = min(local, max(1, CPU_GROUP_BYTES // max(per_stream, 1)))
    return math.ceil(local / math.ceil(local / fit))


def stream_limit(n_params: int, batch: int, platform: str) -> int | None:
    """Most runs per stream: no limit (None) on an accelerator. On a CPU, folding runs into wider matmuls pays
    only while the stream's state (params, two Adam moments, gradients: 16 bytes per parameter and run) stays in
    the last-level cache next to the matmuls' operands (``CPU_STREAM_BYTES``), and only for batches of
    ``CPU_STREAM_MIN_BATCH`` rows or more (smaller steps are bound by elementwise work)."""
    if platform != "cpu":
        return None
    return max(1, CPU_STREAM_BYTES // (16 * n_params)) if batch >= CPU_STREAM_MIN_BATCH else 1


@dataclass(frozen=True)
class Streams:
    """The runs laid out as G streams of k runs sharing a seed and training rows: index [G,k] run ids (a short
    stream is padded by repeating one of its runs), rows [G,N], seeds [G], and slot [S]: each run's position in
    ``index.reshape(-1)``."""

    index: np.ndarray
    rows: np.ndarray
    seeds: np.ndarray
    slot: np.ndarray


def plan_streams(rows: np.ndarray, seeds: np.ndarray, max_size: int | None = None) -> Streams:
    """Group runs (rows [S,N], seeds [S]) by (seed, rows), in order of first appearance, into streams of k runs:
    the largest k (up to ``max_size``, default no limit) whose padding adds at most ``STREAM_PADDING`` of the
    runs; a longer group is cut into several streams."""
    groups: dict[tuple[int, bytes], list[int]] = {}
    for i, (seed, r) in enumerate(zip(seeds.tolist(), rows)):
        groups.setdefault((seed, np.ascontiguousarray(r).tobytes()), []).append(i)
    sizes = [len(g) for g in groups.values()]
    limit = len(seeds) * (1 + STREAM_PADDING)
    k = max(k for k in range(1, min(max_size or max(sizes), max(sizes)) + 1)
            if sum(math.ceil(s / k) * k for s in sizes) <= limit)
    index, slot = [], np.empty(len(seeds), np.int64)
    for members in groups.values():
        for start in range(0, len(members), k):
            part = members[start:start + k]
            slot[part] = len(index) * k + np.arange(len(part))
            index.append(part + [part[0]] * (k - len(part)))
    index = np.array(index, np.int64).reshape(-1, k)
    return Streams(index, rows[index[:, 0]], seeds[index[:, 0]], slot)


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


@dataclass(frozen=True)
class Buckets:
    """Sizes a training program is compiled for, so that one program serves every shot count: rows per run
    (padded rows are masked out; heads whose parameters' shapes depend on the rows, Tip-Adapter's keys, keep
    their own) and pool rows (padded with zero rows no run indexes). Sizes below the actual ones are ignored."""

    rows: int = 0
    pool: int = 0


def shot_buckets(max_shots: int, classes: int, seeds: int, train_rows: int) -> Buckets:
    """Buckets serving every shot count up to ``max_shots``: rows per run max_shots * classes; pool rows: the
    most the seeds' draws can cover, min(train_rows, seeds * max_shots * classes)."""
    return Buckets(max_shots * classes, min(train_rows, seeds * max_shots * classes))


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
    desc: str = "train",
) -> Trained:
    """Train S runs of ``head``. hp: field -> [S] (see ``hparam_arrays``); rows [S,N] int indices into the pool
    (N equal for all runs); seeds [S] int (batch order, view draws); text [C,D] prototypes. Without ``use_aug``
    only view 0 of the pool is used and the zero-shot cosines are computed once for the whole pool.
    ``buckets``: padded sizes to compile for (default: the actual ones; the runs' results do not depend on them);
    ``budget``: bytes for the run axis (default ``memory_budget``); ``devices``: default all JAX devices;
    ``max_stream``: most runs per stream (default ``stream_limit``).
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
    limit = stream_limit(n_params, batch, platform) if max_stream is None else max_stream
    rows = np.asarray(rows, np.int32)
    rows = np.concatenate([rows, np.repeat(rows[:, :1], size - n, axis=1)], axis=1)  # pads repeat a run's row
    streams = plan_streams(rows, np.asarray(seeds, np.int32), limit)
    n_streams, k = streams.index.shape
    per_stream = k * estimate_run_bytes(n_params, n_consts, batch, dim, text.shape[0], size)
    placement, chunk = _plan(devices, n_streams, per_stream, budget)
    n_devices = placement.runs.mesh.size
    group = group_size(chunk // n_devices, per_stream, platform)
    chunk = math.ceil(chunk // n_devices / group) * group * n_devices  # equal groups (padded like the last chunk)
    train = _train_program(head, batch, max_epochs, placement.runs, group)

    pad = max(0, buckets.pool - len(pool.labels))
    pool_x = pool.features if use_aug else pool.features[:, :1]
    pool_x = np.concatenate([pool_x, np.zeros((pad,) + pool_x.shape[1:], np.float32)])
    pool_y = np.concatenate([pool.labels, np.zeros(pad, pool.labels.dtype)]).astype(np.int32)
    n_d, pool_x, pool_y, text_d = placement.replicate((np.int32(n), pool_x, pool_y, text))
    stream_args = (streams.rows, streams.seeds, {f: np.asarray(v)[streams.index] for f, v in hp.items()})
    outputs = []
    for start in tqdm(range(0, n_streams, chunk), desc=desc, unit="chunk", leave=False):
        rows_c, seeds_c, hp_c = placement.split(stream_args, start, chunk)
        outputs.append(jax.device_get(train(rows_c, seeds_c, hp_c, n_d, pool_x, pool_y, text_d)))
    per_run = jax.tree.map(lambda x: x.reshape(n_streams * k, *x.shape[2:])[streams.slot], _gather(outputs, n_streams))
    params, consts, failed, fail_step, loss = per_run
    return Trained(params, consts, failed, fail_step, loss)


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
    for start in tqdm(range(0, runs, chunk), desc=desc, unit="chunk", leave=False):
        params, consts, hp_c = placement.split((trained.params, trained.consts, dict(hp)), start, chunk)
        parts = [predict(params, consts, hp_c, x, t, *shared) for x, t in per_block]  # dispatched before a wait
        outputs.append(jax.tree.map(lambda *xs: np.concatenate(xs, axis=1), *jax.device_get(parts)))
    preds, logp = jax.tree.map(lambda x: x[:, :n], _gather(outputs, runs))
    return preds if labels is None else (preds, logp)
