"""Pooled extraction (issue 9): what `extract` encodes, pooled vs whole, and train_jax's memory on a pooled cache.

  counts  For the 11 benchmarks + 4 ImageNet shift sets with CoOp's split sizes (a synthetic listing: classes of
          equal size, paths in class folders; nothing is encoded), the images and image forwards (1 + views per
          encoded train image, 1 per val/test image) that `extract run` would encode for the whole train split and
          for the pool of `--seeds` at up to `--shots` (`data.fewshot.pool_rows`, as `--pool-seeds/--pool-shots`).
  rss     Writes an ImageNet-shaped pooled cache (1000 classes, 1,281,167 listed train rows, the pool of seeds 1-3
          at 16 shots encoded with 10 views, 50,000 test rows, dim 1024; random unit features) and runs
          `python -m train_jax` on it in a child process (16 shots, seeds 1-3, one CMM setting, 1 epoch); prints the
          child's peak RSS next to the size of the arrays a whole-file read of an ImageNet cache would hold.

    python -m bench.bench_pooled counts                    # seconds
    python -m bench.bench_pooled rss                       # ~3 GB of temporary files; minutes on 2 CPU cores
    python -m bench.bench_pooled rss --train-rows 128117 --test 5000   # a tenth of the listing
"""
from __future__ import annotations

import argparse
import json
import resource
import subprocess
import sys
import time
from pathlib import Path

import numpy as np

from bench.common import format_table, machine_lines, run_in_folder
from data.cache import CacheError, l2_normalize
from data.cache_writer import CacheWriter
from data.fewshot import pool_rows
from data.registry import dataset_names, get_dataset

PACKAGES = ["h5py", "numpy", "jax"]
# CoOp's split_zhou sizes (train, val, test); ImageNet has no val split (CoOp tests on its val folder), the shift
# sets only a test split.
SPLIT_SIZES = {
    "ImageNet": (1281167, 0, 50000), "Caltech101": (4128, 1649, 2465), "OxfordPets": (2944, 736, 3669),
    "StanfordCars": (6509, 1635, 8041), "Flowers102": (4093, 1633, 2463), "Food101": (50500, 20200, 30300),
    "FGVCAircraft": (3334, 3333, 3333), "SUN397": (15880, 3970, 19850), "DTD": (2820, 1128, 1692),
    "EuroSAT": (13500, 5400, 8100), "UCF101": (7639, 1898, 3783), "ImageNetV2": (0, 0, 10000),
    "ImageNetSketch": (0, 0, 50889), "ImageNetA": (0, 0, 7500), "ImageNetR": (0, 0, 30000),
}


