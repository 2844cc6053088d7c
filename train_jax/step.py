"""One run's training as pure functions, in the manner of the flax examples: a named state, ``init``,
``train_step(state, hp, batch)`` and ``train_run``, which scans the step over epochs and batches.

A run trains a ``methods.Head`` with AdamW (peak lr, epsilon, weight decay, linear warm-up then cosine decay to 0,
all per-run values of ``hp``). A step whose loss or gradients are non-finite is not taken: the run keeps its
params and is marked failed at that step, and takes no further step; a run whose epochs are over keeps its params.
``train_run`` trains the k runs of one *stream* (runs sharing a seed and training rows, see ``layout``): every
step draws one batch for all k, whose states are stacked, so their matmuls become single products k times wider.
"""

from __future__ import annotations

import functools
import math
from typing import Any, Callable, Mapping, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
import optax

from train_jax.heads import Head

Tree = Any


class RunState(NamedTuple):
    """One run's training state: params, AdamW state, failed (a non-finite loss or gradient stopped the run),
    fail_step (the step at which it stopped, -1 if it did not), loss (the last finite loss; NaN before any),
    loss_sum and taken: the sum of the losses of the steps taken this epoch and their count; parts_sum [P]: the
    sum of their loss parts (``masked_loss``)."""

    params: Tree
    opt_state: Tree
    failed: jax.Array
    fail_step: jax.Array
    loss: jax.Array
    loss_sum: jax.Array
    taken: jax.Array
    parts_sum: jax.Array


class Batch(NamedTuple):
    """One step's batch, shared by a stream's runs: x [B,D] features, zs [B,C] their zero-shot cosines, y [B]
    labels, valid [B] bool (real rows; the rest pad the batch and get no gradient), epoch and step (in the
    epoch) int32 scalars."""

    x: jax.Array
    zs: jax.Array
    y: jax.Array
    valid: jax.Array
    epoch: jax.Array
    step: jax.Array


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


def _optimizer(hp: Mapping[str, jax.Array], steps_per_epoch: jax.Array) -> optax.GradientTransformation:
    """``make_optimizer`` over the run's ``epochs * steps_per_epoch`` steps."""
    return make_optimizer(hp, (hp["epochs"] * steps_per_epoch).astype(jnp.float32))


def _all_finite(tree: Tree) -> jax.Array:
    """Whether every entry of every leaf is finite, as one fused reduction per leaf: sum(x * 0) is 0 if all x are
    finite and NaN otherwise (inf * 0 = NaN)."""
    return jnp.isfinite(sum(jnp.sum(x * 0.0) for x in jax.tree.leaves(tree)))


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


def masked_loss(head: Head, params, consts, x, zs, y, valid, text, hp) -> tuple[jax.Array, jax.Array]:
    """``head.loss`` over the valid rows of a padded batch x [B,D], zs [B,C], y [B], valid [B] bool, and its named
    parts [P] (P = len(head.part_names), 0 if it names none). A head's loss is a mean over rows
    (``methods.Head``), so this is the mean of its one-row losses where valid; padded rows get no gradient. A head
    with parts is computed once, as its parts' row means combined (``combine_parts``), so recording them costs no
    second forward pass. A term that is not a row mean is taken at one row (``logreg.LinearProbeHead``'s
    regulariser ||W||^2 / (2cN) counts with N = 1 here; that head trains with its own L-BFGS solver, the runner
    only in tests)."""
    def rows(fn: Callable) -> Callable:  # fn of the head's loss arguments, applied to each row alone
        return jax.vmap(lambda xi, zi, yi: fn(params, consts, xi[None], zi[None], yi[None], text, hp))

    n = jnp.sum(valid)
    if getattr(head, "part_names", ()):
        parts = jnp.sum(jnp.where(valid[:, None], rows(head.loss_parts)(x, zs, y), 0.0), axis=0) / n
        return head.combine_parts(parts, hp), parts
    return jnp.sum(jnp.where(valid, rows(head.loss)(x, zs, y), 0.0)) / n, jnp.zeros(0, jnp.float32)


def init(params: Tree, hp: Mapping[str, jax.Array], steps_per_epoch: jax.Array, *, head: Head) -> RunState:
    """A run's state before its first step: the head's initial params, zero AdamW moments, not failed."""
    return RunState(params, _optimizer(hp, steps_per_epoch).init(params), jnp.bool_(False), jnp.int32(-1),
                    jnp.float32(jnp.nan), jnp.float32(0.0), jnp.int32(0),
                    jnp.zeros(len(getattr(head, "part_names", ())), jnp.float32))


