"""Sweep wall time and compilation: `python -m train_jax` as `run_all.sh` runs it (one process per dataset), this
tree against a baseline commit (default: c21461b, main before shot-count bucketing), cold and warm.

Two sweeps on synthetic caches (unit features near their class prototype; no extraction):
- **demo**: the offline demo's training: Fashion-MNIST's shape (10 classes, dim 32 as cmm-tiny-vit, 32/8/50 train/
  val/test images per class), its defaults (4 methods, shots 1 2 4 8 16, seeds 1 2 3, the default 12-setting grid);
- **sweep**: the 11 benchmarks' class counts (data/datasets.json), one cache each of ``--dim`` features with 16
  train, 4 val and ``--test`` test images per class, 4 methods, shots 1 2 4 8 16, seeds 1 2 3, ``--grid``.

Each side runs every sweep cold (an empty persistent compilation cache) and then warm (the cache its cold run filled),
rounds interleaved (baseline cold, this cold, baseline warm, this warm). The baseline has no cache of its own: it gets
JAX's (``JAX_COMPILATION_CACHE_DIR``, every program cached), as the issue measured it. A wrapper around each process
counts the programs it built (XLA compiles and persistent-cache loads, jax.monitoring) and their seconds.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

from bench.common import format_table, machine_lines
from data.registry import dataset_names, get_dataset

ROOT = Path(__file__).resolve().parents[1]
SHOTS, SEEDS, METHODS = "1 2 4 8 16", "1 2 3", "zeroshot linear_probe cmm_ce cmm"
HEADERS = ["sweep", "round", "phase", "side", "wall s", "programs", "training programs", "compiled", "compile s"]
# Runs train_jax's CLI in the side's tree and writes what the process compiled to argv[1].
WRAPPER = """
import json, sys, jax.monitoring as m
tot = {"programs": 0, "cache_hits": 0, "compile_s": 0.0, "train_programs": 0}
def on_duration(event, secs, fun_name="", **_):
    if event == "/jax/core/compile/backend_compile_duration":
        tot["programs"] += 1; tot["compile_s"] += secs; tot["train_programs"] += "train" in fun_name
def on_event(event, **_):
    if event == "/jax/compilation_cache/cache_hits":
        tot["cache_hits"] += 1
m.register_event_duration_secs_listener(on_duration); m.register_event_listener(on_event)
from train_jax.__main__ import main
rc = main(sys.argv[2:])
json.dump(tot, open(sys.argv[1], "w"))
sys.exit(rc)
"""
# Writes a synthetic cache from an .npz (argv 1) to argv 2 with the cache writer of the tree it runs in.
CACHE_WRITER = """
import sys, numpy as np
try:
    from data.cache_writer import write_cache
except ImportError:  # a tree from before the writer had its own module
    from data.cache import write_cache
a, name = np.load(sys.argv[1]), sys.argv[3]
splits = {s: {"features": a[s + "_features"], "labels": a[s + "_labels"],
              "paths": np.array([f"{s}/{i}.png" for i in range(len(a[s + "_labels"]))])}
          for s in ("train", "val", "test")}
write_cache(sys.argv[2], attrs={"dataset": name, "model": "synthetic", "embed_dim": a["text"].shape[-1]},
            classnames=[f"class {c}" for c in range(len(a["text"]))], templates=["a photo of a {}."],
            text_features=a["text"], splits=splits)
"""


def write_synthetic(trees: dict[str, Path], folder: Path, name: str, classes: int, dim: int,
                    per_split: dict[str, int], seed: int) -> dict[str, Path]:
    """A cache of ``classes`` prototypes [C,1,D] and per-split images normalise(prototype + noise), written by each
    side's own ``data.cache`` (the format may differ between commits) -> side: its copy, folder/side/name.h5."""
    rng = np.random.default_rng(seed)
    unit = lambda x: (x / np.linalg.norm(x, axis=-1, keepdims=True)).astype(np.float32)  # noqa: E731
    text = unit(rng.normal(size=(classes, dim)))
    arrays = {"text": text[:, None]}
    for split, per_class in per_split.items():
        labels = np.repeat(np.arange(classes), per_class)
        arrays[f"{split}_features"] = unit(text[labels] + 1.2 * rng.normal(size=(len(labels), dim)) / np.sqrt(dim))
        arrays[f"{split}_labels"] = labels
    source = folder / f"{name}.npz"
    np.savez(source, **arrays)
    paths = {}
    for side, tree in trees.items():
        (folder / side).mkdir(exist_ok=True)
        paths[side] = folder / side / f"{name}.h5"
        subprocess.run([sys.executable, "-c", CACHE_WRITER, str(source), str(paths[side]), name], cwd=tree,
                       env={**os.environ, "PYTHONPATH": str(tree)}, check=True)
    return paths


