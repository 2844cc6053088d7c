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


@jax.jit
def _zero_shot_cos(pool_x: jax.Array, text: jax.Array) -> jax.Array:
    """Zero-shot cosines of the pool's plain view: pool_x [M,V,D], text [C,D] -> [M,C]."""
    return pool_x[:, 0] @ text.T


def _over_runs(k: int, fn: Callable, in_axes: tuple) -> Callable:
    """``fn`` of one run applied to a stream's k runs: vmapped (``in_axes``: 0 per run, None shared) for k > 1;
    for k = 1 ``fn`` itself, which the caller gives the run's arrays without their size-1 axis (a size-1 vmap axis
    costs XLA copies and slower kernels)."""
    return jax.vmap(fn, in_axes=in_axes) if k > 1 else fn


def _train_stream(rows, seed, hp, pool_x, pool_y, zs_pool, text, *, head: Head, batch: int, max_epochs: int):
    """Initialise and train the k runs of one stream -> (params, consts, failed, fail_step, last loss), leading
    axis k. rows [N] into the pool and seed (batch order, view draws) are the stream's, hp: field -> [k]. Every
    step draws one batch for all k runs. pool_x [M,V,D]; zs_pool [M,C] (= pool_x[:,0] T^T) or None when V > 1
    (then the zero-shot cosine of the drawn view is computed per step). Each run's AdamW state starts (zeros) and
    ends here: nothing outside needs it."""
    k = hp["lr"].shape[0]
    hp = hp if k > 1 else jax.tree.map(lambda x: x[0], hp)
    n, views = rows.shape[0], pool_x.shape[1]
    full, rest = divmod(n, batch)  # full batches per epoch, and the size of a smaller last one (0: none)
    steps_per_epoch = full + (rest > 0)
    params0, consts = head.init(jnp.mean(pool_x[rows], axis=1), pool_y[rows], text)  # the same for all k runs
    optimizer = lambda h: make_optimizer(h, (h["epochs"] * steps_per_epoch).astype(jnp.float32))  # noqa: E731

    def run_init(h):
        return params0, optimizer(h).init(params0), jnp.bool_(False), jnp.int32(-1), jnp.float32(jnp.nan)

    def run_step(state, h, x, zs, y, e, b):
        """One optimiser step of one run on the stream's batch x [B,D], zs [B,C], y [B]."""
        params, opt_state, failed, fail_step, last_loss = state
        opt = optimizer(h)
        loss, grads = jax.value_and_grad(head.loss)(params, consts, x, zs, y, text, h)
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

    step_runs = _over_runs(k, run_step, (0, 0) + (None,) * 5)
    key = jax.random.PRNGKey(seed)

    def epoch(state, e):
        k_perm, k_view = jax.random.split(jax.random.fold_in(key, e))
        order = jax.random.permutation(k_perm, n) if steps_per_epoch > 1 else jnp.arange(n)
        view = jax.random.randint(k_view, (n,), 0, views) if views > 1 else jnp.zeros(n, jnp.int32)

        def step(state, b, idx):
            r = rows[idx]
            x = pool_x[r, view[idx]]
            zs = zs_pool[r] if zs_pool is not None else x @ text.T
            return step_runs(state, hp, x, zs, pool_y[r], e, b)

        batches = (jnp.arange(full), order[: full * batch].reshape(full, batch))
        state = jax.lax.scan(lambda s, a: (step(s, *a), None), state, batches)[0]
        if rest:  # the last batch of the epoch is smaller: a step of its own shape, no padding rows to compute
            state = step(state, full, order[full * batch:])
        return state, None

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
    """blocks [nb, EVAL_BLOCK, D] -> predictions [nb*EVAL_BLOCK] int32 over the class subset ``classes``; with
    targets [nb, EVAL_BLOCK] (true classes, indices into ``classes``; None: predictions only) also the
    log-probability of the target under the softmax of the logits over ``classes`` [nb*EVAL_BLOCK]."""

    def block(_, xt):
        x, t = xt
        logits = head.logits(params, consts, x, x @ text.T, text, hp)[:, classes]
        preds = jnp.argmax(logits, axis=-1).astype(jnp.int32)
        if t is None:
            return None, preds
        return None, (preds, target_log_prob(logits, t))

    return jax.tree.map(lambda a: a.reshape(-1), jax.lax.scan(block, None, (blocks, targets))[1])


