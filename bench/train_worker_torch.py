"""PyTorch side of the training bench, one measurement per process (so that its peak RSS is its own); started by
``bench.bench_train``, prints one JSON line.

    python -m bench.train_worker_torch peak N THREADS DEVICE         # N x N float32 matmul GFLOP/s, for reference
    python -m bench.train_worker_torch loop CASE S R THREADS DEVICE  # bench.train_torch over S runs; best of R loops

CASE is the JSON of a ``bench.train_problems.Case``; THREADS is passed to ``torch.set_num_threads``; DEVICE is cpu,
cuda or auto (CUDA if there is a GPU). The matmul is true float32 on CUDA too (PyTorch's default: no TF32).
"""
from __future__ import annotations

import json
import sys
import time

import torch

from bench.common import peak_rss_mib
from bench.train_problems import Case, make_pool, run_table
from bench.train_torch import train_loop


def rss_mib() -> float:
    """Current resident memory of this process in MiB (Linux)."""
    with open("/proc/self/statm", encoding="ascii") as f:
        return int(f.read().split()[1]) * 4096 / 2**20


def sync(device: str) -> None:
    """Wait for queued GPU work, so that timings include it."""
    if device.startswith("cuda"):
        torch.cuda.synchronize(device)


def peak(size: int, device: str) -> dict:
    """GFLOP/s of a size x size float32 matmul on ``device``, best of 3 after a warm-up."""
    a = torch.randn(size, size, generator=torch.Generator().manual_seed(0)).to(device)
    a @ a
    sync(device)
    times = []
    for _ in range(3):
        start = time.perf_counter()
        a @ a
        sync(device)
        times.append(time.perf_counter() - start)
    return {"matmul_gflops": 2 * size**3 / min(times) / 1e9, "device": device}


def loop(case: Case, runs: int, repeats: int, device: str) -> dict:
    """Seconds after each of the case's S <= runs of a loop over ``runs`` runs, best over ``repeats`` loops."""
    x, y, text = make_pool(case, runs)
    rows, seeds, hp = run_table(case, runs)
    start_rss = rss_mib()
    marks = [s for s in case.runs if s <= runs]
    best = {s: float("inf") for s in marks}
    train_loop(x, y, text, rows[:1, :case.batch], seeds[:1], {k: v[:1] for k, v in hp.items()}, batch=case.batch,
               epochs=1, device=device)  # warm-up: one step (thread pools, first allocations, CUDA kernels)
    for _ in range(repeats):
        done = []
        start = time.perf_counter()
        train_loop(x, y, text, rows, seeds, hp, batch=case.batch, epochs=case.epochs, device=device,
                   on_run=lambda i: done.append(time.perf_counter() - start))
        for s in marks:
            best[s] = min(best[s], done[s - 1])
    return {"seconds": best, "start_rss_mib": start_rss, "peak_rss_mib": peak_rss_mib(),
            "threads": torch.get_num_threads(), "device": device}


def main(argv: list[str]) -> int:
    *args, threads, device = argv
    torch.set_num_threads(int(threads))
    device = ("cuda" if torch.cuda.is_available() else "cpu") if device == "auto" else device
    result = (peak(int(args[1]), device) if args[0] == "peak"
              else loop(Case.from_json(args[1]), int(args[2]), int(args[3]), device))
    print(json.dumps(result))
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