def run_sweep(tree: Path, caches: list[Path], out: Path, env: dict[str, str], extra: list[str]) -> dict:
    """One ``python -m train_jax`` per cache, in ``tree`` (the caches' one template: ``--prompt single``) -> wall
    seconds, programs, cache hits, training programs, compile seconds."""
    total = {"wall_s": 0.0, "programs": 0, "cache_hits": 0, "compile_s": 0.0, "train_programs": 0}
    for cache in caches:
        stats = out / f"{cache.stem}.compile.json"
        argv = ["--cache", str(cache), "--out", str(out / cache.stem), "--shots", *SHOTS.split(),
                "--seeds", *SEEDS.split(), "--methods", *METHODS.split(), "--prompt", "single", *extra]
        start = time.perf_counter()
        proc = subprocess.run([sys.executable, "-c", WRAPPER, str(stats), *argv], cwd=tree, capture_output=True,
                              text=True, env={**env, "PYTHONPATH": str(tree)})
        total["wall_s"] += time.perf_counter() - start
        if proc.returncode != 0:
            raise SystemExit(f"error: {tree}: train_jax failed on {cache}:\n{proc.stderr[-3000:]}")
        for key, value in json.loads(stats.read_text()).items():
            total[key] += value
    return total


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m bench.bench_sweep", description=__doc__.split("\n\n")[0])
    p.add_argument("--baseline", default="c21461b", help="git commit to compare against (default: %(default)s)")
    p.add_argument("--dim", type=int, default=256, help="feature dim of the 11-dataset sweep (default: %(default)s)")
    p.add_argument("--test", type=int, default=5, help="test images per class of the sweep (default: %(default)s)")
    p.add_argument("--grid", nargs="+", default=["lr=1e-2", "epochs=2"],
                   help="the sweep's --grid (default: %(default)s; the demo keeps the default grid)")
    p.add_argument("--datasets", nargs="+", default=dataset_names("benchmark"), help="the sweep's datasets")
    p.add_argument("--rounds", type=int, default=1, help="interleaved rounds (default: %(default)s)")
    p.add_argument("--skip", choices=["demo", "sweep"], default=None, help="leave one of the two sweeps out")
    args = p.parse_args(argv)

    print("\n".join(machine_lines(["jax", "jaxlib", "flax", "optax"])))
    tmp = Path(tempfile.mkdtemp(prefix="bench_sweep_"))
    try:
        base = tmp / "baseline"
        base.mkdir()
        archive = subprocess.run(["git", "archive", args.baseline], cwd=ROOT, capture_output=True, check=True)
        subprocess.run(["tar", "-x", "-C", str(base)], input=archive.stdout, check=True)
        trees = {"baseline": base, "this": ROOT}
        sweeps = {}  # name -> (side -> caches, class counts, extra train_jax arguments)
        if args.skip != "demo":
            demo = write_synthetic(trees, tmp, "FashionMNIST", 10, 32, {"train": 32, "val": 8, "test": 50}, 0)
            sweeps["demo"] = ({side: [path] for side, path in demo.items()}, [10], [])
        if args.skip != "sweep":
            classes = [len(get_dataset(name).classnames) for name in args.datasets]
            caches = [write_synthetic(trees, tmp, name, c, args.dim, {"train": 16, "val": 4, "test": args.test}, i)
                      for i, (name, c) in enumerate(zip(args.datasets, classes))]
            sweeps["sweep"] = ({side: [c[side] for c in caches] for side in trees}, classes, ["--grid", *args.grid])
        env = {k: v for k, v in os.environ.items() if not k.startswith(("JAX_COMPILATION_CACHE", "JAX_PERSISTENT",
                                                                          "CMM_JAX_CACHE"))}
        env["JAX_PLATFORMS"] = env.get("JAX_PLATFORMS", "cpu")
        rows, results = [], {}
        for r in range(args.rounds):
            for sweep, (caches, _, extra) in sweeps.items():
                for phase in ("cold", "warm"):
                    for side, tree in trees.items():
                        cache_dir = tmp / f"jax-cache-{side}-{sweep}-{r}"
                        side_env = {**env, "CMM_JAX_CACHE": str(cache_dir)} if side == "this" else {
                            **env, "JAX_COMPILATION_CACHE_DIR": str(cache_dir),
                            "JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS": "0",
                            "JAX_PERSISTENT_CACHE_MIN_ENTRY_SIZE_BYTES": "-1"}
                        out = tmp / f"out-{side}-{sweep}-{phase}-{r}"
                        res = run_sweep(tree, caches[side], out, side_env, extra)
                        shutil.rmtree(out)
                        results[(sweep, phase, side, r)] = res
                        rows.append([sweep, r, phase, side, f"{res['wall_s']:.1f}", res["programs"],
                                     res["train_programs"], res["programs"] - res["cache_hits"],
                                     f"{res['compile_s']:.1f}"])
                        print(format_table(HEADERS, rows[-1:]).splitlines()[-1], flush=True)
        print()
        print(format_table(HEADERS, rows))
        print()
        for sweep, (_, classes, _) in sweeps.items():
            med = lambda phase, side: float(np.median([results[(sweep, phase, side, r)]["wall_s"]  # noqa: E731
                                                       for r in range(args.rounds)]))
            cold = {side: results[(sweep, "cold", side, 0)] for side in ("baseline", "this")}
            print(f"{sweep}: baseline cold / this cold = {med('cold', 'baseline') / med('cold', 'this'):.2f}x; "
                  f"this cold / this warm = {med('cold', 'this') / med('warm', 'this'):.2f}; baseline cold / "
                  f"baseline warm = {med('cold', 'baseline') / med('warm', 'baseline'):.2f}; built cold (training "
                  f"programs): baseline {cold['baseline']['programs']} ({cold['baseline']['train_programs']}), "
                  f"this {cold['this']['programs']} ({cold['this']['train_programs']}); (method, class count) pairs: "
                  f"{len(METHODS.split()) * len(set(classes))}")
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
