"""What a 16-shot sweep of the peer methods with their own trainers (clap, lp_plus_plus, cross_modal_lp) costs: each
trainer timed on one synthetic dataset at a fraction of its authors' epochs / iterations (cold: with compilation,
then warm), its seconds per sequential step, and the 11 benchmarks' sweep estimated from those and the step counts.

A trainer's steps are sequential (a scan); each step does work proportional to (rows per step) x classes x dim
for every run. The estimate of a dataset is ``steps x max(latency, work / rate)``: on this machine with the rate
measured here (seconds per unit of work of the timed dataset); on a GPU with ``--gpu-latency-us`` per step (a
loop iteration of a few fused kernels) and ``--gpu-tflops`` of float32 matmul throughput, both assumptions until
measured there (run this script on the GPU: its own "this machine" column is then the measurement).

    python -m bench.bench_peers                 # classes 100, dim 1024, 10 views, 3 seeds (~2 min on 2 cores)
    python -m bench.bench_peers --dim 512 --fraction 0.02
"""

from __future__ import annotations

import argparse
import math
import time

import jax
import numpy as np

from bench.common import format_table, machine_lines
from data.cache import Split
from data.registry import dataset_names, get_dataset
from train_jax import clap, cross_modal, lpp
from train_jax.config import Settings
from train_jax.methods import METHODS
from train_jax.trainers import Job

SHOTS = 16


def synthetic_job(method: str, classes: int, dim: int, views: int, seeds: int, batch_size: int | None = None) -> Job:
    """A Job of ``seeds`` runs per setting of ``method`` (16 shots a class, 4 validation rows a class) on random
    unit features."""
    rng = np.random.default_rng(0)
    unit = lambda *shape: (lambda x: x / np.linalg.norm(x, axis=-1, keepdims=True))(  # noqa: E731
        rng.normal(size=shape).astype(np.float32))
    n = SHOTS * classes
    labels = np.tile(np.repeat(np.arange(classes), SHOTS), seeds)
    split = Split(unit(seeds * n, dim), labels, np.array([f"{i}.png" for i in range(seeds * n)]),
                  unit(seeds * n, views, dim) if views else None)
    settings = METHODS[method].settings([Settings()], classes)
    if batch_size is not None:
        settings = [s for s in settings if s.batch_size == batch_size]
    runs = [(seed, s) for s in settings for seed in range(seeds)]
    rows = np.stack([np.arange(seed * n, (seed + 1) * n) for seed, _ in runs])
    val_labels = np.repeat(np.arange(classes), 4)
    return Job(METHODS[method].head(settings[0]), [s for _, s in runs], split, np.arange(seeds * n), rows,
               np.array([seed + 1 for seed, _ in runs]), unit(classes, dim), "Synth", unit(len(val_labels), dim),
               val_labels, np.ones((len(runs), len(val_labels)), bool))


def steps_and_work(method: str, classes: int, dim: int, views: int, seeds: int) -> list[tuple[int, float]]:
    """(sequential steps, work per step) of each program of ``method`` on a 16-shot dataset; work = multiply-adds
    of the step's forward pass over all its runs (backward and update are a fixed multiple of it)."""
    n = SHOTS * classes
    if method == "clap":
        batch, steps = clap.epoch_shape(n, max(views, 1))
        return [(clap.EPOCHS * steps, seeds * batch * classes * dim)]
    if method == "lp_plus_plus":
        return [(lpp.EPOCHS, seeds * n * classes * dim)]
    out = []
    for batch in cross_modal.GRID["batch_size"]:
        if cross_modal.admits(batch, classes):
            settings = math.prod(len(v) for k, v in cross_modal.GRID.items() if k != "batch_size")
            out.append((cross_modal.ITERS, seeds * settings * (batch * classes * dim + 4 * classes * dim)))
    return out


