"""How S runs are laid out for the training program, in plain numpy: shot buckets, streams, groups and chunks.

Runs with the same seed and rows draw the same batches, so they are laid out as *streams*: G streams of k runs that
share a seed and rows (a seed's grid of settings), trained together by ``step.train_run``. The stream axis is cut
into equal chunks when the estimated memory is too large (the last chunk is padded, so each chunk reuses one
compiled program), and each chunk is split over the devices.

On an accelerator a device trains all its streams in one vmapped step. On a CPU, streams share nothing but the
pool, so batching them buys no arithmetic efficiency, while their stacked parameters and Adam moments outgrow the
caches: there a device trains its streams in groups whose state fits in ``LayoutPolicy.cpu_group_bytes``, one
group after another inside the same program. The thresholds are fields of a ``LayoutPolicy``, passed in.

``Buckets`` are the row counts a program is compiled for (``shot_buckets``: those of a sweep's largest shot count),
so that one program serves every shot count.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np


@dataclass(frozen=True)
class LayoutPolicy:
    """The layout's tuned thresholds.

    cpu_group_bytes: ``estimate_run_bytes`` of the streams a CPU trains together: about a share of its caches;
    cpu_stream_bytes: a stream's params, Adam moments and grads on a CPU: half a last-level cache;
    cpu_stream_min_batch: smaller CPU steps are bound by elementwise work, which folding runs does not shrink;
    stream_padding: at most this share of repeated runs to make the streams equal."""

    cpu_group_bytes: int = 4 << 20
    cpu_stream_bytes: int = 16 << 20
    cpu_stream_min_batch: int = 64
    stream_padding: float = 0.125


@dataclass(frozen=True)
class Streams:
    """The runs laid out as G streams of k runs sharing a seed and training rows: index [G,k] run ids (a short
    stream is padded by repeating one of its runs), rows [G,N], seeds [G], and slot [S]: each run's position in
    ``index.reshape(-1)``."""

    index: np.ndarray
    rows: np.ndarray
    seeds: np.ndarray
    slot: np.ndarray


@dataclass(frozen=True)
class TrainLayout:
    """A training call's layout: the streams, ``chunk`` streams per program call (a multiple of the device count
    and of ``group``) and ``group`` streams a device trains together."""

    streams: Streams
    chunk: int
    group: int


def equal_chunks(runs: int, per_run: int, budget: int) -> np.ndarray:
    """Run ids in equal chunks that fit ``budget`` bytes at ``per_run`` each: [chunks, size], the last chunk padded
    with copies of the last run (so every chunk reuses one compiled program); keep the first ``runs`` outputs."""
    chunks = math.ceil(runs / max(1, budget // max(per_run, 1)))
    size = math.ceil(runs / chunks)
    return np.minimum(np.arange(chunks * size), runs - 1).reshape(chunks, size)


def estimate_run_bytes(n_params: int, n_consts: int, batch: int, dim: int, classes: int, n_train: int) -> int:
    """Rough peak bytes of one run: params, Adam moments, gradients and updated copies (x8), constants,
    per-step activations and the epoch's index arrays."""
    return 4 * (8 * n_params + n_consts + batch * (6 * dim + 8 * classes) + 4 * n_train)


def chunk_size(units: int, per_unit: int, budget: int, n_devices: int) -> int:
    """Units (streams to train, runs to predict) per chunk: as many as the budget allows, a multiple of the device
    count, no more than needed."""
    fit = max(1, budget // max(per_unit, 1)) // n_devices * n_devices
    return min(max(fit, n_devices), math.ceil(units / n_devices) * n_devices)


def group_size(local: int, per_stream: int, platform: str, policy: LayoutPolicy = LayoutPolicy()) -> int:
    """Streams a device trains together, of its ``local`` ones: all on an accelerator; on a CPU as many as fit in
    ``policy.cpu_group_bytes`` (at least 1), evened out so that equal groups cover them with the least padding."""
    if platform != "cpu":
        return local
    fit = min(local, max(1, policy.cpu_group_bytes // max(per_stream, 1)))
    return math.ceil(local / math.ceil(local / fit))


def stream_limit(n_params: int, batch: int, platform: str, policy: LayoutPolicy = LayoutPolicy()) -> int | None:
    """Most runs per stream: no limit (None) on an accelerator. On a CPU, folding runs into wider matmuls pays
    only while the stream's state (params, two Adam moments, gradients: 16 bytes per parameter and run) stays in
    the last-level cache next to the matmuls' operands (``policy.cpu_stream_bytes``), and only for batches of
    ``policy.cpu_stream_min_batch`` rows or more (smaller steps are bound by elementwise work)."""
    if platform != "cpu":
        return None
    return max(1, policy.cpu_stream_bytes // (16 * n_params)) if batch >= policy.cpu_stream_min_batch else 1


def plan_streams(rows: np.ndarray, seeds: np.ndarray, max_size: int | None = None,
                 policy: LayoutPolicy = LayoutPolicy()) -> Streams:
    """Group runs (rows [S,N], seeds [S]) by (seed, rows), in order of first appearance, into streams of k runs:
    the largest k (up to ``max_size``, default no limit) whose padding adds at most ``policy.stream_padding`` of
    the runs; a longer group is cut into several streams."""
    groups: dict[tuple[int, bytes], list[int]] = {}
    for i, (seed, r) in enumerate(zip(seeds.tolist(), rows)):
        groups.setdefault((seed, np.ascontiguousarray(r).tobytes()), []).append(i)
    sizes = [len(g) for g in groups.values()]
    limit = len(seeds) * (1 + policy.stream_padding)
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


def plan_training(rows: np.ndarray, seeds: np.ndarray, *, per_run: int, n_params: int, batch: int, platform: str,
                  n_devices: int, budget: int, max_stream: int | None, policy: LayoutPolicy) -> TrainLayout:
    """The layout of S runs (rows [S,N] padded to the program's N, seeds [S]) of ``per_run`` estimated bytes
    each (``estimate_run_bytes``) and ``n_params`` parameters on ``n_devices`` devices of ``platform`` within
    ``budget`` bytes; ``max_stream``: most runs per stream (default ``stream_limit``)."""
    limit = stream_limit(n_params, batch, platform, policy) if max_stream is None else max_stream
    streams = plan_streams(rows, seeds, limit, policy)
    n_streams, k = streams.index.shape
    chunk = chunk_size(n_streams, k * per_run, budget, n_devices)
    group = group_size(chunk // n_devices, k * per_run, platform, policy)
    chunk = math.ceil(chunk // n_devices / group) * group * n_devices  # equal groups (padded like the last chunk)
    return TrainLayout(streams, chunk, group)


@dataclass(frozen=True)
class Buckets:
    """Sizes a training program is compiled for, so that one program serves every shot count: rows per run
    (padded rows are masked out; heads whose parameters' shapes depend on the rows, Tip-Adapter's keys, keep
    their own) and pool rows (padded with zero rows no run indexes). Sizes below the actual ones are ignored."""

    rows: int = 0
    pool: int = 0


def shot_buckets(max_shots: int, classes: int, seeds: int, train_rows: int) -> Buckets:
    """Buckets serving every shot count up to ``max_shots``: rows per run min(max_shots * classes, train_rows) (a
    draw never takes more rows than the split has); pool rows: the most the seeds' draws can cover,
    min(train_rows, seeds * max_shots * classes)."""
    return Buckets(min(max_shots * classes, train_rows), min(train_rows, seeds * max_shots * classes))
