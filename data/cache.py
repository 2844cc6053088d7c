"""The HDF5 feature cache: the contract between `extract` and `train_jax` (schema: README, "Cache schema").

Needs only h5py + numpy: both stages read and write caches through this module, neither through the other.
"""
from __future__ import annotations

import contextlib
import errno
import fcntl
import hashlib
import json
import os
import re
import resource
import shutil
import sys
import time
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from typing import Any, Iterable, Iterator, Mapping

import h5py
import numpy as np

from data.registry import ensemble_templates

FORMAT = "cmm-feature-cache"
SCHEMA_VERSION = 2
SPLITS = ("train", "val", "test")
# Row status: PENDING = to encode, OK = encoded, BAD = unreadable image (skipped), ABSENT = listed, not encoded
# (outside a pooled extraction's rows).
PENDING, OK, BAD, ABSENT = 0, 1, 2, 3
READ_BLOCK_BYTES = 64 << 20  # features read from the file at a time
UNLABELLED = -1  # the label of every row of an unlabelled split (images to classify, never to train or score on)
# Attributes that say which model and preprocessing made the features: a cache never mixes two of them.
IDENTITY_ATTRS = ("dataset", "model", "pretrained", "weights_sha256", "model_config", "embed_dim",
                  "feature_dtype", "preprocess", "aug_views", "aug_seed", "aug", "shard", "activation")
# Attributes that say which encoder made the features (same feature space): a shift cache must share them.
MODEL_ATTRS = ("model", "pretrained", "weights_sha256", "model_config", "activation", "embed_dim")
DEFAULT_ATTRS: dict[str, Any] = {
    "dataset": "", "model": "", "pretrained": "", "weights_sha256": "", "model_config": "", "embed_dim": 0,
    "feature_dtype": "float32", "preprocess": "{}", "aug_views": 0, "aug_seed": 0, "aug": "{}", "shard": "",
    "versions": "{}", "created": "", "pool": "", "command": "",
    "activation": "", "logit_scale": 0.0, "logit_bias": 0.0,  # the model's own; logit_scale 0: not recorded
}
_STR = h5py.string_dtype("utf-8")
_NORM_TOL = 1e-2  # float16 storage keeps norms within ~1e-3
LOCK_WAIT_S = 15.0  # a second writer waits this long for the lock (workers of a killed run exit within ~5 s)
_H5_ERRORS = (OSError, ValueError, RuntimeError)  # what h5py raises when the file system refuses a write


class CacheError(Exception):
    """A cache file that cannot be read or written as asked; the message names the file and the fix."""


class CacheBusy(CacheError):
    """A cache file another process holds open for writing (HDF5's file lock)."""


@dataclass(frozen=True)
class Split:
    """One split of a cache: features [N, D] float32, labels [N] int64, paths [N] str, aug_features [N, A, D]."""

    features: np.ndarray
    labels: np.ndarray
    paths: np.ndarray
    aug_features: np.ndarray | None = None

    @property
    def labelled(self) -> bool:
        """False for a split of unlabelled images (every label is ``UNLABELLED``)."""
        return not bool(np.any(self.labels == UNLABELLED))


@dataclass(frozen=True)
class CacheHead:
    """What every cache reader holds: attributes, class names, templates and text features of a validated file."""

    path: Path
    attrs: dict[str, Any]
    classnames: list[str]
    templates: list[str]
    text_features: np.ndarray  # [C, P, D] float32, L2-normalised

    def prototypes(self, template: str | int = "ensemble") -> np.ndarray:
        """Class prototypes [C, D]: one template (index or text), or "ensemble": the normalised mean over exactly
        CLIP's 7 ImageNet templates (`data.registry.ensemble_templates`), as CLIP and Tip-Adapter compute it."""
        if template == "ensemble":
            members = [i for i, t in enumerate(self.templates) if t in ensemble_templates()]
            if len(members) != len(ensemble_templates()):
                raise CacheError(f"{self.path}: has {len(members)} of the {len(ensemble_templates())} ensemble "
                                 "templates; re-extract it with this version of `python -m extract`, or use the "
                                 "dataset's own template (--prompt single)")
            return l2_normalize(self.text_features[:, members].mean(axis=1))
        if isinstance(template, str):
            if template not in self.templates:
                raise CacheError(f"{self.path}: template {template!r} is not in the cache; it has {self.templates}")
            template = self.templates.index(template)
        if not 0 <= template < len(self.templates):
            raise CacheError(f"{self.path}: template index {template} out of range [0, {len(self.templates)})")
        return self.text_features[:, template, :]


@dataclass(frozen=True)
class FeatureCache(CacheHead):
    """A validated cache in memory: the encoded rows of each split (not-encoded and unreadable rows dropped)."""

    splits: dict[str, Split] = field(default_factory=dict)
    bad_paths: list[str] = field(default_factory=list)


@dataclass(frozen=True)
class Listing:
    """Every listed row of a split: labels [N] int64, paths [N] (utf-8, numpy bytes), status [N] int8
    (PENDING..ABSENT)."""

    labels: np.ndarray
    paths: np.ndarray
    status: np.ndarray

    def counts(self) -> dict[str, int]:
        """Rows listed, encoded, skipped (unreadable), pending and not encoded."""
        return {"listed": len(self.status), **{name: int(np.sum(self.status == code)) for name, code in
                                                (("encoded", OK), ("skipped", BAD), ("pending", PENDING),
                                                 ("not encoded", ABSENT))}}


def l2_normalize(x: np.ndarray, axis: int = -1) -> np.ndarray:
    """x / ||x|| along `axis`, in float32."""
    x = np.asarray(x, dtype=np.float32)
    return x / np.maximum(np.linalg.norm(x, axis=axis, keepdims=True), 1e-12)


def _decode(values: Iterable[Any]) -> list[str]:
    return [v.decode("utf-8") if isinstance(v, bytes) else str(v) for v in values]


def _attr(value: Any) -> Any:
    return value.decode("utf-8") if isinstance(value, bytes) else value.item() if isinstance(value, np.generic) else value


