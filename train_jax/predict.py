"""``python -m train_jax predict --run RUN_DIR --cache NEW.h5 --out preds.csv``: classify a cache's images with a
trained run's selected models (see ``--help``).

The default is the ensemble of the seeds' selected models (the mean of their logits): each seed's model was
trained on a different few-shot draw and they differ by a few points; their mean does not depend on which seed one
happens to pick and is usually at least as accurate as the average seed. ``--seed S`` uses one seed's model.
"""

from __future__ import annotations

import argparse
import contextlib
import csv
import json
import os
import sys
from pathlib import Path
from typing import Any, Mapping, Sequence

import numpy as np

from data.cache import CacheError, FeatureCache, cache_identity, l2_normalize, read_cache
from data.errors import DataError
from train_jax.errors import TrainError
from train_jax.records import PARAMS_DIR, RUN_CONFIG, Learned, load_params, params_path, saved_params

TOP_K = 5


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="python -m train_jax predict",
        description="Classify every image of a cache split with a trained run's selected model(s); write a CSV of "
                    "path, true label (empty when unlabelled) and the top-5 classes with their probabilities. "
                    "Make the cache with the run's model and class list: "
                    "python -m extract run --folder NEW/ --unlabelled --classes-from TRAIN.h5 ...",
    )
    p.add_argument("--run", required=True, type=Path, help="output folder of `python -m train_jax`")
    p.add_argument("--cache", required=True, type=Path, help="feature cache of the images to classify")
    p.add_argument("--out", required=True, type=Path, help="CSV file to write (an existing file only with "
                                                           "--overwrite; never an input of this command)")
    p.add_argument("--overwrite", action="store_true", help="replace an existing --out file")
    p.add_argument("--shots", type=int, default=None, help="use the models trained with K shots per class "
                                                           "(default: the largest K in the run)")
    p.add_argument("--method", default="cmm", help="method whose selected models classify (default: %(default)s)")
    p.add_argument("--split", default=None, help="cache split to classify (default: the only split, else test)")
    which = p.add_mutually_exclusive_group()
    which.add_argument("--ensemble", action="store_true", help="mean of the seeds' logits (the default)")
    which.add_argument("--seed", type=int, default=None, help="only this seed's selected model")
    return p


def load_config(run: Path) -> dict[str, Any]:
    """The run's run_config.json (it records the training cache's identity)."""
    path = run / RUN_CONFIG
    try:
        config = json.loads(path.read_text())
    except (OSError, ValueError):
        raise TrainError(f"{path}: no readable run configuration; train first with "
                         f"`python -m train_jax --cache TRAIN.h5 --out {run}`") from None
    if "identity" not in config:
        raise TrainError(f"{path}: records no training-cache identity (an older run); train again into a new --out")
    return config


def load_models(run: Path, shots: int | None, method: str, seed: int | None) -> tuple[int, dict[int, Learned]]:
    """(K, {seed: Learned}) of ``method``'s selected models in RUN/params/<K>shot.npz."""
    trained = [k for k, _ in saved_params(run)]
    if not trained:
        raise TrainError(f"{run / PARAMS_DIR}: no saved models; train with `python -m train_jax --cache TRAIN.h5 "
                         f"--out {run}`")
    shots = trained[-1] if shots is None else shots
    if shots not in trained:
        raise TrainError(f"{run}: no {shots}-shot models (trained: {', '.join(map(str, trained))}); pass one of "
                         f"those to --shots or train with --shots {shots}")
    learned = load_params(params_path(run, shots))
    models = {int(k.split("/seed")[1]): v for k, v in learned.items() if k.split("/")[0] == method}
    if not models:
        methods = sorted({k.split("/")[0] for k in learned})
        raise TrainError(f"{run}: no {method} models at {shots} shots (it has {', '.join(methods)}); pass one of "
                         f"those to --method or train with --methods {method}")
    if seed is not None:
        if seed not in models:
            raise TrainError(f"{run}: no {method} {shots}-shot model of seed {seed} (seeds: "
                             f"{', '.join(map(str, sorted(models)))}); pass one of those to --seed")
        models = {seed: models[seed]}
    return shots, dict(sorted(models.items()))


def check_identity(config: Mapping[str, Any], cache: FeatureCache) -> None:
    """TrainError unless ``cache`` was made with the run's model, weights, preprocessing, classes and templates."""
    ours = cache_identity(cache.attrs, cache.classnames, cache.templates)
    theirs = config["identity"]
    for key, value in theirs.items():
        if ours.get(key) == value:
            continue
        if key in ("classnames_sha256", "templates_sha256"):
            what = "class list" if key == "classnames_sha256" else "prompt templates"
            raise TrainError(f"{cache.path}: its {what} differ from the run's; extract the images with "
                             f"`python -m extract run ... --unlabelled --classes-from {config['cache']}`")
        raise TrainError(f"{cache.path}: {key}={ours.get(key)!r} differs from the run's {value!r}; extract the "
                         f"images with the model and weights that made {config['cache']}")


