"""The evidence behind CMM's fixed default (``--select none``): every setting of the default grid trained on
synthetic modality-gap worlds (``tests/helpers_train.py``), ranked by test accuracy.

For each world (its own prototypes, rotation, gap and noise) and shot count, every setting of ``cmm`` and
``cmm_ce`` (the default grid restricted by each method) is trained on the same draws of every seed; a setting's
accuracy is its mean test accuracy over the seeds, and the settings are ranked within the (world, shots) cell
(1 = best; ties share their mean rank). The table lists each setting's mean rank over all cells, its mean accuracy
and how many cells it won; the fixed default is the setting with the best mean rank (ties: the higher mean
accuracy). Test accuracy is fine here: these worlds are not the benchmark, they only choose one setting for all.

    python -m bench.fixed_defaults                      # 6 worlds x shots 1 2 4 8 16 x seeds 1 2 3, minutes
    python -m bench.fixed_defaults --worlds 2 --shots 1 4 --seeds 1   # a smoke run
"""

from __future__ import annotations

import argparse
import sys
import tempfile
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))
from helpers_train import GapWorld, write_gap_cache  # noqa: E402

from bench.common import format_table, machine_lines  # noqa: E402
from train_jax.experiment import train_and_evaluate  # noqa: E402
from train_jax.run_config import RunConfig  # noqa: E402

PACKAGES = ("numpy", "jax")
METHODS = ("cmm_ce", "cmm")
# (classes, theta: rotation away from the text cone, gap: the shared offset, sigma: within-class noise); world i
# takes row i % len(WORLDS) with its own random seed i
WORLDS = ((10, 1.5, 1.0, 1.0), (20, 1.0, 0.5, 1.5), (10, 2.0, 1.5, 0.7), (20, 1.5, 1.0, 2.0), (15, 1.0, 1.5, 1.0),
          (15, 2.0, 0.5, 1.5))


def ranks(acc: np.ndarray) -> np.ndarray:
    """Rank of each value of acc [n] (1 = highest; ties share their mean rank) -> [n] float."""
    order = -acc
    return np.array([1 + np.sum(order < v) + (np.sum(order == v) - 1) / 2 for v in order])


def study(worlds: int, shots: list[int], seeds: list[int], dim: int, folder: Path) -> dict[str, list[dict]]:
    """Per method, one row per setting: label, mean rank, mean test accuracy, cells won (best mean rank first)."""
    cells: dict[str, dict[str, list[tuple[float, float]]]] = {m: {} for m in METHODS}  # setting -> (rank, acc)
    for w in range(worlds):
        classes, theta, gap, sigma = WORLDS[w % len(WORLDS)]
        world = GapWorld(seed=100 + w, classes=classes, dim=dim, theta=theta, gap=gap, sigma=sigma)
        cache = write_gap_cache(folder / f"world{w}.h5", world, train=max(shots), val=4, test=60)
        config = RunConfig(cache=str(cache), shots=tuple(shots), seeds=tuple(seeds), methods=METHODS)
        records = train_and_evaluate(config, folder / f"run{w}", say=lambda _: None).records
        for method in METHODS:
            for k in shots:
                runs = [r for r in records if r.method == method and r.shots == k]
                labels = list(dict.fromkeys(r.setting for r in runs))
                acc = np.array([np.mean([r.test_acc for r in runs if r.setting == s]) for s in labels])
                for s, rank, a in zip(labels, ranks(acc), acc):
                    cells[method].setdefault(s, []).append((rank, a))
        print(f"world {w}: classes {classes}, theta {theta}, gap {gap}, sigma {sigma}: done", flush=True)
    out = {}
    for method, by_setting in cells.items():
        rows = [{"setting": s, "mean_rank": float(np.mean([r for r, _ in v])),
                 "mean_acc": float(np.mean([a for _, a in v])), "wins": sum(r == 1.0 for r, _ in v),
                 "cells": len(v)} for s, v in by_setting.items()]
        out[method] = sorted(rows, key=lambda r: (r["mean_rank"], -r["mean_acc"]))
    return out


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.fixed_defaults", description=__doc__.split("\n\n")[0])
    parser.add_argument("--worlds", type=int, default=len(WORLDS), help="synthetic worlds (default: %(default)s)")
    parser.add_argument("--shots", type=int, nargs="+", default=[1, 2, 4, 8, 16])
    parser.add_argument("--seeds", type=int, nargs="+", default=[1, 2, 3])
    parser.add_argument("--dim", type=int, default=64, help="feature dimension (default: %(default)s)")
    args = parser.parse_args(argv)
    print("\n".join(machine_lines(PACKAGES)))
    with tempfile.TemporaryDirectory(prefix="fixed-defaults-") as tmp:
        result = study(args.worlds, args.shots, args.seeds, args.dim, Path(tmp))
    for method, rows in result.items():
        print(f"\n{method}: {args.worlds} worlds x shots {' '.join(map(str, args.shots))} = {rows[0]['cells']} cells, "
              f"seeds {' '.join(map(str, args.seeds))}")
        print(format_table(["setting", "mean rank", "mean test acc %", "cells won"],
                           [[r["setting"], f"{r['mean_rank']:.2f}", f"{r['mean_acc']:.2f}", r["wins"]] for r in rows]))
    print("\nfixed defaults (best mean rank): " + "; ".join(f"{m} {rows[0]['setting']}" for m, rows in result.items()))
    return 0


if __name__ == "__main__":
    sys.exit(main())
