"""What learning the class prototypes changes: CMM and CE-only CMM with frozen prompts (learn_text=0), learned ones
(learn_text=1, T' = T + ΔT) and the choice validation makes between them, on synthetic caches with a known
modality gap (``tests/helpers_train.GapWorld``: a rotation plus a shared offset between image and text features).

Two worlds: ``exact`` (the cached prompts are the class centres' text side, so only the gap separates them) and
``noisy`` (each cached prototype perturbed by noise of norm ``--prompt-noise``, as a poorly worded prompt would).
Every run trains the default grid (lr x alpha x lambda x learn_text, ``train_jax.config.DEFAULT_GRID``) once; the
table then selects on validation among the learn_text=0 runs only, the learn_text=1 runs only, and all of them
(the default), per seed, and reports test accuracy (mean ± std over seeds) and how many seeds chose learned
prototypes.

    python -m bench.bench_learn_text                       # 2 worlds x 5 shot counts x 5 seeds, minutes on 2 cores
    python -m bench.bench_learn_text --shots 1 4 --seeds 1 2 --epochs 5   # a smoke run
"""
from __future__ import annotations

import argparse
import dataclasses
import sys
import tempfile
from pathlib import Path

import numpy as np

from bench.common import format_table, machine_lines
from data.cache_writer import write_cache
from data.vectors import l2_normalize
from train_jax.config import DEFAULT_GRID, Settings, expand_grid
from train_jax.evaluate import mean_std, select_best
from train_jax.experiment import load_task, run_shots
from train_jax.records import RunRecord

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))
from helpers_train import GapWorld  # noqa: E402  (the tests' synthetic worlds)

PACKAGES = ["jax", "flax", "optax", "numpy"]
METHODS = ("cmm_ce", "cmm")


def write_world(path: Path, world: GapWorld, noise: float, train: int, val: int, test: int) -> Path:
    """A cache of ``world`` whose prototypes are its text features plus noise of norm ``noise`` per class."""
    splits = {"train": world.split("train", train), "val": world.split("val", val), "test": world.split("test", test)}
    jitter = world.rng.normal(size=world.text.shape)
    text = l2_normalize(world.text + noise * jitter / np.linalg.norm(jitter, axis=-1, keepdims=True))
    return write_cache(path, attrs={"dataset": path.stem, "model": "synthetic", "embed_dim": world.dim},
                       classnames=[f"class {c}" for c in range(world.classes)], templates=["a photo of a {}."],
                       text_features=text[:, None, :].astype(np.float32), splits=splits)


def select(records: list[RunRecord], method: str, learn: set[bool]) -> tuple[list[float], int]:
    """Per seed, the test accuracy of the run best on validation among ``method``'s runs with learn_text in
    ``learn`` (the project's rule, ``evaluate.select_best``); and how many of the chosen runs learn T."""
    accs, learned = [], 0
    for seed in sorted({r.seed for r in records}):
        runs = [r for r in records if r.method == method and r.seed == seed and r.settings.learn_text in learn]
        choice = select_best(np.array([r.val_acc for r in runs]),
                             np.array([np.nan if r.val_score is None else r.val_score for r in runs]),
                             np.array([r.failed for r in runs]))
        if choice.index is not None:
            accs.append(runs[choice.index].test_acc)
            learned += runs[choice.index].settings.learn_text
    return accs, learned


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.bench_learn_text", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--shots", type=int, nargs="+", default=[1, 2, 4, 8, 16])
    parser.add_argument("--seeds", type=int, nargs="+", default=[1, 2, 3, 4, 5])
    parser.add_argument("--epochs", type=int, default=Settings().epochs, help="epochs per run (default: Settings')")
    parser.add_argument("--train", type=int, default=64, help="train images per class (default: 64)")
    parser.add_argument("--classes", type=int, default=10)
    parser.add_argument("--dim", type=int, default=64)
    parser.add_argument("--prompt-noise", type=float, default=0.6, help="norm of the noise added to each prototype "
                        "in the 'noisy' world (default: 0.6)")
    args = parser.parse_args(argv)
    print("\n".join(machine_lines(PACKAGES)))
    grid = {k: v for k, v in DEFAULT_GRID.items() if k != "c"}
    settings = [dataclasses.replace(s, epochs=args.epochs) for s in expand_grid(grid)]
    label_keys = [k for k, v in grid.items() if len(v) > 1]
    rows, gains = [], []
    with tempfile.TemporaryDirectory(prefix="bench-learn-text-") as folder:
        for name, noise in (("exact", 0.0), ("noisy", args.prompt_noise)):
            world = GapWorld(seed=0, classes=args.classes, dim=args.dim)
            task = load_task(write_world(Path(folder) / f"{name}.h5", world, noise, args.train, 4, 50),
                             prompt="single")
            for k in args.shots:
                records = run_shots(task, k, args.seeds, list(METHODS), settings, label_keys,
                                    max_shots=max(args.shots)).records
                for method in METHODS:
                    frozen, _ = select(records, method, {False})
                    learned, _ = select(records, method, {True})
                    chosen, n_learned = select(records, method, {False, True})
                    cells = [f"{m:.2f} ± {s:.2f}" for m, s in (mean_std(frozen), mean_std(learned), mean_std(chosen))]
                    gains.append(float(np.mean(chosen) - np.mean(frozen)))
                    rows.append([name, method, k, *cells, f"{n_learned}/{len(chosen)}"])
    print(format_table(["world", "method", "shots", "frozen T (learn_text=0)", "learned T (learn_text=1)",
                        "chosen on validation", "seeds choosing learned T"], rows))
    print(f"learn_text searched on validation vs frozen prototypes only: mean change {np.mean(gains):+.2f} points "
          f"(min {min(gains):+.2f}, max {max(gains):+.2f}) over {len(gains)} (world, method, shots) cells")
    return 0


if __name__ == "__main__":
    sys.exit(main())
