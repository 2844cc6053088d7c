"""Training throughput: the vmapped, jitted CMM runner against a JAX loop and a PyTorch loop over runs (issue 5).

For each case (synthetic unit features, frozen text prototypes, CMM with batch 256, AdamW, warm-up + cosine) and
each S (runs = seeds x settings of a 12-setting lr x alpha x lambda grid), in separate processes (so that each
measurement's peak RSS, ru_maxrss, is its own):
  vmapped      `train_jax.runner.train_runs` on all S runs at once: one jitted program over the run axis
               (runs sharing a seed fold into one wider step, see train_jax/runner.py);
  JAX loop     `train_runs` on one run at a time, S calls (one jitted single-run program, reused);
  PyTorch loop `bench/train_torch.py`: the same model, loss, AdamW and schedule, one run after another, as
               straightforward eager PyTorch, with the same thread count, on --torch-device (the GPU if any).
The loops run max(S) runs once; the time of a loop over S runs is its time after run S. JAX's trace + compile
time (reported by jax.monitoring) is subtracted and shown apart; PyTorch gets one untimed warm-up step.
GFLOP/s = useful matmul FLOPs (see `bench.train_problems.useful_flops`) / seconds, against the machine's peak: a
4096 x 4096 float32 matmul in JAX, measured in every round of every case, the best kept. "others' CPU %" is the
share of the machine's CPU that other processes took during a measurement (above ~10% its time is noisy). Prints
one table per case and a summary line with the targets.

    python -m bench.bench_train                     # all cases, ~8 min on 2 CPU cores
    python -m bench.bench_train --case small --runs 1,3,10,30 --epochs 20
"""
from __future__ import annotations

import argparse
import dataclasses
import json
import os
import subprocess
import sys
from pathlib import Path

if __package__ in (None, ""):  # `python bench/bench_train.py`
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench.common import format_table, load_average, machine_lines, timed, usable_cores  # noqa: E402
from bench.train_problems import CASES, Case, state_bytes, useful_flops  # noqa: E402
from data.progress import progress  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
PACKAGES = ["jax", "jaxlib", "flax", "optax", "torch", "numpy"]
REPEATS = {"large": 1, "small": 2, "tiny": 3}  # calls per measurement (best kept); large is the expensive one
ORDER = ("tiny", "small", "large")  # cheapest first
TARGETS = {"large": 0.8, "small": 2.0}


class BenchError(Exception):
    """Bad option or a failed measurement; the message says which."""


def worker(module: str, *args: object) -> dict:
    """Run ``python -m bench.<module> args...`` from the repository root; its last stdout line, as JSON, plus
    ``others``: the share of the machine's CPU that other processes took meanwhile (`bench.common.timed`)."""
    env = {**os.environ, "TQDM_DISABLE": "1", "PYTHONPATH": os.pathsep.join(filter(None, [str(ROOT),
                                                                                       os.environ.get("PYTHONPATH")]))}
    done: list[subprocess.CompletedProcess] = []
    timing = timed(lambda: done.append(subprocess.run([sys.executable, "-m", f"bench.{module}", *map(str, args)],
                                                      cwd=ROOT, env=env, capture_output=True, text=True)))
    proc = done[0]
    if proc.returncode != 0:
        last = (proc.stderr.strip().splitlines() or ["(no output)"])[-1]
        raise BenchError(f"bench.{module} {args[0]} failed (exit {proc.returncode}): {last}")
    return {**json.loads(proc.stdout.strip().splitlines()[-1]), "others": timing.others}


