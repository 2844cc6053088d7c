"""JAX side of the training bench, one measurement per process (so that its peak RSS is its own); started by
``bench.bench_train``, prints one JSON line.

    python -m bench.train_worker_jax peak CASE N           # ceilings: N x N matmul, the step's matmuls, memory
    python -m bench.train_worker_jax vmapped CASE S R      # train_runs over S runs at once, best of R calls
    python -m bench.train_worker_jax loop CASE S R         # train_runs over 1 run, called S times; best of R loops

CASE is the JSON of a ``bench.train_problems.Case``.

Times are seconds; the first call's trace + compile durations (as JAX reports them through jax.monitoring) are
subtracted from its wall time, so every figure is the steady-state cost and ``compile_s`` is reported apart.
"""
from __future__ import annotations

import json
import sys
import time

import jax
import jax.numpy as jnp
import numpy as np

from bench.common import peak_rss_mib
from bench.train_problems import Case, make_pool, run_table
from train_jax.methods import CMMHead
from train_jax.runner import Pool, train_runs

COMPILE_EVENTS = ("/jax/core/compile/jaxpr_trace_duration", "/jax/core/compile/jaxpr_to_mlir_module_duration",
                  "/jax/core/compile/backend_compile_duration")
_compile_seconds = [0.0]


def _on_event(event: str, seconds: float, **_) -> None:
    if event in COMPILE_EVENTS:
        _compile_seconds[0] += seconds


jax.monitoring.register_event_duration_secs_listener(_on_event)


def rss_mib() -> float:
    """Current resident memory of this process in MiB (Linux)."""
    with open("/proc/self/statm", encoding="ascii") as f:
        return int(f.read().split()[1]) * 4096 / 2**20


def timed(fn) -> tuple[float, float]:
    """(wall seconds of fn() minus the compile seconds JAX reported meanwhile, those compile seconds)."""
    before = _compile_seconds[0]
    start = time.perf_counter()
    jax.block_until_ready(fn())
    wall = time.perf_counter() - start
    compile_s = _compile_seconds[0] - before
    return wall - compile_s, compile_s


def best_gflops(fn, flops: float, repeats: int) -> float:
    """flops / best seconds of ``repeats`` calls of fn, in 1e9 per second."""
    jax.block_until_ready(fn())
    return flops / min(timed(fn)[0] for _ in range(repeats)) / 1e9


def peak(case: Case, size: int) -> dict:
    """GFLOP/s of a size x size float32 matmul, and of the case's per-step matmuls alone (forward v dW^T and
    v' T^T, backward g T and g^T v, in a lax.scan over 32 steps); GB/s of ``x / 2 + 1/2`` in place over 4 size^2
    floats (256 MiB for 4096: read + write, from memory, not the caches); best of 3 (of 5 for the step)."""
    key = jax.random.PRNGKey(0)
    a = jax.random.normal(key, (size, size), jnp.float32)
    square = jax.jit(lambda a: a @ a)
    b, d, c = case.batch, case.dim, case.classes
    xs = jax.random.normal(key, (32, b, d), jnp.float32)
    w, t = jax.random.normal(key, (d, d), jnp.float32) * 1e-3, jax.random.normal(key, (c, d), jnp.float32)

    @jax.jit
    def step_matmuls(w, xs, t):
        def step(w, x):
            g = (x @ w.T) @ t.T @ t
            return w - 1e-6 * (g.T @ x), None
        return jax.lax.scan(step, w, xs)[0]

    big = [jnp.ones(4 * size**2, jnp.float32)]
    stream = jax.jit(lambda x: 0.5 * x + 0.5, donate_argnums=0)  # in place: no fresh pages to fault in

    def step_stream():
        big[0] = stream(big[0])
        return big[0]

    return {"matmul_gflops": best_gflops(lambda: square(a), 2 * size**3, 3),
            "step_gflops": best_gflops(lambda: step_matmuls(w, xs, t), 32 * 4 * b * d * (d + c), 5),
            "memory_gbps": best_gflops(step_stream, 2 * big[0].nbytes, 3)}


def vmapped(case: Case, runs: int, repeats: int) -> dict:
    """Best of ``repeats`` calls of train_runs training all ``runs`` runs in one vmapped program."""
    x, y, text = make_pool(case, runs)
    rows, seeds, hp = run_table(case, runs)
    pool = Pool(x[:, None], y)
    start_rss = rss_mib()
    call = lambda: train_runs(CMMHead(), hp, rows, seeds, pool, text, batch_size=case.batch_size,  # noqa: E731
                              use_aug=False).params
    times, compiles = zip(*(timed(call) for _ in range(repeats)))
    return {"seconds": {runs: min(times)}, "compile_s": sum(compiles), "start_rss_mib": start_rss,
            "peak_rss_mib": peak_rss_mib()}


def loop(case: Case, runs: int, repeats: int) -> dict:
    """A Python loop calling train_runs on one run at a time (one jitted single-run program called ``runs``
    times), each call given only its seed's rows as the pool; seconds after each of the case's S <= runs, best
    over ``repeats`` loops."""
    x, y, text = make_pool(case, runs)
    rows, seeds, hp = run_table(case, runs)
    pools = {int(seed): Pool(x[r, None], y[r]) for seed, r in zip(seeds, rows)}
    local = np.arange(case.n_train, dtype=np.int32)[None]
    start_rss = rss_mib()
    marks = [s for s in case.runs if s <= runs]
    best = {s: float("inf") for s in marks}
    compile_total = 0.0
    for _ in range(repeats):
        elapsed = 0.0
        for i in range(runs):
            one = {k: v[i:i + 1] for k, v in hp.items()}
            pool = pools[int(seeds[i])]
            seconds, compile_s = timed(lambda: train_runs(CMMHead(), one, local, seeds[i:i + 1], pool, text,
                                                          batch_size=case.batch_size, use_aug=False).params)
            elapsed += seconds
            compile_total += compile_s
            if i + 1 in best:
                best[i + 1] = min(best[i + 1], elapsed)
    return {"seconds": best, "compile_s": compile_total, "start_rss_mib": start_rss, "peak_rss_mib": peak_rss_mib()}


def main(argv: list[str]) -> int:
    what, case = argv[0], Case.from_json(argv[1])
    if what == "peak":
        result = peak(case, int(argv[2]))
    else:
        result = {"vmapped": vmapped, "loop": loop}[what](case, *map(int, argv[2:4]))
    print(json.dumps(result))
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
