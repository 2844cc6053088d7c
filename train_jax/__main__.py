"""CLI: ``python -m train_jax --cache X.h5 --out DIR [...]`` (see ``--help``); ``python -m train_jax predict ...``
classifies new images with a trained run (``train_jax.predict``)."""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import sys
from pathlib import Path
from typing import TYPE_CHECKING, Any, Sequence

import numpy as np

from data import args as args_types
from data.cache import CacheError, cache_identity, file_identity, identity_diff
from data.errors import DataError
from train_jax import compile_cache
from train_jax.config import (ALIASES_OUT, DEFAULT_GRID, Settings, expand_grid, grid_keys_help, grid_to_json,
                              parse_grid)
from train_jax.errors import TrainError
from train_jax.evaluate import SELECT_MODES
from train_jax.methods import DEFAULT_METHODS, METHODS
from train_jax.records import correct_path, read_records, records_to_json, write_correct

if TYPE_CHECKING:
    from train_jax.experiment import Task

_METHODS_HELP = "\n".join(f"  {m.name}: {m.description}" for m in METHODS.values())
EPILOG = f"""
Selection (on the validation split, never on test): the setting with the best validation accuracy; ties go to
  the higher validation score (mean log-probability of the true class on the run's own validation images),
  then to the first setting in --grid order if the scores are exactly equal. Failed runs are never selected.
  --select seed: one setting per (method, seed); --select mean: one setting per method and shot count, on the
  accuracy and score averaged over the seeds (settings that failed for fewer seeds first).
Default grid (the paper publishes no settings):
  {' '.join(f"{ALIASES_OUT.get(k, k)}={','.join(f'{v:g}' for v in vs)}" for k, vs in DEFAULT_GRID.items())}
Fields outside the grid keep their defaults:
  {Settings().label([f.name for f in dataclasses.fields(Settings)])}
Settings (grid keys, aliases in brackets; tip_adapter_f, tip_adapter and gda ignore the grid and run their
authors' recipes, README "Protocol"):
{grid_keys_help()}
Methods:
{_METHODS_HELP}
Outputs in --out: results.json, results.csv, results.md, accuracy_vs_shots.png, params/<K>shot.npz
(train_jax.report.load_params), shots/<K>shot.json (finished shots, skipped when rerun),
shots/<K>shot_test_correct.npz (per-image correctness of the selected runs), compare.csv and compare.json (paired
differences against --compare-to, also in results.md), gap.md, gap.json,
gap.png (modality gap before/after the map, train_jax.gap), compile.json (programs compiled by the last
invocation and seconds spent compiling).
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
    p.add_argument("--out", required=True, help="output folder (created; rerunning resumes finished shots)")
    p.add_argument("--shots", nargs="+", type=int, default=[1, 2, 4, 8, 16],
                   help="shots per class (default: %(default)s)")
    p.add_argument("--fit-shots", action="store_true",
                   help="skip (with a warning) shots values above the smallest class's train images instead of "
                        "stopping with an error")
    p.add_argument("--seeds", nargs="+", type=args_types.seed, default=[1, 2, 3],
                   help="sampling seeds (default: %(default)s)")
    p.add_argument("--methods", nargs="+", choices=list(METHODS), default=list(DEFAULT_METHODS),
                   help="methods to train (default: %(default)s)")
    p.add_argument("--grid", nargs="+", action="extend", default=None, metavar="KEY=V1,V2",
                   help="settings grid, e.g. lr=1e-3,1e-4 alpha=1,2 (default: see below; may be repeated)")
    p.add_argument("--select", choices=SELECT_MODES, default=SELECT_MODES[0],
                   help="choose the setting per seed (seed) or one per method from the mean over seeds (mean); "
                        "see Selection below (default: %(default)s)")
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


def _write_json(path: Path, data: Any) -> None:
    tmp = path.with_suffix(path.suffix + ".tmp")
    try:
        tmp.write_text(json.dumps(data, indent=1))
        os.replace(tmp, path)
    except OSError as e:
        raise TrainError(f"{path}: cannot write it ({e.strerror}); choose a writable --out") from None


def _prepare_out(out: Path) -> None:
    """Create the output folder and its sub-folders; one-line errors for a file in the way or no write access."""
    if out.exists() and not out.is_dir():
        raise TrainError(f"{out}: is a file, not a folder; give --out a folder (new or of an earlier run)")
    try:
        for folder in (out, out / "shots", out / "params"):
            folder.mkdir(parents=True, exist_ok=True)
        probe = out / ".write-test"
        probe.touch()
        probe.unlink()
    except OSError as e:
        raise TrainError(f"{e.filename or out}: cannot write there ({e.strerror}); choose a writable --out") from None


PATH_KEYS = ("cache", "eval_caches")  # recorded for information; folders are matched by cache identity


def _check_config(out: Path, config: dict[str, Any]) -> None:
    """Record the run configuration, or check that a resumed folder was made with the same one (same settings and
    caches of the same identity, wherever they are now)."""
    path = out / "run_config.json"
    if path.exists():
        old = json.loads(path.read_text())
        if "caches" not in old:
            raise TrainError(f"{path}: this folder was made before runs recorded their caches' identity; use "
                             "another --out")
        was, now = old["caches"], config["caches"]
        pairs = [("cache", was["cache"], now["cache"])] + [
            (f"eval cache {i + 1}", was["eval_caches"][i] if i < len(was["eval_caches"]) else {}, new)
            for i, new in enumerate(now["eval_caches"])]
        for role, old_id, new_id in pairs:
            diff = identity_diff(old_id, new_id)
            if diff:
                raise TrainError(f"{path}: this folder holds results of a {role} made with {diff}; mixing them "
                                 "would put two feature sets in one table: use another --out")
        for key in config:
            if key not in PATH_KEYS and old.get(key) != config[key]:
                raise TrainError(f"{path}: this folder holds results with a different {key} ({old.get(key)!r}); "
                                 "use another --out")
    else:
        _write_json(path, config)


def _fitting_shots(task: Task, shots: list[int]) -> list[int]:
    """The shots values every class of the training split can give; a warning for each of the others."""
    counts = np.bincount(task.listings["train"].labels, minlength=len(task.cache.classnames))
    small = int(counts.argmin())
    fit = [k for k in shots if k <= counts[small]]
    for k in shots:
        if k not in fit:
            print(f"warning: {task.dataset}: {k} shots skipped: class {task.cache.classnames[small]!r} has only "
                  f"{counts[small]} train images", file=sys.stderr)
    if not fit:
        raise TrainError(f"{task.dataset}: no --shots value fits: class {task.cache.classnames[small]!r} has only "
                         f"{counts[small]} train images; add images or extract with a larger train split")
    return fit


def model_logit_scale(attrs: dict[str, Any]) -> tuple[float, str]:
    """(logit scale, where from): the extracting model's own (cache attribute), else Settings' default (100)."""
    scale = float(attrs.get("logit_scale") or 0.0)  # 0: an older cache that does not record it
    return (scale, "cache") if scale > 0 else (Settings().logit_scale, "default")


def run(args: argparse.Namespace) -> Path:
    """Train and evaluate every requested shots value not yet in ``args.out``; write the results files."""
    import jax

    from train_jax import experiment, gap, report

    compile_cache.enable(compile_cache.cache_dir(args.compile_cache, args.no_compile_cache))
    compiled_before = compile_cache.stats()
    grid = parse_grid(args.grid) if args.grid else dict(DEFAULT_GRID)
    shots, seeds, methods = sorted(set(args.shots)), list(dict.fromkeys(args.seeds)), list(dict.fromkeys(args.methods))
    if min(shots) < 1:
        raise TrainError(f"--shots must be >= 1, got {args.shots}")
    if args.devices is not None and not 1 <= args.devices <= len(jax.devices()):
        raise TrainError(f"--devices {args.devices}: this machine has {len(jax.devices())} JAX devices")
    devices = jax.devices()[: args.devices] if args.devices else None
    budget = int(args.memory_gb * 2**30) if args.memory_gb else None
    task = experiment.load_task(args.cache, args.eval_cache, args.prompt)
    if args.fit_shots:
        shots = _fitting_shots(task, shots)
    experiment.check_encoded(task, shots, seeds)  # before anything is written to --out
    scale, scale_from = model_logit_scale(task.cache.attrs)
    settings = expand_grid(grid, Settings(logit_scale=scale))
    out = Path(args.out)
    _prepare_out(out)
    config = {
        "cache": str(Path(args.cache).resolve()), "dataset": task.dataset,
        "eval_caches": [str(Path(p).resolve()) for p in args.eval_cache], "seeds": seeds, "methods": methods,
        "grid": json.loads(grid_to_json(grid)), "prompt": task.prompt, "select": args.select,
        "logit_scale": scale, "logit_scale_from": "grid" if "logit_scale" in grid else scale_from,
        "identity": cache_identity(task.cache.attrs, task.cache.classnames, task.cache.templates),
        "caches": {"cache": file_identity(args.cache), "eval_caches": [file_identity(p) for p in args.eval_cache]},
    }
    _check_config(out, config)
    label_keys = [k for k, vs in grid.items() if len(vs) > 1]
    for k in shots:
        done = out / "shots" / f"{k}shot.json"
        damaged = done.exists() and report.params_problem(out / "params" / f"{k}shot.npz")
        if damaged:
            print(f"warning: {damaged}; training {k} shots again", file=sys.stderr)
        elif done.exists():
            print(f"{task.dataset} {k}-shot: already in {done}, skipped")
            continue
        result = experiment.run_shots(task, k, seeds, methods, settings, label_keys, select=args.select,
                                      budget=budget, devices=devices, max_shots=max(shots))
        report.save_params(out / "params" / f"{k}shot.npz", result.learned)
        write_correct(correct_path(out / "shots", k), result.correct)  # per-image, for the paired comparisons
        _write_json(done, records_to_json(result.records))
        for r in result.records:
            if r.failed:
                print(f"warning: {r.method} seed {r.seed} ({r.setting}) stopped at step {r.fail_step} "
                      "by a non-finite loss or update; excluded from selection", file=sys.stderr)
        for note in sorted({r.note for r in result.records if r.note}):
            print(f"warning: {note}", file=sys.stderr)
        for row in report.summarize(result.records, args.select):
            acc = f"{row['test_mean']:.2f} ± {row['test_std']:.2f}" if "test_mean" in row else "all runs failed"
            print(f"{task.dataset} {k}-shot {row['method']}: {acc}")
    records = [r for f in sorted((out / "shots").glob("*shot.json")) for r in read_records(f)]
    report.write_run_dir(out, task.dataset, config, records, compare_to=args.compare_to)
    test_features, test_labels = experiment.test_rows(task)
    gap.write_run(out, task.dataset, test_features, test_labels, task.text, task.cache.classnames)
    compiled = compile_cache.stats() - compiled_before
    _write_json(out / "compile.json", compiled.to_dict())
    print(f"{task.dataset}: {compiled.line()}")
    return out


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point; returns the exit status (2 with a one-line ``error: ...`` on bad input)."""
    argv = sys.argv[1:] if argv is None else list(argv)
    if argv[:1] == ["predict"]:
        from train_jax.predict import main as predict_main

        return predict_main(argv[1:])
    args = build_parser().parse_args(argv)
    try:
        out = run(args)
    except (TrainError, CacheError, DataError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print(f"interrupted: finished shot counts are kept in {args.out}/shots; rerun the same command to resume",
              file=sys.stderr)
        return 130
    print(f"results in {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