def measure_case(case: Case, repeats: int, threads: int, torch_loop: bool, rounds: int, peak_size: int,
                 torch_device: str = "auto") -> dict:
    """Every measurement of one case: the ceilings (``peak``: matmul peak, the step's matmuls, memory bandwidth),
    vmapped per S, the JAX loop and the PyTorch loop over max(S) runs; all of them ``rounds`` times in turn,
    keeping each one's best round (the fastest time, the highest ceilings), so that a slow phase of a shared
    machine hits every implementation and the peak alike."""
    spec, top = case.to_json(), max(case.runs)
    jobs = [("peak", 0, "train_worker_jax", ("peak", spec, peak_size))]
    jobs += [("vmapped", s, "train_worker_jax", ("vmapped", spec, s, repeats)) for s in case.runs]
    jobs.append(("jax_loop", top, "train_worker_jax", ("loop", spec, top, repeats)))
    if torch_loop:
        jobs.append(("torch_loop", top, "train_worker_torch", ("loop", spec, top, repeats, threads, torch_device)))
    best: dict = {}
    with progress(jobs * rounds, desc=case.name, unit="measurement", leave=False) as bar:
        for name, s, module, args in bar:
            bar.set_postfix_str(f"{name} S={s}" if s else name)
            result, old = worker(module, *args), best.get((name, s))
            if name == "peak":
                best[name, s] = {k: max(v, old[k]) if old else v for k, v in result.items()}
            elif old is None or result["seconds"][str(s)] < old["seconds"][str(s)]:
                best[name, s] = result
    return {"vmapped": {s: r for (name, s), r in best.items() if name == "vmapped"},
            **{name: r for (name, _), r in best.items() if name != "vmapped"}}


def case_table(case: Case, res: dict, peak: float) -> str:
    """The Markdown table of one case: per S, runs/s, ratios, GFLOP/s and peak RSS of each implementation."""
    flops = useful_flops(case)
    loops = [k for k in ("jax_loop", "torch_loop") if k in res]
    base = res["vmapped"][case.runs[0]]["seconds"][str(case.runs[0])] / case.runs[0]
    rows = []
    for s in case.runs:
        vm = res["vmapped"][s]
        sec = {"vmapped": vm["seconds"][str(s)], **{k: res[k]["seconds"][str(s)] for k in loops}}
        mem = {"vmapped": vm, **{k: res[k] for k in loops}}
        rows.append([s, sec["vmapped"], sec["vmapped"] / (base * case.runs[0]) if s != case.runs[0] else 1.0,
                     *(s / sec[k] for k in sec), *(sec[k] / sec["vmapped"] for k in loops),
                     *(s * flops / sec[k] / 1e9 for k in sec), 100 * s * flops / sec["vmapped"] / 1e9 / peak,
                     *(f"{m['peak_rss_mib']:.0f} (+{m['peak_rss_mib'] - m['start_rss_mib']:.0f})"
                       for m in mem.values()), vm["compile_s"], 100 * vm["others"]])
    names = {"vmapped": "vmapped", "jax_loop": "JAX loop", "torch_loop": "PyTorch"}
    impls = ["vmapped", *loops]
    headers = ["S", "vmapped s", f"s / s(S={case.runs[0]})", *(f"{names[k]} runs/s" for k in impls),
               *(f"vmapped / {names[k]}" for k in loops), *(f"{names[k]} GFLOP/s" for k in impls),
               "vmapped % of peak", *(f"{names[k]} MiB" for k in impls), "compile s", "others' CPU %"]
    return format_table(headers, rows)


def summary(cases: list[Case], results: dict, peak: float) -> str:
    """One line: each case's figure against its target from the issue."""
    parts = []
    for case in cases:
        res, top = results[case.name], max(case.runs)
        sec = res["vmapped"][top]["seconds"][str(top)]
        if case.name == "large":
            pct = top * useful_flops(case) / sec / 1e9 / peak
            parts.append(f"large S={top}: {100 * pct:.0f}% of the matmul peak (target >= 80%: "
                         f"{'met' if pct >= TARGETS['large'] else 'missed'})")
        elif case.name == "small" and "torch_loop" in res:
            ratio = res["torch_loop"]["seconds"][str(top)] / sec
            parts.append(f"small S={top}: {ratio:.2f}x the PyTorch loop (target >= 2x: "
                         f"{'met' if ratio >= TARGETS['small'] else 'missed'})")
        elif case.name == "small":
            parts.append(f"small S={top}: {top * useful_flops(case) / sec / 1e9:.0f} GFLOP/s (no PyTorch loop)")
        elif case.name == "tiny":
            one = res["vmapped"][case.runs[0]]["seconds"][str(case.runs[0])]
            parts.append(f"tiny S={top} takes {sec / one:.1f}x the time of S={case.runs[0]} (target ~1x)")
    return f"train throughput (peak {peak:.0f} GFLOP/s): " + "; ".join(parts)