def mean_logits(method: str, models: Mapping[int, Learned], feats: np.ndarray, text: np.ndarray,
                norms: np.ndarray) -> np.ndarray:
    """Mean over the models of their logits. feats [N,D] L2-normalised, text [C,D], norms [N] (the features'
    norms before normalisation) -> [N,C] float32."""
    from train_jax.methods import logits

    return np.mean([np.asarray(logits(method, m.settings, m.params, m.consts, feats, text, norms))
                    for m in models.values()], axis=0)


def top_k(logits: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
    """The k most probable classes of each row (best first) and their softmax probabilities: logits [N,C] ->
    (classes [N,k] int, probs [N,k] float64)."""
    z = logits.astype(np.float64) - logits.max(axis=1, keepdims=True)
    probs = np.exp(z) / np.exp(z).sum(axis=1, keepdims=True)
    order = np.argsort(-logits, axis=1, kind="stable")[:, :k]
    return order, np.take_along_axis(probs, order, axis=1)


def check_out(out: Path, inputs: Sequence[tuple[str, Path]], overwrite: bool) -> None:
    """TrainError unless ``out`` may receive the CSV: not a folder, none of ``inputs`` ((what, path) pairs, the
    same file under any name), and not an existing file unless ``overwrite``; its folder must exist."""
    if out.is_dir():
        raise TrainError(f"{out}: is a folder; give --out a CSV file path such as {out / 'predictions.csv'}")
    for what, path in inputs:
        if out.exists() and path.exists() and os.path.samefile(out, path):
            raise TrainError(f"{out}: is {what}, an input of this command; choose another --out")
    if out.exists() and not overwrite:
        raise TrainError(f"{out}: exists; pass --overwrite to replace it, or choose another --out")
    if not out.parent.is_dir():
        raise TrainError(f"{out}: cannot write the predictions (folder {out.parent} does not exist); create it or "
                         "choose another --out")


def write_csv(path: Path, paths: Sequence[str], labels: Sequence[str], classnames: Sequence[str],
              classes: np.ndarray, probs: np.ndarray) -> None:
    """One row per image: path, label, class_1, prob_1, ... (best first); written to a temporary file, then
    renamed, so an error never leaves a partial CSV."""
    k = classes.shape[1]
    tmp = path.with_name(path.name + ".tmp")
    try:
        with open(tmp, "w", newline="") as f:
            writer = csv.writer(f)
            writer.writerow(["path", "label", *[c for i in range(1, k + 1) for c in (f"class_{i}", f"prob_{i}")]])
            for p, label, cs, ps in zip(paths, labels, classes, probs):
                writer.writerow([p, label, *[v for c, q in zip(cs, ps) for v in (classnames[c], f"{q:.6f}")]])
        os.replace(tmp, path)
    except OSError as e:
        with contextlib.suppress(OSError):  # a read-only folder refuses the clean-up too
            tmp.unlink(missing_ok=True)
        raise TrainError(f"{path}: cannot write the predictions ({e.strerror or e}); choose another --out") \
            from None


def run(args: argparse.Namespace) -> tuple[Path, float | None, int]:
    """Classify; returns (CSV path, accuracy in percent or None when unlabelled, rows)."""
    from train_jax.experiment import prototypes

    config = load_config(args.run)
    shots, models = load_models(args.run, args.shots, args.method, args.seed)
    check_out(args.out, [("the --cache", args.cache), ("the run's configuration", args.run / "run_config.json"),
                         ("the run's saved models", args.run / "params" / f"{shots}shot.npz")], args.overwrite)
    cache = read_cache(args.cache, with_aug=False)
    check_identity(config, cache)
    split = args.split or (next(iter(cache.splits)) if len(cache.splits) == 1 else "test")
    if split not in cache.splits:
        raise TrainError(f"{cache.path}: no split {split!r} (it has {', '.join(cache.splits)}); pass --split")
    rows = cache.splits[split]
    if len(rows.labels) == 0:
        raise TrainError(f"{cache.path}: split {split!r} holds no image; extract a folder that has images")
    logits = mean_logits(args.method, models, l2_normalize(rows.features), prototypes(cache, config["prompt"]),
                         rows.norms)
    classes, probs = top_k(logits, min(TOP_K, len(cache.classnames)))
    labels = [cache.classnames[y] for y in rows.labels] if rows.labelled else [""] * len(rows.labels)
    write_csv(args.out, rows.paths, labels, cache.classnames, classes, probs)
    acc = float(100.0 * np.mean(classes[:, 0] == rows.labels)) if rows.labelled else None
    which = f"seed {next(iter(models))}" if len(models) == 1 else f"ensemble of seeds {', '.join(map(str, models))}"
    print(f"{args.method} {shots}-shot ({which}): {len(rows.labels)} images of {cache.path} split {split!r}")
    return args.out, acc, len(rows.labels)


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point; returns the exit status (2 with a one-line ``error: ...`` on bad input)."""
    args = build_parser().parse_args(argv)
    try:
        out, acc, n = run(args)
    except (TrainError, CacheError, DataError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    if acc is not None:
        print(f"accuracy: {acc:.2f}% on {n} labelled images")
    print(f"predictions in {out}")
    return 0