def _identity(attrs: Mapping[str, Any]) -> dict[str, Any]:
    full = {**DEFAULT_ATTRS, **attrs}
    return {k: json.dumps(v, sort_keys=True) if isinstance(v, (dict, list, tuple)) else _attr(v)
            for k, v in ((k, full[k]) for k in IDENTITY_ATTRS)}


def cache_identity(attrs: Mapping[str, Any], classnames: Iterable[str], templates: Iterable[str]) -> dict[str, Any]:
    """What makes two caches' features and prototypes interchangeable: the model, its weights, the preprocessing
    and the class and template lists (as sha256 of their JSON); not the dataset or its images."""
    full = _identity(attrs)
    digest = lambda names: hashlib.sha256(json.dumps(list(names)).encode()).hexdigest()  # noqa: E731
    return {**{k: full[k] for k in (*MODEL_ATTRS, "preprocess")},
            "classnames_sha256": digest(classnames), "templates_sha256": digest(templates)}


def identity(attrs: Mapping[str, Any], classnames: Iterable[str], templates: Iterable[str],
             splits: Mapping[str, Mapping[str, Any]]) -> dict[str, Any]:
    """What a cache's features are made of: every IDENTITY_ATTR (model, weights hash, preprocessing, dataset, ...),
    the `cache_identity` digests of the class and template lists, and the sha256 of the image listing (every
    split's paths and labels, skipped images included). Caches with equal identities hold the same features;
    `extract` and `train_jax` compare identities, never paths. splits[name] = dict(paths [N], labels [N])."""
    listing = hashlib.sha256()
    for name in sorted(splits):
        for part in (name.encode(), "\0".join(str(p) for p in splits[name]["paths"]).encode("utf-8", "surrogateescape"),
                     np.asarray(splits[name]["labels"], dtype="<i8").tobytes()):
            listing.update(len(part).to_bytes(8, "little") + part)
    return {**_identity(attrs), **cache_identity(attrs, classnames, templates), "listing_sha256": listing.hexdigest()}


def file_identity(path: str | os.PathLike) -> dict[str, Any]:
    """`identity` of a cache file (complete or not)."""
    path = Path(path)
    read_attrs(path)  # one-line errors for a folder, a missing file, a file being written
    with _open(path, "r") as f:
        _check(all(k in f for k in ("splits", "classnames", "templates")), path,
               "missing /splits, /classnames or /templates")
        return _file_identity(f, path)


def identity_diff(old: Mapping[str, Any], new: Mapping[str, Any]) -> str:
    """'' if equal, else the first difference in words, e.g. "model='RN50', not 'ViT-B-32'"."""
    names = {"classnames_sha256": "class list", "templates_sha256": "template list",
             "listing_sha256": "image listing (paths and labels)"}
    for key in new:
        if old.get(key) != new[key]:
            return f"another {names[key]}" if key in names else f"{key}={old.get(key)!r}, not {new[key]!r}"
    return ""


def partial_path(path: str | os.PathLike) -> Path:
    """Where a cache is written until it is complete."""
    return Path(f"{path}.partial")


def lock_path(path: str | os.PathLike) -> Path:
    """The lock file a writer of cache `path` holds (flock) while it writes `X.h5.partial`."""
    return Path(f"{path}.partial.lock")


def writer_active(path: str | os.PathLike) -> bool:
    """Whether a writer (or the DataLoader workers of a killed one) holds the lock of cache `path` now."""
    try:
        fd = os.open(lock_path(path), os.O_RDONLY)
    except OSError:
        return False
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        return False
    except BlockingIOError:
        return True
    finally:
        os.close(fd)


_LOCKED = re.compile(r"unable to lock file, errno = (\d+)")  # HDF5's message when another process holds the file


def _busy(e: BaseException) -> bool:
    """Whether h5py's error is HDF5 refusing the file because another process holds its lock (errno EAGAIN /
    EWOULDBLOCK), not some other message that merely contains "lock" ("sblock" of a truncated file)."""
    found = _LOCKED.search(str(e))
    return found is not None and int(found[1]) in (errno.EAGAIN, errno.EWOULDBLOCK)


def _open(path: Path, mode: str) -> h5py.File:
    """h5py.File(path, mode) with a one-line CacheError for a file in use, a folder, or a non-HDF5 file."""
    try:
        return h5py.File(path, mode)
    except _H5_ERRORS as e:
        text = str(e).splitlines()[0] if str(e) else type(e).__name__
        if path.is_dir():
            raise CacheError(f"{path}: is a folder, not a cache file; give a file path such as {path / 'x.h5'}") \
                from None
        if _busy(e):
            raise CacheBusy(f"{path}: another process has it open for writing (an extraction still running, or "
                             "its workers); wait for it or stop it") from None
        if isinstance(e, OSError) and e.strerror and not isinstance(e, FileNotFoundError):
            raise CacheError(f"{path}: cannot open it ({e.strerror})") from None
        raise CacheError(f"{path}: not a readable HDF5 file ({text}); delete it and extract again") from None


def read_attrs(path: str | os.PathLike) -> dict[str, Any]:
    """Root attributes of a cache file (no validation beyond being an HDF5 file)."""
    path = Path(path)
    if path.is_dir():
        raise CacheError(f"{path}: is a folder, not a cache file; give a file path such as {path / 'x.h5'}")
    if not path.is_file():
        raise CacheError(f"{path}: no such cache file; run `python -m extract run ...` to make it")
    if path.name.endswith(".partial") and writer_active(path.with_name(path.name.removesuffix(".partial"))):
        raise CacheError(f"{path}: an extraction is writing it now; wait for it to finish (or stop it), "
                         "then look again")
    with _open(path, "r") as f:
        return {k: _attr(v) for k, v in f.attrs.items()}


def _read(d: h5py.Dataset, path: Path, sel: Any = ()) -> np.ndarray:
    """d[sel], with a one-line CacheError naming the dataset when its bytes fail their checksum."""
    try:
        return d[sel]
    except _H5_ERRORS as e:
        raise CacheError(f"{path}: {d.name} is corrupted ({str(e).splitlines()[0]}); its bytes were damaged "
                         "after writing: extract the cache again") from None