def _train_local(rows, seeds, hp, pool_x, pool_y, zs_pool, text, *, one: Callable, group: int):
    """Train one device's streams (leading axis R of the first three arguments), ``group`` at a time: one by one
    (a scan), all at once (vmap), or in vmapped groups of ``group`` (R a multiple of it)."""
    train = lambda a: one(*a, pool_x, pool_y, zs_pool, text)  # noqa: E731
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
    budget: int | None = None,
    devices: Sequence[jax.Device] | None = None,
    max_stream: int | None = None,
    desc: str = "train",
) -> Trained:
    """Train S runs of ``head``. hp: field -> [S] (see ``hparam_arrays``); rows [S,N] int indices into the pool
    (N equal for all runs); seeds [S] int (batch order, view draws); text [C,D] prototypes. Without ``use_aug``
    only view 0 of the pool is used and the zero-shot cosines are precomputed once for the whole pool.
    ``budget``: bytes for the run axis (default ``memory_budget``); ``devices``: default all JAX devices;
    ``max_stream``: most runs per stream (default ``stream_limit``).
    """
    runs, n = rows.shape
    batch = min(batch_size, n)
    max_epochs = int(np.max(hp["epochs"]))
    pool_x = pool.features if use_aug else pool.features[:, :1]
    shapes = jax.eval_shape(lambda: head.init(pool_x[: n, 0], pool.labels[:n], text))
    n_params, n_consts = (sum(x.size for x in jax.tree.leaves(t)) for t in shapes)
    devices = list(devices or jax.devices())
    platform = devices[0].platform
    limit = stream_limit(n_params, batch, platform) if max_stream is None else max_stream
    streams = plan_streams(np.asarray(rows, np.int32), np.asarray(seeds, np.int32), limit)
    n_streams, k = streams.index.shape
    per_stream = k * estimate_run_bytes(n_params, n_consts, batch, text.shape[1], text.shape[0], n)
    placement, chunk = _plan(devices, n_streams, per_stream, budget)
    n_devices = placement.runs.mesh.size
    group = group_size(chunk // n_devices, per_stream, platform)
    chunk = math.ceil(chunk // n_devices / group) * group * n_devices  # equal groups (padded like the last chunk)
    train = _train_program(head, batch, max_epochs, placement.runs, group)

    pool_x, pool_y, text_d = placement.replicate((pool_x, pool.labels.astype(np.int32), text))
    zs_pool = None if use_aug else _zero_shot_cos(pool_x, text_d)
    stream_args = (streams.rows, streams.seeds, {f: np.asarray(v)[streams.index] for f, v in hp.items()})
    outputs = []
    for start in tqdm(range(0, n_streams, chunk), desc=desc, unit="chunk", leave=False):
        rows_c, seeds_c, hp_c = placement.split(stream_args, start, chunk)
        outputs.append(jax.device_get(train(rows_c, seeds_c, hp_c, pool_x, pool_y, zs_pool, text_d)))
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
    """``predict_runs`` (labels None: predictions [S,Ne]) and ``score_runs`` (labels [Ne]: a pair of [S,Ne])."""
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
    targets = None
    if labels is not None:
        targets = np.zeros(padded, np.int32)
        targets[:n] = labels
        targets = targets.reshape(-1, EVAL_BLOCK)
    shared = placement.replicate((blocks.reshape(-1, EVAL_BLOCK, feats.shape[1]), targets, classes.astype(np.int32),
                                  text))
    outputs = []
    for start in tqdm(range(0, runs, chunk), desc=desc, unit="chunk", leave=False):
        params, consts, hp_c = placement.split((trained.params, trained.consts, dict(hp)), start, chunk)
        outputs.append(jax.device_get(predict(params, consts, hp_c, *shared)))
    return jax.tree.map(lambda x: x[:, :n], _gather(outputs, runs))
