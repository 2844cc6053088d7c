"""The offline demo dataset: Fashion-MNIST from Debian's `dataset-fashion-mnist`, written as a small PNG tree.

The package (Expat licence) is fetched at run time with `apt-get download` + `dpkg -x` into a cache folder (no
root needed), its IDX files are decoded with numpy, and a deterministic per-class subsample is written to
`out/{train,val,test}/<class folder>/<index>.png`. train and val come from the 60k training images (disjoint),
test from the 10k test images. Nothing is copied into the repository.
"""
from __future__ import annotations

import gzip
import json
import os
import shutil
import subprocess
import tempfile
from pathlib import Path

import numpy as np
from PIL import Image

from data.errors import DataError
from data.progress import progress
from data.registry import get_dataset

PACKAGE = "dataset-fashion-mnist"
PACKAGE_DIR = Path("usr/share/datasets/fashion-mnist")
IDX_FILES = {
    "train_images": "train-images-idx3-ubyte.gz",
    "train_labels": "train-labels-idx1-ubyte.gz",
    "test_images": "t10k-images-idx3-ubyte.gz",
    "test_labels": "t10k-labels-idx1-ubyte.gz",
}
IDX_DTYPES = {0x08: np.uint8, 0x09: np.int8, 0x0B: ">i2", 0x0C: ">i4", 0x0D: ">f4", 0x0E: ">f8"}
MARKER = ".fashion_mnist.json"


def default_cache_dir() -> Path:
    """`$XDG_CACHE_HOME/cmm/fashion-mnist` (default `~/.cache/cmm/fashion-mnist`)."""
    base = os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache"
    return Path(base) / "cmm" / "fashion-mnist"


def decode_idx(raw: bytes, source: str = "<bytes>") -> np.ndarray:
    """Decode an IDX file (magic 0,0,dtype,ndim; big-endian uint32 dims; row-major data) into an array of those
    dims (uint8 for images [N,28,28] and labels [N])."""
    if len(raw) < 4 or raw[0] != 0 or raw[1] != 0 or raw[2] not in IDX_DTYPES:
        raise DataError(f"{source}: not an IDX file (bad magic {raw[:4].hex()}); fetch the data again")
    ndim = raw[3]
    header = 4 + 4 * ndim
    if len(raw) < header:
        raise DataError(f"{source}: IDX header cut short; fetch the data again")
    dims = tuple(int(d) for d in np.frombuffer(raw, dtype=">u4", count=ndim, offset=4))
    dtype = np.dtype(IDX_DTYPES[raw[2]])
    expected = header + dtype.itemsize * int(np.prod(dims, dtype=np.int64))
    if len(raw) != expected:
        raise DataError(f"{source}: {len(raw)} bytes, expected {expected} for shape {dims}; fetch the data again")
    return np.frombuffer(raw, dtype=dtype, offset=header).reshape(dims).astype(dtype.newbyteorder("="))


def read_idx(path: Path) -> np.ndarray:
    """An IDX file, gzip-compressed (`.gz`) or not, as an array of its dtype and shape (images [N,28,28] uint8,
    labels [N] uint8); DataError naming the file if it cannot be read or parsed."""
    try:
        raw = gzip.decompress(path.read_bytes()) if path.suffix == ".gz" else path.read_bytes()
    except (OSError, EOFError) as exc:
        raise DataError(f"{path}: cannot read IDX file ({exc}); delete the cache folder and fetch again") from None
    return decode_idx(raw, str(path))


def fetch_package(cache_dir: Path) -> Path:
    """Folder with the 4 IDX files, fetched into `cache_dir` with `apt-get download` + `dpkg -x` if not there yet."""
    idx_dir = cache_dir / PACKAGE_DIR
    if all((idx_dir / name).is_file() for name in IDX_FILES.values()):
        return idx_dir
    cache_dir.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=cache_dir) as tmp:
        _run(["apt-get", "download", PACKAGE], cwd=tmp)
        debs = sorted(Path(tmp).glob(f"{PACKAGE}_*.deb"))
        if not debs:
            raise DataError(f"{tmp}: apt-get download left no {PACKAGE}_*.deb; run `apt-get update` or pass --idx-dir")
        _run(["dpkg", "-x", str(debs[0]), str(cache_dir)], cwd=tmp)
    missing = [name for name in IDX_FILES.values() if not (idx_dir / name).is_file()]
    if missing:
        raise DataError(f"{idx_dir}: {missing[0]} missing from {PACKAGE}; pass --idx-dir with the 4 IDX files")
    return idx_dir


def _run(cmd: list[str], cwd: str) -> None:
    """Run a fetch command; failures become one-line DataErrors."""
    try:
        subprocess.run(cmd, cwd=cwd, check=True, capture_output=True, text=True)
    except FileNotFoundError:
        raise DataError(f"`{cmd[0]}` not found: fetching {PACKAGE} needs a Debian/Ubuntu system; "
                        "pass --idx-dir with the 4 Fashion-MNIST IDX files instead") from None
    except subprocess.CalledProcessError as exc:
        last = (exc.stderr or exc.stdout or "").strip().splitlines()[-1:] or ["no output"]
        raise DataError(f"`{' '.join(cmd)}` failed ({last[0]}); run `apt-get update` or pass --idx-dir") from None


