"""CLI: ``python -m train_jax --cache X.h5 --out DIR [...]`` (see ``--help``) parses its arguments into a
``RunConfig``, runs ``experiment.train_and_evaluate`` and prints; ``python -m train_jax predict ...`` classifies new
images with a trained run (``train_jax.predict``)."""

from __future__ import annotations

import argparse
import dataclasses
import sys
from typing import Sequence

from data import args as args_types
from data.cache import CacheError
from data.errors import DataError
from train_jax import compile_cache
from train_jax.config import ALIASES_OUT, DEFAULT_GRID, VIEWS_GRID, Settings, grid_keys_help, parse_grid
from train_jax.errors import TrainError
from train_jax.evaluate import SELECT_MODES
from train_jax.methods import DEFAULT_METHODS, METHODS, VIEW_METHODS, Method
from train_jax.protocols import CROSS_DATASET, FEW_SHOT, PROTOCOLS
from train_jax.run_config import DEFAULT_SEEDS, DEFAULT_SHOTS, RunConfig

UNGIVEN_METHODS = list(DEFAULT_METHODS)  # --methods' default; by identity: not given, so views may add methods


def _fixed_text(method: Method) -> str:
    """The fixed default of a method as ``--help`` shows it: its fields, "its recipe" (own trainer), or "-"."""
    if method.fixed:
        return Settings(**method.fixed).label(list(method.fixed))
    return "its recipe" if method.fit is not None else "-"


_METHODS_HELP = "\n".join(f"  {m.name}: {m.description} [{_fixed_text(m)}]" for m in METHODS.values())

EPILOG = f"""
Selection (on the validation split, never on test): the setting with the best validation accuracy; ties go to
  the higher validation score (mean log-probability of the true class on the run's own validation images),
  then to the first setting in --grid order if the scores are exactly equal. Failed runs are never selected.
  --select seed: one setting per (method, seed); --select mean: one setting per method and shot count, on the
  accuracy and score averaged over the seeds (settings that failed for fewer seeds first).
  --select none: validation-free (CLAP's "realistic" setting): no validation rows are read; each method runs at
  its fixed default (below; --grid may only fix single values, which override it) and the tables say so.
Default grid (the paper publishes no settings):
  {' '.join(f"{ALIASES_OUT.get(k, k)}={','.join(f'{v:g}' for v in vs)}" for k, vs in DEFAULT_GRID.items())}
  and, when the training cache holds augmented views, {' '.join(f"{k}={','.join(f'{v:g}' for v in vs)}"
                                                              for k, vs in VIEWS_GRID.items())}
Fields outside the grid keep their defaults:
  {Settings().label([f.name for f in dataclasses.fields(Settings)])}
Settings (grid keys, aliases in brackets; tip_adapter_f, tip_adapter, gda, clap, lp_plus_plus and cross_modal_lp
ignore the grid and run their authors' recipes, cross_modal_lp with its authors' 12-setting grid; README
"Protocol"):
{grid_keys_help()}
Methods (in brackets: the fixed default --select none runs):
{_METHODS_HELP}
Outputs in --out: results.json, results.csv, results.md, accuracy_vs_shots.png, params/<K>shot.npz
(train_jax.records.load_params), shots/<K>shot.json (finished shots, skipped when rerun),
shots/<K>shot_test_correct.npz (per-image correctness of the selected runs), compare.csv and compare.json (paired
differences against --compare-to, also in results.md), gap.md, gap.json,
gap.png (modality gap before/after the map, train_jax.gap), compile.json (programs compiled by the last
invocation and seconds spent compiling); with --protocol base-to-new also base_to_new.md/.csv/.json (base, new
and HM per method), with cross-dataset cross_dataset.md/.csv/.json (source, each target, target average).
Protocols (train_jax.protocols): few-shot; base-to-new (CoCoOp): train and test on the first ceil(C/2) classes,
score the same models on the other classes' test images against their prototypes; cross-dataset: score the
selected models on each --transfer-to cache's classes. Only models scored by prototypes take part (CMM and
CE-only apply the learned map to the other classes' frozen prototypes; zero-shot is the reference); methods with
per-class weights show "—".
Classify new images with a run: python -m train_jax predict --run DIR --cache NEW.h5 --out preds.csv
"""


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="python -m train_jax",
        description="Few-shot CMM training on a feature cache: all seeds x settings vmapped in one JAX program.",
        epilog=EPILOG,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument("--cache", required=True, help="feature cache (.h5) with train, test (and val) splits")
    p.add_argument("--eval-cache", nargs="+", action="extend", default=[], metavar="H5",
                   help="shift caches (test split) whose classes are a subset of the training classes, e.g. "
                        "ImageNet-V2/-Sketch/-A/-R for an ImageNet cache (the option may be repeated)")
    p.add_argument("--protocol", choices=PROTOCOLS, default=None,
                   help="few-shot (default), base-to-new (CoCoOp: train on the base half of the classes, also score "
                        "the new half) or cross-dataset (implied by --transfer-to); see Protocols below")
    p.add_argument("--transfer-to", nargs="+", action="extend", default=[], metavar="H5",
                   help="cross-dataset targets: caches of other datasets extracted with the same model; the "
                        "selected models are scored on their test split against their own prototypes")
    p.add_argument("--out", required=True, help="output folder (created; rerunning resumes finished shots)")
    p.add_argument("--shots", nargs="+", type=int, default=list(DEFAULT_SHOTS),
                   help="shots per class (default: %(default)s)")
    p.add_argument("--fit-shots", action="store_true",
                   help="skip (with a warning) shots values above the smallest class's train images instead of "
                        "stopping with an error")
    p.add_argument("--seeds", nargs="+", type=args_types.seed, default=list(DEFAULT_SEEDS),
                   help="sampling seeds (default: %(default)s)")
    p.add_argument("--methods", nargs="+", choices=list(METHODS), default=UNGIVEN_METHODS,
                   help=f"methods to train (default: {' '.join(DEFAULT_METHODS)}, and {' '.join(VIEW_METHODS)} "
                        "when the training cache holds augmented views)")
    p.add_argument("--grid", nargs="+", action="extend", default=None, metavar="KEY=V1,V2",
                   help="settings grid, e.g. lr=1e-3,1e-4 alpha=1,2 (default: see below; may be repeated)")
    p.add_argument("--select", choices=SELECT_MODES, default=SELECT_MODES[0],
                   help="choose the setting per seed (seed) or one per method from the mean over seeds (mean) on "
                        "validation, or train each method at its fixed default without validation (none); see "
                        "Selection below (default: %(default)s)")
    p.add_argument("--compare-to", choices=list(METHODS), default="cmm", metavar="METHOD",
                   help="reference method of the paired comparisons in results.md, compare.csv and compare.json "
                        "(default: %(default)s)")
    p.add_argument("--prompt", choices=["single", "ensemble"], default=None,
                   help="class prototypes: the dataset's own template (single) or the normalised mean over CLIP's "
                        "7 ImageNet templates (ensemble); default: ensemble for the ImageNet family, else single")
    p.add_argument("--memory-gb", type=args_types.gigabytes, default=None,
                   help="memory for the run axis; more runs are cut into chunks (default: half the free memory)")
    p.add_argument("--devices", type=int, default=None,
                   help="use the first N JAX devices to shard the run axis (default: all)")
    p.add_argument("--compile-cache", default=None, metavar="DIR",
                   help=f"JAX's persistent compilation cache (default: ${compile_cache.ENV}, else "
                        "$XDG_CACHE_HOME/cmm/jax or ~/.cache/cmm/jax): a rerun compiles nothing")
    p.add_argument("--no-compile-cache", action="store_true",
                   help=f"compile without the persistent cache (as {compile_cache.ENV}=off)")
    return p