def verify(path: str | os.PathLike) -> int:
    """Read every dataset of a cache chunk by chunk, checking the Fletcher-32 checksums; returns the number of
    checksummed datasets. Raises CacheError naming the dataset and rows of the first damaged chunk."""
    path = Path(path)
    datasets: list[h5py.Dataset] = []
    with _open(path, "r") as f:
        f.visititems(lambda _, obj: datasets.append(obj) if isinstance(obj, h5py.Dataset) else None)
        for d in datasets:
            for sel in (d.iter_chunks() if d.chunks and d.size else [()]):
                try:
                    d[sel]
                except _H5_ERRORS as e:
                    rows = f" rows {sel[0].start}-{sel[0].stop - 1}" if sel else ""
                    raise CacheError(f"{path}: {d.name}{rows} is corrupted ({str(e).splitlines()[0]}); its bytes "
                                     "were damaged after writing: extract the cache again") from None
        return sum(bool(d.fletcher32) for d in datasets)


def _check(ok: bool, path: Path, what: str) -> None:
    if not ok:
        raise CacheError(f"{path}: {what}; the file is not a valid {FORMAT} v{SCHEMA_VERSION}, extract it again")


class CacheReader(CacheHead):
    """A validated complete cache read row by row: listings in memory, features read only for the rows asked.

    Memory is bounded by what is asked for (plus READ_BLOCK_BYTES), not by the file.
    """

    def split_names(self) -> list[str]:
        """The splits the file holds."""
        with _open(self.path, "r") as f:
            return list(f["splits"].keys())

    def listing(self, split: str) -> Listing:
        """Labels, paths and status of every listed row of `split` (CacheError if the file lacks it)."""
        with _open(self.path, "r") as f:
            g = self._group(f, split)
            for key in ("labels", "paths", "status", "slot", "features"):
                _check(key in g, self.path, f"missing /splits/{split}/{key}")
            labels, status = np.asarray(_read(g["labels"], self.path), np.int64), np.asarray(_read(g["status"], self.path), np.int8)
            paths = np.asarray(_read(g["paths"], self.path), dtype=bytes)  # fixed-width: half the memory of str objects
        _check(labels.shape == status.shape == paths.shape, self.path,
               f"/splits/{split} labels, paths and status differ in length")
        _check(bool(np.all(status != PENDING)), self.path, f"split {split!r} has rows that were never extracted")
        if len(labels):
            n_classes = len(self.classnames)
            _check(bool(labels.min() >= 0 and labels.max() < n_classes) or bool(np.all(labels == UNLABELLED)),
                   self.path, f"/splits/{split}/labels outside [0, {n_classes}) (or not all {UNLABELLED}: "
                   "unlabelled)")
        return Listing(labels, paths, status)

    def read(self, split: str, rows: np.ndarray, *, views: bool = False) -> tuple[np.ndarray, np.ndarray | None]:
        """Features [n, D] float32 (and augmented views [n, A, D] when views=True) of encoded rows [n] of `split`.

        With views, both are slices of one array [n, 1 + A, D] (plain view first), so `features.base` holds them
        stacked without a copy. CacheError naming the split if a row is not encoded (ABSENT) or unreadable, or
        views are asked but absent.
        """
        rows = np.asarray(rows, np.int64)
        with _open(self.path, "r") as f:
            g = self._group(f, split)
            status, slot = _read(g["status"], self.path), _read(g["slot"], self.path)
            missing = rows[status[rows] != OK]
            if len(missing):
                what = "not encoded" if status[missing[0]] == ABSENT else "unreadable images (skipped)"
                raise CacheError(f"{self.path}: {len(missing)} {split} rows asked for are {what}, e.g. "
                                 f"{_decode(g['paths'][missing[:1]])[0]!r}")
            dim = int(self.attrs.get("embed_dim", 0))
            _check(g["features"].shape[1:] == (dim,), self.path, f"/splits/{split}/features rows are not [{dim}]")
            if views and "aug_features" not in g:
                raise CacheError(f"{self.path}: split {split!r} has no augmented views; extract it with --aug-views")
            if views:
                _check(g["aug_features"].ndim == 3 and g["aug_features"].shape[2] == dim, self.path,
                       f"/splits/{split}/aug_features rows are not [A, {dim}]")
            stacked = np.empty((len(rows), 1 + (g["aug_features"].shape[1] if views else 0), dim), np.float32)
            _read_slots(g["features"], slot[rows], stacked[:, 0], self.path)
            _check_norms(stacked[:, 0], self.path, f"/splits/{split}/features")
            if views:
                _read_slots(g["aug_features"], slot[rows], stacked[:, 1:], self.path)
        return stacked[:, 0], stacked[:, 1:] if views else None

    def has_views(self, split: str) -> bool:
        """Whether `split` stores augmented views."""
        with _open(self.path, "r") as f:
            return "aug_features" in self._group(f, split)

    def bad(self) -> dict[str, str]:
        """Path -> error of every image skipped as unreadable."""
        with _open(self.path, "r") as f:
            return (dict(zip(_decode(_read(f["bad/paths"], self.path)), _decode(_read(f["bad/errors"], self.path))))
                    if "bad/paths" in f else {})

    def _group(self, f: h5py.File, split: str) -> h5py.Group:
        _check(split in f["splits"], self.path, f"missing split {split!r} (it has {list(f['splits'].keys())})")
        return f["splits"][split]