def synthetic_listing(rows: int, classes: int) -> tuple[np.ndarray, np.ndarray]:
    """labels [rows] (classes of equal size, +-1) and paths [rows] ('c<label>/img<i>.jpg') in class order."""
    labels = (np.arange(rows) * classes // max(rows, 1)).astype(np.int64)
    paths = np.char.add(np.char.add(np.char.add(b"c", labels.astype("S5")), b"/img"),
                        np.char.add(np.arange(rows).astype("S8"), b".jpg"))
    return labels, paths


def count_rows(name: str, seeds: list[int], shots: int, views: list[int]) -> list[object]:
    """One table row: dataset, listed images, encoded images whole / pooled, forwards whole / pooled per views."""
    train, val, test = SPLIT_SIZES[name]
    classnames = get_dataset(name).classnames
    pooled_train = train
    if train:
        labels, paths = synthetic_listing(train, len(classnames))
        pooled_train = len(pool_rows(labels, paths, classnames, seeds, shots, val_from_train=val == 0))
    row: list[object] = [name, train + val + test, train + val + test, pooled_train + val + test]
    for a in views:
        row += [train * (1 + a) + val + test, pooled_train * (1 + a) + val + test]
    return row


def counts(args: argparse.Namespace) -> None:
    names = dataset_names("benchmark") + dataset_names("shift")
    missing = sorted(set(names) ^ set(SPLIT_SIZES))
    if missing:
        raise CacheError(f"split sizes and the registry disagree on {missing}; update SPLIT_SIZES")
    rows = [count_rows(n, args.seeds, args.shots, args.views) for n in names]
    total = ["all", *np.sum([r[1:] for r in rows], axis=0).tolist()]
    heads = ["dataset", "listed", "images whole", "images pooled"]
    for a in args.views:
        heads += [f"forwards whole ({a} views)", f"forwards pooled ({a} views)"]
    print(format_table(heads, [*rows, total]))
    imagenet = next(r for r in rows if r[0] == "ImageNet")
    fewer = [f"{total[2] / total[3]:.1f}x fewer images overall", f"{imagenet[2] / imagenet[3]:.1f}x on ImageNet"]
    fewer += [f"{total[4 + 2 * i] / total[5 + 2 * i]:.1f}x fewer forwards with {a} views"
              for i, a in enumerate(args.views)]
    print(f"pooled (seeds {' '.join(map(str, args.seeds))}, {args.shots} shots): {', '.join(fewer)} "
          "(targets >= 4x overall, >= 12x on ImageNet)")


def write_pooled_cache(path: Path, args: argparse.Namespace) -> tuple[int, float]:
    """An ImageNet-shaped pooled cache at `path`; returns (encoded train rows, seconds to write)."""
    start = time.perf_counter()
    rng = np.random.default_rng(0)
    classnames = [f"class {c}" for c in range(args.classes)]
    labels, paths = synthetic_listing(args.train_rows, args.classes)
    encode = pool_rows(labels, paths, classnames, [1, 2, 3], 16, val_from_train=True)
    test_labels, test_paths = synthetic_listing(args.test, args.classes)
    splits = {"train": {"paths": paths.astype(str), "labels": labels, "encode": encode},
              "test": {"paths": np.char.add(b"test/", test_paths).astype(str), "labels": test_labels}}
    attrs = {"dataset": "ImageNetShaped", "model": "synthetic",
             "pool": json.dumps({"seeds": [1, 2, 3], "shots": 16})}
    writer = CacheWriter.open(path, attrs=attrs, classnames=classnames, templates=["a photo of a {}."],
                              splits=splits, embed_dim=args.dim, aug_views=args.views, fresh=True)
    writer.write_text(l2_normalize(rng.normal(size=(args.classes, 1, args.dim))))
    step = 4096
    for start_row in range(0, len(encode), step):
        rows = encode[start_row : start_row + step]
        feats = l2_normalize(rng.normal(size=(len(rows), 1 + args.views, args.dim)).astype(np.float32))
        writer.write_rows("train", rows, feats[:, 0], feats[:, 1:])
    for start_row in range(0, args.test, step * 4):
        rows = np.arange(start_row, min(start_row + step * 4, args.test))
        writer.write_rows("test", rows, l2_normalize(rng.normal(size=(len(rows), args.dim)).astype(np.float32)))
    writer.finalize()
    return len(encode), time.perf_counter() - start


def rss(args: argparse.Namespace, folder: Path) -> None:
    cache = folder / "imagenet-shaped.h5"
    encoded, seconds = write_pooled_cache(cache, args)
    size = cache.stat().st_size
    cmd = [sys.executable, "-m", "train_jax", "--cache", str(cache), "--out", str(folder / "run"), "--shots", "16",
           "--seeds", "1", "2", "3", "--methods", "cmm", "--grid", "epochs=1", f"use_aug={int(args.use_aug)}",
           "--prompt", "single"]
    start = time.perf_counter()
    done = subprocess.run(cmd, capture_output=True, text=True)
    train_seconds = time.perf_counter() - start
    if done.returncode:
        raise CacheError(f"train_jax failed: {done.stderr.strip().splitlines()[-1]}")
    peak_gib = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss / 2**20  # kB on Linux
    whole = (args.train_rows * (1 + args.views) + args.test) * args.dim * 4 / 2**30
    print(format_table(["what", "value"], [
        ["listed train rows", args.train_rows], ["encoded train rows (pool of seeds 1-3, 16 shots)", encoded],
        ["augmented views", args.views], ["test rows", args.test], ["dim", args.dim],
        ["cache file (GiB)", f"{size / 2**30:.2f}"], ["seconds to write it", f"{seconds:.0f}"],
        ["train_jax use_aug", int(args.use_aug)], ["train_jax seconds", f"{train_seconds:.0f}"],
        ["train_jax peak RSS (GiB)", f"{peak_gib:.2f}"],
        ["arrays of a whole-file read of this shape, float32 (GiB)", f"{whole:.1f}"]]))
    print(f"train_jax peak RSS {peak_gib:.2f} GiB on a pooled {args.train_rows}-row cache (target <= 2 GB); "
          f"a whole-file read would hold {whole:.1f} GiB of features")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.bench_pooled", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = parser.add_subparsers(dest="command", required=True)
    c = sub.add_parser("counts", help="images and forwards pooled vs whole at CoOp's split sizes")
    c.add_argument("--seeds", type=int, nargs="+", default=[1, 2, 3], help="pool seeds (default: 1 2 3)")
    c.add_argument("--shots", type=int, default=16, help="pool shots (default: 16)")
    c.add_argument("--views", type=int, nargs="+", default=[0, 10], help="augmented views (default: 0 10)")
    r = sub.add_parser("rss", help="train_jax peak RSS on an ImageNet-shaped pooled cache")
    r.add_argument("--train-rows", type=int, default=1281167, help="listed train rows (default: ImageNet's)")
    r.add_argument("--classes", type=int, default=1000, help="classes (default: 1000)")
    r.add_argument("--views", type=int, default=10, help="augmented views per encoded row (default: 10)")
    r.add_argument("--test", type=int, default=50000, help="test rows (default: 50000)")
    r.add_argument("--dim", type=int, default=1024, help="feature dimension (default: 1024, RN50)")
    r.add_argument("--use-aug", action="store_true", help="train with the cached views (use_aug=1)")
    r.add_argument("--dir", type=Path, help="keep the cache there (default: a temporary folder)")
    args = parser.parse_args(argv)
    print("\n".join(machine_lines(PACKAGES)))
    if args.command == "counts":
        counts(args)
        return 0
    return run_in_folder(lambda folder: rss(args, folder), args.dir, "bench-pooled-", (CacheError,))


if __name__ == "__main__":
    sys.exit(main())