def train_step(state: RunState, hp: Mapping[str, jax.Array], batch: Batch, *, head: Head, consts: Tree,
               text: jax.Array, steps_per_epoch: jax.Array) -> RunState:
    """One AdamW step of one run (hp: field -> scalar) on ``batch``; a run past its epochs or failed keeps its
    state, a non-finite loss or gradient fails it. consts: the head's untrained arrays; text [C,D] prototypes."""
    params, opt_state, failed, fail_step, last_loss, loss_sum, taken, parts_sum = state
    (loss, parts), grads = jax.value_and_grad(functools.partial(masked_loss, head), has_aux=True)(
        params, consts, batch.x, batch.zs, batch.y, batch.valid, text, hp)
    updates, new_opt = _optimizer(hp, steps_per_epoch).update(grads, opt_state, params)
    # finite params, grads, lr and weight decay give finite AdamW updates: checking them before the update lets
    # the update and the keep-or-skip choice be one pass over the params
    ok = jnp.isfinite(loss) & _all_finite((grads, hp["lr"], hp["weight_decay"]))
    live = (batch.epoch < hp["epochs"]) & ~failed
    take = live & ok
    newly_failed = live & ~ok
    return RunState(  # a run that skips a step never takes another, so its optimiser state no longer matters
        jax.tree.map(lambda p, u: jnp.where(take, p + u, p), params, updates),
        new_opt,
        failed | newly_failed,
        jnp.where(newly_failed, batch.epoch * steps_per_epoch + batch.step, fail_step),
        jnp.where(take, loss, last_loss),
        jnp.where(take, loss_sum + loss, loss_sum),
        taken + take,
        jnp.where(take, parts_sum + parts, parts_sum),
    )


def end_epoch(state: RunState) -> tuple[RunState, tuple[jax.Array, jax.Array]]:
    """The state for the next epoch (sums reset) and this epoch's mean training loss and loss parts [P] over its
    taken steps (each a batch mean; NaN if the run took none: its epochs were over or it had failed)."""
    per_step = lambda total: jnp.where(state.taken > 0, total / jnp.maximum(state.taken, 1), jnp.nan)  # noqa: E731
    reset = state._replace(loss_sum=jnp.zeros_like(state.loss_sum), taken=jnp.zeros_like(state.taken),
                           parts_sum=jnp.zeros_like(state.parts_sum))
    return reset, (per_step(state.loss_sum), per_step(state.parts_sum))


def _over_runs(k: int, fn: Callable, in_axes: tuple) -> Callable:
    """``fn`` of one run applied to a stream's k runs: vmapped (``in_axes``: 0 per run, None shared) for k > 1;
    for k = 1 ``fn`` itself, which the caller gives the run's arrays without their size-1 axis (a size-1 vmap axis
    costs XLA copies and slower kernels)."""
    return jax.vmap(fn, in_axes=in_axes) if k > 1 else fn


def train_run(rows, seed, hp, n, pool_x, pool_y, zs_pool, text, *, head: Head, batch: int, max_epochs: int):
    """Initialise and train the k runs of one stream -> (params, consts, failed, fail_step, last loss, curve,
    parts), leading axis k; curve [k, max_epochs]: each epoch's mean training loss, parts [k, max_epochs, P]: its
    mean loss parts (``end_epoch``). rows [N] into the pool and seed (batch order, view draws) are the stream's, hp: field -> [k]; only the
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
    step_runs = _over_runs(k, functools.partial(train_step, head=head, consts=consts, text=text,
                                                steps_per_epoch=steps_per_epoch), (0, 0, None))
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
            return step_runs(state, hp, Batch(x, zs, pool_y[r], valid, e, b))

        def maybe_step(state, a):  # n is shared by all streams and runs: a real branch, not a select
            return jax.lax.cond(a[0] < steps_per_epoch, lambda s: step(s, *a), lambda s: s, state), None

        batches = (jnp.arange(max_steps), order.reshape(max_steps, batch))
        return _over_runs(k, end_epoch, (0,))(jax.lax.scan(maybe_step, state, batches)[0])

    run_init = functools.partial(init, params0, steps_per_epoch=steps_per_epoch, head=head)
    state, (curve, parts) = jax.lax.scan(epoch, _over_runs(k, run_init, (0,))(hp), jnp.arange(max_epochs))
    params, failed, fail_step, last_loss = state.params, state.failed, state.fail_step, state.loss
    curve, parts = (curve.T, jnp.swapaxes(parts, 0, 1)) if k > 1 else (curve, parts)
    if k == 1:
        params, failed, fail_step, last_loss, curve, parts = jax.tree.map(
            lambda x: x[None], (params, failed, fail_step, last_loss, curve, parts))
    consts = jax.tree.map(lambda x: jnp.broadcast_to(x, (k,) + x.shape), consts)
    return params, consts, failed, fail_step, last_loss, curve, parts