def parse_config(args: argparse.Namespace) -> RunConfig:
    """The ``RunConfig`` of parsed arguments (the grid parsed with ``config.parse_grid``)."""
    return RunConfig(
        cache=args.cache, eval_caches=tuple(args.eval_cache), shots=tuple(args.shots), fit_shots=args.fit_shots,
        seeds=tuple(args.seeds), methods=None if args.methods is UNGIVEN_METHODS else tuple(args.methods),
        grid=parse_grid(args.grid) if args.grid else None,
        select=args.select, compare_to=args.compare_to, prompt=args.prompt, memory_gb=args.memory_gb, devices=args.devices,
        compile_cache=args.compile_cache, no_compile_cache=args.no_compile_cache,
        protocol=args.protocol or (CROSS_DATASET if args.transfer_to else FEW_SHOT),
        transfer_caches=tuple(args.transfer_to))


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point; returns the exit status (2 with a one-line ``error: ...`` on bad input)."""
    argv = sys.argv[1:] if argv is None else list(argv)
    if argv[:1] == ["predict"]:
        from train_jax.predict import main as predict_main

        return predict_main(argv[1:])
    args = build_parser().parse_args(argv)
    from train_jax.experiment import train_and_evaluate

    try:
        result = train_and_evaluate(parse_config(args), args.out)
    except (TrainError, CacheError, DataError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print(f"interrupted: finished shot counts are kept in {args.out}/shots; rerun the same command to resume",
              file=sys.stderr)
        return 130
    print(f"{result.dataset}: {result.compiled.line()}")
    print(f"results in {result.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