def _read_slots(d: h5py.Dataset, slots: np.ndarray, out: np.ndarray, path: Path) -> None:
    """out[:] = d[slots] (any order, repeats allowed; out [n, ...] float32), reading spans of at most
    READ_BLOCK_BYTES at a time; a span whose asked rows are sparse is read row by row instead."""
    if not len(slots):
        return
    order = np.argsort(slots, kind="stable")
    ordered = slots[order]
    per_block = max(1, READ_BLOCK_BYTES // max(1, int(np.prod(d.shape[1:])) * d.dtype.itemsize))
    start = 0
    while start < len(ordered):
        stop = int(np.searchsorted(ordered, ordered[start] + per_block))
        want = ordered[start:stop]
        if len(want) * 8 >= want[-1] - want[0] + 1:  # dense: one read of the span
            out[order[start:stop]] = _read(d, path, slice(int(want[0]), int(want[-1]) + 1))[want - want[0]]
        else:  # sparse: only the rows asked (h5py wants increasing, unique indices)
            unique, inverse = np.unique(want, return_inverse=True)
            out[order[start:stop]] = _read(d, path, unique.tolist())[inverse]
        start = stop


def _check_norms(x: np.ndarray, path: Path, what: str) -> None:
    if len(x):
        _check(bool(np.all(np.abs(np.linalg.norm(x, axis=-1) - 1) < _NORM_TOL)), path, f"{what} rows are not "
               "L2-normalised")


def _format_attrs(path: str | os.PathLike) -> dict[str, Any]:
    """Root attributes of a file of this format and schema version (CacheError naming the fix otherwise)."""
    attrs = read_attrs(path)
    if attrs.get("format") != FORMAT:
        raise CacheError(f"{path}: not a {FORMAT} file (format={attrs.get('format')!r}); "
                         "make it with `python -m extract`")
    if attrs.get("schema_version") != SCHEMA_VERSION:
        raise CacheError(f"{path}: cache schema version {attrs.get('schema_version')} but this code reads version "
                         f"{SCHEMA_VERSION}; re-extract it with this version of `python -m extract` (same command)")
    return attrs


def open_cache(path: str | os.PathLike) -> CacheReader:
    """Validate a complete cache's attributes, names and text features; read rows later with its methods."""
    path = Path(path)
    attrs = _format_attrs(path)
    if not attrs.get("complete"):
        raise CacheError(f"{path}: the cache is incomplete (an interrupted extraction?); rerun the same "
                         "`python -m extract run` command to resume it")
    with _open(path, "r") as f:
        for key in ("classnames", "templates", "text_features", "splits"):
            _check(key in f, path, f"missing /{key}")
        classnames = _decode(_read(f["classnames"], path))
        templates = _decode(_read(f["templates"], path))
        text = np.asarray(_read(f["text_features"], path), dtype=np.float32)
    n_classes, dim = len(classnames), int(attrs.get("embed_dim", 0))
    _check(text.shape == (n_classes, len(templates), dim), path,
           f"/text_features has shape {text.shape}, expected {(n_classes, len(templates), dim)}")
    _check_norms(text, path, "/text_features")
    return CacheReader(path, attrs, classnames, templates, text)


def read_cache(path: str | os.PathLike, *, splits: Iterable[str] | None = None, with_aug: bool = True) -> FeatureCache:
    """Read and validate a complete cache whole: the encoded rows of each split (unreadable and not-encoded rows
    are dropped)."""
    reader = open_cache(path)
    out: dict[str, Split] = {}
    for name in reader.split_names() if splits is None else list(splits):
        listing = reader.listing(name)
        rows = np.flatnonzero(listing.status == OK)
        features, aug = reader.read(name, rows, views=with_aug and reader.has_views(name))
        out[name] = Split(features, listing.labels[rows], np.asarray(_decode(listing.paths[rows]), dtype=object), aug)
    return FeatureCache(reader.path, reader.attrs, reader.classnames, reader.templates, reader.text_features, out,
                        list(reader.bad()))


def _root_attrs(attrs: Mapping[str, Any]) -> dict[str, Any]:
    out = {**DEFAULT_ATTRS, **attrs, "format": FORMAT, "schema_version": SCHEMA_VERSION, "complete": False}
    out = {k: json.dumps(v, sort_keys=True) if isinstance(v, (dict, list, tuple)) else v for k, v in out.items()}
    if not out["created"]:
        out["created"] = datetime.now(timezone.utc).isoformat(timespec="seconds")
    return out


_CHUNK_ROWS = {"features": 1024, "aug_features": 256}  # rows per chunk; other per-row datasets: 65536


def _dataset(g: h5py.Group, name: str, *, shape: tuple[int, ...], dtype: Any, data: Any = None,
             rows: int = 65536, grow: bool = False) -> h5py.Dataset:
    """A chunked dataset of `rows` rows per chunk with a Fletcher-32 checksum per chunk, allocated in full at
    creation (so filling it never needs more disk space). Strings cannot carry checksums: no filter.
    grow=True: its first axis can grow (`CacheWriter.request`); each growth allocates the new chunks."""
    if np.dtype(dtype) == _STR:
        return g.create_dataset(name, shape=shape, dtype=dtype, data=data)
    dcpl = h5py.h5p.create(h5py.h5p.DATASET_CREATE)
    dcpl.set_alloc_time(h5py.h5d.ALLOC_TIME_EARLY)
    chunks = (rows if grow else min(max(shape[0], 1), rows), *(max(s, 1) for s in shape[1:]))
    maxshape = (None, *shape[1:]) if grow or 0 in shape else None  # a chunk may not exceed a fixed empty axis
    return g.create_dataset(name, shape=shape, dtype=dtype, data=data, chunks=chunks, maxshape=maxshape,
                            fletcher32=True, dcpl=dcpl)


def _layout_bytes(classnames: list[str], templates: list[str], splits: Mapping[str, Mapping[str, Any]],
                  embed_dim: int, aug_views: int, dtype: str) -> int:
    """Size [bytes] of a new cache file (every chunk allocated) with its `encode` rows (default all) encoded, with
    1 MiB for HDF5's own structures."""
    item = np.dtype(dtype).itemsize
    text = sum(len(s.encode("utf-8", "surrogateescape")) + 32 for s in [*classnames, *templates])
    total = 4 * len(classnames) * len(templates) * embed_dim + text + 2**20
    for name, rows in splits.items():
        n = len(rows["labels"])
        encoded = n if rows.get("encode") is None else len(rows["encode"])
        views = 1 + (aug_views if name == "train" else 0)
        total += encoded * views * embed_dim * item + n * (8 + 8 + 1 + 32)
        total += sum(len(str(p).encode("utf-8", "surrogateescape")) for p in rows["paths"])
    return total


def _free_bytes(folder: Path) -> int:
    """Bytes a file in `folder` may still grow by: the disk's free space, or the file-size limit if lower."""
    free = shutil.disk_usage(folder).free
    limit = resource.getrlimit(resource.RLIMIT_FSIZE)[0]
    return free if limit == resource.RLIM_INFINITY else min(free, limit)


def _mib(n: int) -> str:
    return f"{n / 2**20:.1f} MiB"


def _create_layout(f: h5py.File, attrs: Mapping[str, Any], classnames: list[str], templates: list[str],
                   splits: Mapping[str, Mapping[str, Any]], embed_dim: int, aug_views: int, dtype: str) -> None:
    """Write attributes, names and every split's listing (status all ABSENT); feature datasets start empty and
    grow as rows are requested (`CacheWriter.request`)."""
    for key, value in _root_attrs({**attrs, "embed_dim": embed_dim, "aug_views": aug_views,
                                   "feature_dtype": dtype}).items():
        f.attrs[key] = value
    f.create_dataset("classnames", data=np.asarray(classnames, dtype=object), dtype=_STR)
    f.create_dataset("templates", data=np.asarray(templates, dtype=object), dtype=_STR)
    _dataset(f, "text_features", shape=(len(classnames), len(templates), embed_dim), dtype="float32")
    for name, rows in splits.items():
        n = len(rows["labels"])
        g = f.create_group(f"splits/{name}")
        _dataset(g, "labels", shape=(n,), dtype=np.int64, data=np.asarray(rows["labels"], dtype=np.int64))
        g.create_dataset("paths", data=np.asarray([str(p) for p in rows["paths"]], dtype=object), dtype=_STR)
        _dataset(g, "status", shape=(n,), dtype=np.int8, data=np.full(n, ABSENT, dtype=np.int8))
        _dataset(g, "slot", shape=(n,), dtype=np.int64, data=np.full(n, -1, dtype=np.int64))
        _dataset(g, "features", shape=(0, embed_dim), dtype=dtype, rows=_CHUNK_ROWS["features"], grow=True)
        if aug_views and name == "train":
            _dataset(g, "aug_features", shape=(0, aug_views, embed_dim), dtype=dtype,
                     rows=_CHUNK_ROWS["aug_features"], grow=True)
    f.create_dataset("bad/paths", shape=(0,), maxshape=(None,), dtype=_STR)
    f.create_dataset("bad/errors", shape=(0,), maxshape=(None,), dtype=_STR)


def inspect(path: str | os.PathLike) -> dict[str, Any]:
    """What a cache or .partial file holds, without validating it: attrs, classnames, templates, bad image count
    and per split its row counts (`Listing.counts`) and feature dataset shapes/dtype."""
    attrs = _format_attrs(path)
    with _open(Path(path), "r") as f:
        splits = {}
        for name, g in f["splits"].items():
            status = _read(g["status"], Path(path))
            splits[name] = {**Listing(status, status, status).counts(), "dtype": str(g["features"].dtype),
                            **{key: tuple(g[key].shape) for key in ("features", "aug_features") if key in g}}
        return {"attrs": attrs, "classnames": _decode(_read(f["classnames"], Path(path))),
                "templates": _decode(_read(f["templates"], Path(path))),
                "bad": int(f["bad/paths"].shape[0]) if "bad/paths" in f else 0, "splits": splits}


def read_status(path: str | os.PathLike) -> dict[str, np.ndarray]:
    """Each split's row status [N] of a cache or .partial file of this schema ({} for anything else)."""
    try:
        if read_attrs(path).get("schema_version") != SCHEMA_VERSION:
            return {}
        with _open(Path(path), "r") as f:
            return {name: _read(g["status"], Path(path)) for name, g in f["splits"].items()}
    except (CacheError, OSError, KeyError):
        return {}


def listing_diff(path: Path, old_paths: Iterable[Any], old_labels: np.ndarray, paths: Iterable[Any],
                 labels: np.ndarray) -> str | None:
    """None when two listings are equal, else one phrase saying how they differ (images added/removed/relabelled)."""
    old, new = _decode(old_paths), [str(p) for p in paths]
    if old == new and np.array_equal(np.asarray(old_labels), np.asarray(labels)):
        return None
    added, removed = sorted(set(new) - set(old)), sorted(set(old) - set(new))
    if added or removed:
        example = f"e.g. {added[0]!r} added" if added else f"e.g. {removed[0]!r} removed"
        return f"{len(added)} images added and {len(removed)} removed since {path} was begun ({example})"
    return f"the images of {path} are listed in another order or with other labels"


def _in_the_way(tmp: Path, diff: str) -> str:
    return (f"{tmp}: an interrupted extraction with {diff} is in the way; rerun it with its settings, or delete the "
            ".partial file")


def check_writable(path: str | os.PathLike, new: Mapping[str, Any], *, overwrite: bool = False) -> None:
    """Raise, reading only, what `CacheWriter.open(path)` of identity `new` would refuse: a complete cache of another
    identity (unless overwrite) or an interrupted extraction of another identity in `X.h5.partial` (one that cannot
    be read is no error: the writer moves it aside)."""
    path = Path(path)
    if not overwrite:
        _guard_existing(path, new)
    tmp = partial_path(path)
    if tmp.is_file():
        try:
            diff = identity_diff(file_identity(tmp), new)
        except CacheError:
            return
        if diff:
            raise CacheError(_in_the_way(tmp, diff))


def _guard_existing(path: Path, new: Mapping[str, Any]) -> None:
    """Refuse to replace a complete cache whose identity (model, settings, classes, image listing) differs."""
    if path.is_dir():
        raise CacheError(f"{path}: is a folder, not a cache file; give a file path such as {path / 'x.h5'}")
    if not path.exists():
        return
    diff = identity_diff(file_identity(path), new)
    if diff:
        raise CacheError(f"{path}: exists with {diff}; refusing to mix or replace caches: choose another "
                         "--out file, or pass --overwrite to replace it")


def _file_identity(f: h5py.File, path: Path) -> dict[str, Any]:
    splits = {name: {"paths": _decode(_read(g["paths"], path)), "labels": _read(g["labels"], path)}
              for name, g in f["splits"].items()}
    return identity({k: _attr(v) for k, v in f.attrs.items()}, _decode(_read(f["classnames"], path)),
                    _decode(_read(f["templates"], path)), splits)


def _move_aside(tmp: Path, why: str) -> None:
    """Rename an unusable partial file out of the way (kept for inspection), saying so on stderr."""
    aside = tmp.with_name(f"{tmp.name}.unusable-{datetime.now(timezone.utc):%Y%m%dT%H%M%S.%f}")
    os.replace(tmp, aside)
    print(f"warning: {tmp}: cannot be resumed ({why}); moved it to {aside} and starting over", file=sys.stderr)


def _lock(path: Path, wait: float) -> int:
    """Take the writer lock of cache `path` (an flock on `lock_path(path)`), waiting up to `wait` seconds; returns
    its file descriptor. Forked DataLoader workers inherit it, so it is held until they exit too."""
    lock = lock_path(path)
    deadline, told = time.monotonic() + wait, False
    while True:
        try:
            fd = os.open(lock, os.O_RDWR | os.O_CREAT, 0o644)
        except OSError as e:
            if lock.is_dir():
                raise CacheError(f"{lock}: is a folder where the writer's lock file of {path} goes; move it away "
                                 "(a lock holds no data) and rerun") from None
            raise CacheError(f"{lock.parent}: cannot write there ({e.strerror}); choose a writable --out") from None
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            os.close(fd)
            if time.monotonic() >= deadline:
                raise CacheError(f"another extraction is writing {path}; wait for it or stop it") from None
            if not told:
                print(f"waiting up to {wait:.0f} s for another writer of {path} (or its workers) to finish",
                      file=sys.stderr)
                told = True
            time.sleep(0.2)
            continue
        try:
            if os.fstat(fd).st_ino == os.stat(lock).st_ino:
                return fd  # still the file at that path (a finishing writer unlinks it after its rename)
        except FileNotFoundError:
            pass
        os.close(fd)


def complete_status(path: str | os.PathLike, attrs: Mapping[str, Any], classnames: list[str],
                    templates: list[str], splits: Mapping[str, Mapping[str, Any]]) -> dict[str, np.ndarray] | None:
    """Each split's row status [N] when `path` is a complete cache of this identity, names and splits; None when it
    is absent or made otherwise (the writer then refuses or starts over); CacheError if its listing of a split
    differs from splits[name] (paths, labels): images were added or removed since."""
    path = Path(path)
    if not path.is_file():
        return None
    old = read_attrs(path)
    if not old.get("complete") or old.get("schema_version") != SCHEMA_VERSION or _identity(old) != _identity(attrs):
        return None
    with _open(path, "r") as f:
        if (_decode(_read(f["classnames"], path)) != list(classnames)
                or _decode(_read(f["templates"], path)) != list(templates)
                or set(f["splits"]) != set(splits)):
            return None
        for name, rows in splits.items():
            diff = listing_diff(path, _read(f["splits"][name]["paths"], path), _read(f["splits"][name]["labels"], path),
                                rows["paths"], rows["labels"])
            if diff:
                raise CacheError(f"{path}: exists with another image listing: {diff} ({name} split); choose "
                                 "another --out, or pass --overwrite to replace it")
        return {name: _read(f["splits"][name]["status"], path) for name in splits}


def write_cache(path: str | os.PathLike, *, attrs: Mapping[str, Any], classnames: list[str], templates: list[str],
                text_features: np.ndarray, splits: Mapping[str, Mapping[str, Any]],
                bad: Mapping[str, list[str]] | None = None, overwrite: bool = False) -> Path:
    """Write a whole cache at once, atomically (overwrite=True: an existing cache of another identity too).

    splits[name] = dict(features [N, D], labels [N], paths [N], optional aug_features [N, A, D]): every row
    encoded; bad = dict(paths=[...], errors=[...]) for images that were skipped.
    """
    text_features = np.asarray(text_features, dtype=np.float32)
    embed_dim = int(text_features.shape[-1])
    aug_views = int(np.shape(splits["train"]["aug_features"])[1]) if (
        "train" in splits and splits["train"].get("aug_features") is not None) else 0
    writer = CacheWriter.open(path, attrs=attrs, classnames=classnames, templates=templates, splits=splits,
                              embed_dim=embed_dim, aug_views=aug_views,
                              feature_dtype=str(attrs.get("feature_dtype", "float32")), fresh=True,
                              overwrite=overwrite)
    try:
        writer.write_text(text_features)
        for name, rows in splits.items():
            n = len(rows["labels"])
            writer.write_rows(name, np.arange(n), rows["features"], rows.get("aug_features"))
        if bad and len(bad.get("paths", [])):
            writer.record_bad(list(bad["paths"]), list(bad["errors"]))
        return writer.finalize()
    except BaseException:
        writer.discard()
        raise


class CacheWriter:
    """Incremental, resumable writer: fills `X.h5.partial`, then renames it to `X.h5` when every row is done.

    One writer per cache at a time (an flock on `X.h5.partial.lock`); the partial file is never truncated: it is
    resumed, or, when it cannot be read, moved aside. Every batch is flushed, so a killed run loses at most the
    batch in flight.
    """

    def __init__(self, path: Path, f: h5py.File, lock_fd: int, need: int):
        self.path = path
        self._f = f
        self._lock_fd = lock_fd
        self._need = need

    @classmethod
    def open(cls, path: str | os.PathLike, *, attrs: Mapping[str, Any], classnames: list[str], templates: list[str],
             splits: Mapping[str, Mapping[str, Any]], embed_dim: int, aug_views: int = 0,
             feature_dtype: str = "float32", fresh: bool = False, overwrite: bool = False,
             lock_wait: float = LOCK_WAIT_S) -> "CacheWriter":
        """Start a cache, or resume `X.h5.partial` when it was begun with the same identity (see `identity`).

        fresh=True always starts over (an old partial file is replaced); overwrite=True allows replacing a
        complete `X.h5` of another identity when this one finishes (otherwise CacheError).
        """
        path = Path(path)
        if feature_dtype not in ("float32", "float16"):
            raise CacheError(f"{path}: feature dtype {feature_dtype!r} not supported; use float32 or float16")
        attrs = {**attrs, "embed_dim": embed_dim, "aug_views": aug_views, "feature_dtype": feature_dtype}
        classnames, templates = list(classnames), list(templates)
        if not path.parent.is_dir():
            raise CacheError(f"{path.parent}: output folder does not exist; create it first")
        if path.is_dir():
            raise CacheError(f"{path}: is a folder, not a cache file; give a file path such as {path / 'x.h5'}")
        new = identity(attrs, classnames, templates, splits)
        need = _layout_bytes(classnames, templates, splits, embed_dim, aug_views, feature_dtype)
        fd = _lock(path, lock_wait)
        try:
            if not overwrite:
                _guard_existing(path, new)
            tmp = partial_path(path)
            f = None
            if fresh:
                tmp.unlink(missing_ok=True)
            elif tmp.exists():
                f = cls._resumable(tmp, new)
            if f is None:
                f = cls._create(tmp, attrs, classnames, templates, splits, embed_dim, aug_views, feature_dtype, need)
            writer = cls(path, f, fd, need)
        except BaseException:
            if not partial_path(path).exists():
                lock_path(path).unlink(missing_ok=True)
            os.close(fd)
            raise
        try:
            return writer._request_all(splits, attrs)
        except BaseException:
            writer.close()
            raise

    def _request_all(self, splits: Mapping[str, Mapping[str, Any]], attrs: Mapping[str, Any]) -> "CacheWriter":
        """Request each split's `encode` rows (default all) and record the pool; returns self."""
        for name, rows in splits.items():
            self.request(name, np.arange(len(rows["labels"])) if rows.get("encode") is None else rows["encode"])
        pool = str(attrs.get("pool", ""))
        if _attr(self._f.attrs.get("pool", "")) != pool:  # a resume that adds nothing leaves the file as it was
            with self._writing():
                self._f.attrs["pool"] = pool
                self._f.flush()
        return self

    def request(self, split: str, rows: np.ndarray) -> None:
        """Mark listed rows [M] of `split` to be encoded: those not encoded yet become PENDING and get the next
        free slots of the feature datasets (which grow); encoded rows keep their bytes."""
        g = self._f[f"splits/{split}"]
        tmp = partial_path(self.path)
        status = _read(g["status"], tmp)
        new = np.unique(np.asarray(rows, np.int64))
        new = new[status[new] == ABSENT]
        if not len(new):
            return
        slot = _read(g["slot"], tmp)
        start = g["features"].shape[0]
        slot[new] = np.arange(start, start + len(new))
        status[new] = PENDING
        with self._writing():
            for key in ("features", "aug_features"):
                if key in g:
                    g[key].resize(start + len(new), axis=0)
            self._f.flush()
            g["slot"][...] = slot
            g["status"][...] = status
            self._f.flush()

    @staticmethod
    def _create(tmp: Path, attrs: Mapping[str, Any], classnames: list[str], templates: list[str],
                splits: Mapping[str, Mapping[str, Any]], embed_dim: int, aug_views: int, dtype: str,
                need: int) -> h5py.File:
        """Write a new partial file: its whole layout goes to `X.h5.partial.new`, renamed into place when done."""
        free = _free_bytes(tmp.parent)
        if free < need:
            raise CacheError(f"{tmp}: needs {_mib(need)} of free space, its disk has {_mib(free)}; free space or "
                             "choose another --out")
        new = Path(f"{tmp}.new")
        try:
            f = h5py.File(new, "w")
        except OSError as e:
            raise CacheError(f"{new}: cannot create it ({e.strerror or e}); choose a writable --out") from None
        try:
            _create_layout(f, attrs, classnames, templates, splits, embed_dim, aug_views, dtype)
            f.close()
        except BaseException as e:
            try:
                f.close()
            except _H5_ERRORS:
                pass
            new.unlink(missing_ok=True)
            if isinstance(e, _H5_ERRORS):
                raise CacheError(f"{tmp}: cannot write it ({str(e).splitlines()[0][:200]}); it needs {_mib(need)} "
                                 f"of free space, its disk has {_mib(_free_bytes(tmp.parent))}") from None
            raise
        os.replace(new, tmp)
        return _open(tmp, "r+")

    @staticmethod
    def _resumable(tmp: Path, new: Mapping[str, Any]) -> h5py.File | None:
        """The open partial file if it continues the extraction of identity `new`; None (after moving it aside) if
        it cannot be resumed; CacheError if it belongs to another extraction."""
        try:
            f = h5py.File(tmp, "r+")
        except _H5_ERRORS as e:
            if _busy(e):
                raise CacheBusy(f"{tmp}: another process has it open; wait for it or stop it") from None
            _move_aside(tmp, f"not a readable HDF5 file: {str(e).splitlines()[0][:200]}")
            return None
        try:
            layout = (f.attrs.get("format") == FORMAT and f.attrs.get("schema_version") == SCHEMA_VERSION
                      and all(k in f for k in ("classnames", "templates", "text_features", "splits", "bad/paths",
                                               "bad/errors"))
                      and all(k in g for g in f["splits"].values()
                              for k in ("labels", "paths", "status", "slot", "features")))
            diff = identity_diff(_file_identity(f, tmp), new) if layout else ""
        except (CacheError, *_H5_ERRORS) as e:
            layout, why = False, f"unreadable: {str(e).splitlines()[0][:200]}"
        else:
            why = "it has no complete cache layout (killed while being created?)"
        if not layout:
            f.close()
            _move_aside(tmp, why)
            return None
        if diff:
            f.close()
            raise CacheError(_in_the_way(tmp, diff))
        return f

    @contextlib.contextmanager
    def _writing(self) -> Iterator[None]:
        """Turn a failed write (disk full, I/O error) into one CacheError line; the partial file keeps every batch
        flushed before and is resumed by a rerun."""
        try:
            yield
        except _H5_ERRORS as e:
            tmp = partial_path(self.path)
            self.close()
            raise CacheError(f"{tmp}: cannot write it ({str(e).splitlines()[0][:200]}); free disk space (the cache "
                             f"needs {_mib(self._need)} in all, its disk has {_mib(_free_bytes(tmp.parent))} free) "
                             "and rerun the same command: finished rows are kept") from None

    def pending(self, split: str) -> np.ndarray:
        """Local row ids [M] of `split` that are not extracted yet."""
        return np.flatnonzero(_read(self._f[f"splits/{split}/status"], partial_path(self.path)) == PENDING)

    def write_rows(self, split: str, rows: np.ndarray, features: np.ndarray,
                   aug_features: np.ndarray | None = None) -> None:
        """Store features [n, D] (and aug_features [n, A, D]) of requested rows [n], then mark them done.

        The features are flushed before the status says done, so a kill never leaves a done row without them."""
        g = self._f[f"splits/{split}"]
        rows = np.asarray(rows, dtype=np.int64)
        if len(rows) == 0:
            return
        slots = _read(g["slot"], partial_path(self.path))[rows]
        if np.any(slots < 0):
            raise CacheError(f"{self.path}: {split} rows {rows[slots < 0][:3].tolist()} were not requested")
        if aug_features is not None and "aug_features" not in g:
            raise CacheError(f"{self.path}: split {split!r} has no aug_features dataset")
        order = np.argsort(slots)  # h5py fancy indexing needs increasing indices
        rows, slots = rows[order], slots[order]
        where = slice(int(slots[0]), int(slots[-1]) + 1) if slots[-1] - slots[0] + 1 == len(slots) else slots.tolist()
        with self._writing():
            g["features"][where] = np.asarray(features)[order].astype(g["features"].dtype)
            if aug_features is not None:
                g["aug_features"][where] = np.asarray(aug_features)[order].astype(g["aug_features"].dtype)
            self._f.flush()
            g["status"][rows] = np.full(len(rows), OK, dtype=np.int8)
            self._f.flush()

    def mark_bad(self, split: str, rows: np.ndarray, errors: list[str]) -> None:
        """Mark local rows of unreadable images as skipped and record their paths and errors in /bad."""
        g = self._f[f"splits/{split}"]
        rows = np.asarray(rows, dtype=np.int64)
        order = np.argsort(rows)  # h5py fancy indexing needs increasing indices
        rows, errors = rows[order], [errors[i] for i in order]
        self.record_bad(_decode(g["paths"][rows]), errors)
        with self._writing():
            g["status"][rows] = np.full(len(rows), BAD, dtype=np.int8)
            self._f.flush()

    def record_bad(self, paths: list[str], errors: list[str]) -> None:
        """Append (path, error) pairs to /bad."""
        with self._writing():
            for key, values in (("paths", paths), ("errors", errors)):
                d = self._f[f"bad/{key}"]
                n = d.shape[0]
                d.resize((n + len(values),))
                d[n:] = np.asarray(values, dtype=object)

    def write_text(self, text_features: np.ndarray) -> None:
        """Store text features [C, P, D]."""
        d = self._f["text_features"]
        text_features = np.asarray(text_features, dtype=np.float32)
        if text_features.shape != d.shape:
            raise CacheError(f"{self.path}: text features have shape {text_features.shape}, expected {d.shape}")
        with self._writing():
            d[...] = text_features
            self._f.flush()
            self._f.attrs["text_done"] = True
            self._f.flush()

    @property
    def text_done(self) -> bool:
        """Whether the text features were written (a resumed run can skip them)."""
        return bool(self._f.attrs.get("text_done", False))

    def finalize(self) -> Path:
        """Check every row is done, mark the cache complete and move it into place; returns the final path."""
        tmp = partial_path(self.path)
        left = {name: int(np.sum(_read(g["status"], tmp) == PENDING)) for name, g in self._f["splits"].items()}
        text_done = self.text_done
        if any(left.values()) or not text_done:
            self.close()
            raise CacheError(f"{tmp}: not finished ({left} rows left, text written: {text_done}); rerun the "
                             "extraction to complete it")
        with self._writing():
            self._f.attrs["complete"] = True
            self._f.close()
        os.replace(tmp, self.path)
        lock_path(self.path).unlink(missing_ok=True)
        self.close()
        return self.path

    def close(self) -> None:
        """Close the partial file, keeping it for a later resume, and release the lock."""
        if self._f.id.valid:
            try:
                self._f.close()
            except _H5_ERRORS:
                pass  # a failed write left unflushable state: the file keeps what was flushed before
        if self._lock_fd >= 0:
            os.close(self._lock_fd)
            self._lock_fd = -1

    def discard(self) -> None:
        """Close and delete the partial file."""
        partial_path(self.path).unlink(missing_ok=True)
        lock_path(self.path).unlink(missing_ok=True)
        self.close()

def reopen_complete(path: str | os.PathLike) -> None:
    """Copy a complete cache to `X.h5.partial` (marked incomplete) so a writer can add rows to it; `X.h5` stays
    as it is until the extended file is finalized over it."""
    path, tmp = Path(path), partial_path(path)
    if writer_active(path):
        raise CacheError(f"another extraction is writing {path}; wait for it or stop it")
    staging = Path(f"{tmp}.copy")
    shutil.copyfile(path, staging)
    with h5py.File(staging, "r+") as f:
        f.attrs["complete"] = False
    os.replace(staging, tmp)