def pick_per_class(labels: np.ndarray, counts: list[int], num_classes: int, seed: int) -> list[np.ndarray]:
    """Disjoint per-class picks: for each class a seeded permutation of its indices is cut into `counts` pieces.

    labels [N] in [0, num_classes). Returns one sorted index array per count, the i-th of length
    counts[i] * num_classes. Raises DataError if a class has fewer than sum(counts) images.
    """
    rng = np.random.default_rng(seed)
    picks: list[list[np.ndarray]] = [[] for _ in counts]
    for label in range(num_classes):
        idx = np.flatnonzero(labels == label)
        if len(idx) < sum(counts):
            raise DataError(f"class {label} has {len(idx)} images, fewer than the {sum(counts)} asked; "
                            "lower the per-class counts")
        idx = idx[rng.permutation(len(idx))]
        start = 0
        for piece, count in zip(picks, counts):
            piece.append(idx[start:start + count])
            start += count
    return [np.sort(np.concatenate(piece)) for piece in picks]


def build(out: str | Path, *, train_per_class: int, val_per_class: int, test_per_class: int, seed: int = 0,
          cache_dir: str | Path | None = None, idx_dir: str | Path | None = None) -> Path:
    """Write the PNG tree to `out` and return it; a tree already built with the same settings is kept as is."""
    out = Path(out).expanduser()
    if min(train_per_class, val_per_class, test_per_class) < 0 or train_per_class == 0 or test_per_class == 0:
        raise DataError("--train-per-class and --test-per-class must be >= 1 and --val-per-class >= 0")
    settings = {"package": PACKAGE, "train_per_class": train_per_class, "val_per_class": val_per_class,
                "test_per_class": test_per_class, "seed": seed}
    marker = out / MARKER
    if out.exists() and not out.is_dir():
        raise DataError(f"{out}: is a file, not a folder; pass an empty or new --out folder")
    if marker.is_file() and json.loads(marker.read_text()) == settings:
        return out
    if out.exists() and any(out.iterdir()) and not marker.is_file():
        raise DataError(f"{out}: folder exists and was not written by this command; pass an empty or new --out")
    source = Path(idx_dir).expanduser() if idx_dir else fetch_package(Path(cache_dir or default_cache_dir()))
    arrays = {key: read_idx(_idx_path(source, name)) for key, name in IDX_FILES.items()}
    folders = get_dataset("FashionMNIST").class_folders
    train_pick, val_pick = pick_per_class(arrays["train_labels"], [train_per_class, val_per_class], len(folders), seed)
    (test_pick,) = pick_per_class(arrays["test_labels"], [test_per_class], len(folders), seed)
    jobs = [("train", "train", train_pick), ("val", "train", val_pick), ("test", "test", test_pick)]
    partial = out.with_name(out.name + ".partial")
    try:
        _write_tree(partial, jobs, arrays, folders, settings)
        shutil.rmtree(out, ignore_errors=True)
        os.replace(partial, out)
    except OSError as e:
        raise DataError(f"{e.filename or out}: cannot write there ({e.strerror or e}); pass a writable --out") \
            from None
    return out


def _write_tree(partial: Path, jobs: list, arrays: dict[str, np.ndarray], folders: list[str],
                settings: dict) -> None:
    """Write the picked images as `partial/<split>/<class folder>/<source><index>.png` and the settings marker."""
    shutil.rmtree(partial, ignore_errors=True)
    with progress(total=sum(len(p) for *_, p in jobs), desc="fashion-mnist png", unit="img") as bar:
        for split, source_set, pick in jobs:
            for folder in folders:
                (partial / split / folder).mkdir(parents=True, exist_ok=True)
            images, labels = arrays[f"{source_set}_images"], arrays[f"{source_set}_labels"]
            for i in pick:
                _write_png(partial / split / folders[labels[i]] / f"{source_set}{i:05d}.png", images[i])
                bar.update()
    (partial / MARKER).write_text(json.dumps(settings, indent=1) + "\n")


def _idx_path(folder: Path, name: str) -> Path:
    """`folder/name`, or the uncompressed file next to it."""
    for candidate in (folder / name, folder / name.removesuffix(".gz")):
        if candidate.is_file():
            return candidate
    raise DataError(f"{folder / name}: Fashion-MNIST IDX file not found; pass --idx-dir with the 4 IDX files")


def _write_png(path: Path, image: np.ndarray) -> None:
    """Save a [28,28] uint8 image as grayscale PNG."""
    Image.fromarray(np.ascontiguousarray(image, dtype=np.uint8)).save(path, format="PNG")
