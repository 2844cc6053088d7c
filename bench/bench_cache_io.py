"""Cache I/O: write and read speed of the HDF5 feature cache at ImageNet size, and its file size (issue 5).

A synthetic cache as RN50 16-shot ImageNet gives it: 16,000 train and 50,000 test features of dim 1024, 1000
classes x 8 templates of text features; once per storage dtype (float32, float16). Timed per dtype:
  write        `data.cache_writer.write_cache`, the whole cache in one call (tests, synthetic benches, merge);
  incremental  `CacheWriter`: open, text, rows in batches of 256, finalize (what extraction does);
  read         `data.cache.read_cache`, with validation, from the page cache (just written);
  read, cold   the same after asking the OS to drop the file from its page cache (posix_fadvise; best effort).
Each is timed --repeats times and the best is kept (the machines are noisy). MB/s = file size / seconds
(MB = 10^6 bytes). Writes are timed up to the file's close, without fsync.

    python -m bench.bench_cache_io                  # ~20 s on 2 CPU cores, ~0.7 GB of temporary files
"""
from __future__ import annotations

import argparse
import os
import sys
from collections.abc import Callable
from pathlib import Path

import numpy as np

from bench.common import format_table, machine_lines, run_in_folder, timed
from data.cache import CacheError, l2_normalize, read_cache
from data.cache_writer import CacheWriter, write_cache

PACKAGES = ["h5py", "numpy"]
DTYPES = ("float32", "float16")


def synthetic_cache(train: int, test: int, classes: int, templates: int, dim: int, seed: int = 0) -> dict:
    """write_cache keyword arguments of a cache with random unit features (attrs left for the caller)."""
    rng = np.random.default_rng(seed)

    def split(n: int, prefix: str) -> dict:
        labels = np.arange(n, dtype=np.int64) % classes
        return {"features": l2_normalize(rng.standard_normal((n, dim), dtype=np.float32)), "labels": labels,
                "paths": [f"{prefix}/n{label:08d}/{prefix}_{i:08d}.JPEG" for i, label in enumerate(labels)]}

    return {"classnames": [f"class {c}" for c in range(classes)],
            "templates": [f"template {t} of a {{}}." for t in range(templates)],
            "text_features": l2_normalize(rng.standard_normal((classes, templates, dim), dtype=np.float32)),
            "splits": {"train": split(train, "train"), "test": split(test, "val")}}


def write_incremental(path: Path, cache: dict, attrs: dict, batch: int) -> None:
    """Write `cache` as extraction does: CacheWriter.open, write_text, write_rows per batch, finalize."""
    rows = {name: {"paths": s["paths"], "labels": s["labels"]} for name, s in cache["splits"].items()}
    writer = CacheWriter.open(path, attrs=attrs, classnames=cache["classnames"], templates=cache["templates"],
                              splits=rows, embed_dim=cache["text_features"].shape[-1],
                              feature_dtype=attrs["feature_dtype"])
    try:
        writer.write_text(cache["text_features"])
        for name, split in cache["splits"].items():
            for start in range(0, len(split["labels"]), batch):
                local = np.arange(start, min(start + batch, len(split["labels"])))
                writer.write_rows(name, local, split["features"][local])
        writer.finalize()
    finally:
        writer.close()


def flush_to_disk(path: Path) -> None:
    """fsync the file."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def drop_from_page_cache(path: Path) -> None:
    """Ask the OS to forget the file's cached pages (Linux; elsewhere the 'cold' reads are warm)."""
    flush_to_disk(path)
    if hasattr(os, "posix_fadvise"):
        fd = os.open(path, os.O_RDONLY)
        try:
            os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
        finally:
            os.close(fd)


def best_of(repeats: int, fn: Callable[[], object], before: Callable[[], object] = lambda: None) -> float:
    """Fewest seconds of `fn()` over `repeats` calls, each after an untimed `before()`."""
    times = []
    for _ in range(repeats):
        before()
        times.append(timed(fn).wall)
    return min(times)


OPERATIONS = {"write": "write_cache, whole file", "incremental": "CacheWriter, batches of {batch}",
              "read": "read_cache, from the page cache", "cold": "read_cache, cold"}