def time_method(method: str, classes: int, dim: int, views: int, seeds: int, fraction: float) -> dict:
    """The method's trainer(s) on one synthetic dataset at ``fraction`` of its epochs / iterations (cold: the first
    call, with compilation; warm: again) and at twice that (warm): the seconds per unit of work from the difference
    of the two warm runs, and the fixed seconds (start-up work that does not grow with the steps)."""
    programs = steps_and_work(method, classes, dim, views, seeds)
    batches = cross_modal.GRID["batch_size"] if method == "cross_modal_lp" else [None]
    cold, warm = 0.0, [0.0, 0.0]
    units = [0.0, 0.0]
    for (steps, work), batch in zip(programs, batches):
        job = synthetic_job(method, classes, dim, views, seeds, batch)
        for k, times in enumerate((1, 2)):
            if method == "clap":
                epochs = times * max(2, round(clap.EPOCHS * fraction))
                run, done = (lambda e=epochs: clap.fit(job, e)), epochs * steps // clap.EPOCHS
            elif method == "lp_plus_plus":
                epochs = times * max(2, round(lpp.EPOCHS * fraction))
                run, done = (lambda e=epochs: lpp.fit(job, e)), epochs
            else:
                iters = times * max(2, round(cross_modal.ITERS * fraction))
                run, done = (lambda i=iters: cross_modal.fit(job, i)), iters
            for phase in ("cold", "warm"):
                start = time.perf_counter()
                jax.block_until_ready(run().params)
                seconds = time.perf_counter() - start
                if phase == "cold" and k == 0:
                    cold += seconds
                elif phase == "warm":
                    warm[k] += seconds
            units[k] += done * work
    per_work = max(warm[1] - warm[0], 0.0) / (units[1] - units[0])
    fixed = max(0.0, warm[0] - per_work * units[0])
    return {"cold_s": cold, "warm_s": warm[0], "s_per_work": per_work, "fixed_s": fixed}


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--classes", type=int, default=100)
    p.add_argument("--dim", type=int, default=1024, help="feature dim (RN50 1024, ViT-B 512)")
    p.add_argument("--views", type=int, default=10, help="cached augmented views per image (0: none)")
    p.add_argument("--seeds", type=int, default=3)
    p.add_argument("--fraction", type=float, default=0.03, help="share of the authors' epochs / iterations timed")
    p.add_argument("--gpu-latency-us", type=float, default=100.0, help="assumed seconds of a GPU loop step, in us")
    p.add_argument("--gpu-tflops", type=float, default=20.0, help="assumed float32 multiply-add throughput, TFLOP/s")
    args = p.parse_args(argv)
    print("\n".join(machine_lines(["jax", "jaxlib", "numpy"])))
    methods = ("clap", "lp_plus_plus", "cross_modal_lp")
    timed = {m: time_method(m, args.classes, args.dim, args.views, args.seeds, args.fraction) for m in methods}
    print(f"\nTimed: {args.classes} classes, dim {args.dim}, {args.views} views, {args.seeds} seeds, 16 shots, "
          f"{args.fraction:g} of the steps")
    print(format_table(["method", "cold s", "warm s", "fixed s", "ns per unit of work"],
                       [[m, f"{t['cold_s']:.1f}", f"{t['warm_s']:.1f}", f"{t['fixed_s']:.1f}",
                         f"{1e9 * t['s_per_work']:.3f}"] for m, t in timed.items()]))
    rows, totals = [], {m: [0.0, 0.0] for m in methods}
    for name in dataset_names("benchmark"):
        classes = len(get_dataset(name).classnames)
        cells = [name, str(classes)]
        for m in methods:
            here, gpu = timed[m]["fixed_s"], 0.0
            steps_total = 0
            for steps, work in steps_and_work(m, classes, args.dim, args.views, args.seeds):
                here += steps * work * timed[m]["s_per_work"]
                gpu += steps * max(args.gpu_latency_us * 1e-6, 6 * work / (args.gpu_tflops * 1e12))
                steps_total += steps
            totals[m][0] += here
            totals[m][1] += gpu
            cells += [str(steps_total), f"{here:.0f}", f"{gpu:.1f}"]
        rows.append(cells)
    rows.append(["total", ""] + [x for m in methods for x in ("", f"{totals[m][0]:.0f}", f"{totals[m][1]:.1f}")])
    headers = ["dataset", "classes"] + [f"{m} {h}" for m in methods for h in ("steps", "here s", "GPU s")]
    print(f"\n16-shot sweep estimate (training only, warm; here: the fixed seconds as timed plus the steps; GPU: "
          f"{args.gpu_latency_us:g} us a step, {args.gpu_tflops:g} TFLOP/s, 6 flops per multiply-add of the forward: "
          "forward, backward, update)")
    print(format_table(headers, rows))
    print(f"\nall three, 11 datasets: here {sum(t[0] for t in totals.values()):.0f} s, "
          f"GPU {sum(t[1] for t in totals.values()):.0f} s (+ compilation: cold - warm above, per program)")


if __name__ == "__main__":
    main()