def parse_runs(text: str) -> tuple[int, ...]:
    try:
        runs = tuple(sorted({int(v) for v in text.split(",") if v.strip()}))
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r}: expected comma-separated run counts, e.g. 1,3,10,30") from None
    if not runs or runs[0] < 1:
        raise argparse.ArgumentTypeError(f"{text!r}: run counts must be >= 1")
    return runs


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m bench.bench_train", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--case", choices=[*CASES, "all"], default="all",
                        help="problem size: " + "; ".join(f"{c.name}: {c.describe()}, S = "
                                                           f"{','.join(map(str, c.runs))}" for c in CASES.values())
                        + " (default all)")
    parser.add_argument("--runs", type=parse_runs, help="run counts S, comma-separated (default: per case, above)")
    parser.add_argument("--epochs", type=int, help="epochs per run (default: per case, above; runs/s scales as "
                                                   "1/epochs)")
    parser.add_argument("--dim", type=int, help="feature dim (default: per case, above)")
    parser.add_argument("--repeats", type=int, help="calls per measurement, the best is kept (default: large 1, "
                                                    "small 2, tiny 3)")
    parser.add_argument("--rounds", type=int, default=1, help="times every measurement is repeated, in turn with "
                        "the others, keeping its fastest round (default 1)")
    parser.add_argument("--threads", type=int, default=usable_cores(),
                        help=f"PyTorch threads (default {usable_cores()}: the usable cores, as XLA uses)")
    parser.add_argument("--peak-size", type=int, default=4096, help="side of the square float32 matmul that "
                        "measures the peak GFLOP/s (default 4096; memory bandwidth is timed on 4 x side^2 floats)")
    parser.add_argument("--no-torch", action="store_true", help="skip the PyTorch loop")
    parser.add_argument("--torch-device", default="auto", help="device of the PyTorch loop and matmul: auto (CUDA "
                        "if PyTorch sees a GPU; default), cpu or cuda. JAX uses its default device")
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        bad = [f"--{k} {v}" for k, v in (("epochs", args.epochs), ("repeats", args.repeats), ("dim", args.dim),
                                           ("threads", args.threads), ("peak-size", args.peak_size),
                                           ("rounds", args.rounds))
               if v is not None and v < 1]
        if bad:
            raise BenchError(f"{', '.join(bad)}: must be >= 1")
        cases = [dataclasses.replace(CASES[name], runs=args.runs or CASES[name].runs,
                                     epochs=args.epochs or CASES[name].epochs, dim=args.dim or CASES[name].dim)
                 for name in ORDER if args.case in (name, "all")]
        print("\n".join(machine_lines(PACKAGES)))
        print(f"load average at start: {load_average():.2f}; PyTorch threads {args.threads}")
        if not args.no_torch:
            torch_peak = worker("train_worker_torch", "peak", args.peak_size, args.threads, args.torch_device)
            print(f"PyTorch matmul ({args.peak_size}^2 float32, best of 3, {torch_peak['device']}): "
                  f"{torch_peak['matmul_gflops']:.0f} GFLOP/s")
        results = {}
        for case in cases:
            repeats = args.repeats or REPEATS[case.name]
            results[case.name] = measure_case(case, repeats, args.threads, not args.no_torch, args.rounds,
                                              args.peak_size, args.torch_device)
        peak = max(r["peak"]["matmul_gflops"] for r in results.values())
        bandwidth = max(r["peak"]["memory_gbps"] for r in results.values())
        print(f"JAX matmul peak ({args.peak_size}^2 float32, best of 3 per round, best over all rounds and cases): "
              f"{peak:.0f} GFLOP/s; memory {bandwidth:.1f} GB/s")
        for case in cases:
            res, top = results[case.name], max(case.runs)
            repeats = args.repeats or REPEATS[case.name]
            floor = top * case.steps * state_bytes(case) / bandwidth / 1e9
            print(f"\n{case.name}: {case.describe()}; useful {useful_flops(case) / 1e9:.3g} GFLOP per run; best of "
                  f"{repeats} calls x {args.rounds} rounds; the step's matmuls alone: "
                  f"{res['peak']['step_gflops']:.0f} GFLOP/s; AdamW state from memory at S={top}: >= {floor:.3g} s; "
                  "others' CPU % during the loops: "
                  + ", ".join(f"{k} {100 * res[k]['others']:.0f}" for k in ("jax_loop", "torch_loop") if k in res))
            print(case_table(case, res, peak))
        print()
        print(summary(cases, results, peak))
    except BenchError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