def measure(cache: dict, dtype: str, folder: Path, batch: int, repeats: int) -> tuple[float, dict[str, float]]:
    """(file MB, best seconds of each operation of OPERATIONS) for one storage dtype."""
    attrs = {"dataset": "bench", "model": "RN50", "feature_dtype": dtype}
    whole, incremental = folder / f"whole-{dtype}.h5", folder / f"incremental-{dtype}.h5"
    seconds = {"write": best_of(repeats, lambda: write_cache(whole, attrs=attrs, **cache),
                                lambda: whole.unlink(missing_ok=True)),
               "incremental": best_of(repeats, lambda: write_incremental(incremental, cache, attrs, batch),
                                      lambda: incremental.unlink(missing_ok=True))}
    incremental.unlink()
    flush_to_disk(whole)  # so that writeback of the new file does not slow the reads
    seconds["read"] = best_of(repeats, lambda: read_cache(whole))
    seconds["cold"] = best_of(repeats, lambda: read_cache(whole), lambda: drop_from_page_cache(whole))
    return whole.stat().st_size / 1e6, seconds


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m bench.bench_cache_io", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--train", type=int, default=16_000, help="train rows (default 16000: 1000 classes x 16)")
    parser.add_argument("--test", type=int, default=50_000, help="test rows (default 50000: ImageNet val)")
    parser.add_argument("--classes", type=int, default=1000, help="classes (default 1000)")
    parser.add_argument("--templates", type=int, default=8, help="prompt templates (default 8)")
    parser.add_argument("--dim", type=int, default=1024, help="feature dim (default 1024, RN50)")
    parser.add_argument("--batch", type=int, default=256, help="rows per CacheWriter.write_rows (default 256)")
    parser.add_argument("--repeats", type=int, default=3, help="timings per operation; the best is reported "
                                                                   "(default 3)")
    parser.add_argument("--dtypes", default=",".join(DTYPES), help="storage dtypes, comma-separated "
                                                                   "(default float32,float16)")
    parser.add_argument("--dir", type=Path, help="folder for the cache files (default: a temporary folder, "
                                                 "deleted at the end)")
    return parser


def run(args: argparse.Namespace, folder: Path) -> None:
    """Make the synthetic cache, time every dtype, print the table and the summary line."""
    dtypes = [d.strip() for d in args.dtypes.split(",") if d.strip()]
    if not dtypes or any(d not in DTYPES for d in dtypes):
        raise CacheError(f"--dtypes {args.dtypes!r}: use a comma-separated subset of {', '.join(DTYPES)}")
    small = [f"--{k} {v}" for k, v in vars(args).items() if k not in ("dtypes", "dir") and v < 1]
    if small:
        raise CacheError(f"{', '.join(small)}: every size must be >= 1")
    print("\n".join(machine_lines(PACKAGES)))
    print(f"settings: train {args.train} + test {args.test} rows x dim {args.dim}, text {args.classes} classes x "
          f"{args.templates} templates, CacheWriter batches of {args.batch}, best of {args.repeats}, files in {folder}")
    cache = synthetic_cache(args.train, args.test, args.classes, args.templates, args.dim)
    results = {dtype: measure(cache, dtype, folder, args.batch, args.repeats) for dtype in dtypes}
    rows = [[dtype, OPERATIONS[op].format(batch=args.batch), mb, sec, mb / sec]
            for dtype, (mb, seconds) in results.items() for op, sec in seconds.items()]
    print(format_table(["dtype", "operation", "file MB", "seconds", "MB/s"], rows))
    print("cache I/O: " + "; ".join(
        f"{dtype} {mb:.3g} MB: write {mb / s['write']:.0f} MB/s, incremental {mb / s['incremental']:.0f} MB/s, "
        f"read {mb / s['read']:.0f} MB/s ({mb / s['cold']:.0f} cold)" for dtype, (mb, s) in results.items()))


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    return run_in_folder(lambda folder: run(args, folder), args.dir, "bench_cache_io_", (CacheError,))

if __name__ == "__main__":
    sys.exit(main())
