"""Reading the HDF5 feature cache (the contract between `extract` and `train_jax`; schema: ``data.cache_schema``).

``open_cache`` validates a complete file and reads listings, then only the rows asked for (``CacheReader.read``);
``read_cache`` reads every encoded row. ``train_jax`` only reads; ``extract`` writes through ``data.cache_writer``.
numpy + h5py only.
"""
from __future__ import annotations

import errno
import fcntl
import os
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterable

import h5py
import numpy as np

from data.cache_schema import (ABSENT, BAD, DEFAULT_ATTRS, FORMAT, IDENTITY_ATTRS, LOCK_WAIT_S, MODEL_ATTRS, OK,
                               PENDING, SCHEMA, SCHEMA_VERSION, SPLITS, STORED, UNLABELLED, CacheBusy, CacheError,
                               Stored, attr_value, cache_identity, decode_strings, identity, identity_diff, lock_path,
                               partial_path, required, stored)
from data.registry import ensemble_templates
from data.vectors import l2_normalize

__all__ = [  # the reader API, the schema names and l2_normalize (re-exported: one import for a reading stage)
    "ABSENT", "BAD", "DEFAULT_ATTRS", "FORMAT", "IDENTITY_ATTRS", "LOCK_WAIT_S", "MODEL_ATTRS", "OK", "PENDING",
    "READ_BLOCK_BYTES", "SCHEMA", "SCHEMA_VERSION", "SPLITS", "STORED", "UNLABELLED", "CacheBusy", "CacheError",
    "CacheHead", "CacheReader", "FeatureCache", "Listing", "Split", "Stored", "cache_identity", "file_identity", "identity",
    "identity_diff", "inspect", "l2_normalize", "lock_path", "open_cache", "partial_path", "read_attrs",
    "read_cache", "read_status", "verify", "writer_active",
]

READ_BLOCK_BYTES = 64 << 20  # features read from the file at a time
_NORM_TOL = 1e-2  # float16 storage keeps norms within ~1e-3
H5_ERRORS = (OSError, ValueError, RuntimeError)  # what h5py raises when the file system refuses a read or write


@dataclass(frozen=True)
class Split:
    """One split of a cache: features [N, D] float32, labels [N] int64, paths [N] str, aug_features [N, A, D];
    norms [N] and aug_norms [N, A]: each feature's norm before L2-normalisation (raw = norm * unit feature; None:
    not given, norm 1)."""

    features: np.ndarray
    labels: np.ndarray
    paths: np.ndarray
    aug_features: np.ndarray | None = None
    norms: np.ndarray | None = None
    aug_norms: np.ndarray | None = None

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


def file_identity(path: str | os.PathLike) -> dict[str, Any]:
    """`identity` of a cache file (complete or not)."""
    path = Path(path)
    read_attrs(path)  # one-line errors for a folder, a missing file, a file being written
    with open_h5(path, "r") as f:
        _check(all(k in f for k in ("splits", "classnames", "templates")), path,
               "missing /splits, /classnames or /templates")
        return h5_identity(f, path)


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


def busy(e: BaseException) -> bool:
    """Whether h5py's error is HDF5 refusing the file because another process holds its lock (errno EAGAIN /
    EWOULDBLOCK), not some other message that merely contains "lock" ("sblock" of a truncated file)."""
    found = _LOCKED.search(str(e))
    return found is not None and int(found[1]) in (errno.EAGAIN, errno.EWOULDBLOCK)


def open_h5(path: Path, mode: str) -> h5py.File:
    """h5py.File(path, mode) with a one-line CacheError for a file in use, a folder, or a non-HDF5 file."""
    try:
        return h5py.File(path, mode)
    except H5_ERRORS as e:
        text = str(e).splitlines()[0] if str(e) else type(e).__name__
        if path.is_dir():
            raise CacheError(f"{path}: is a folder, not a cache file; give a file path such as {path / 'x.h5'}") \
                from None
        if busy(e):
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
    with open_h5(path, "r") as f:
        return {k: attr_value(v) for k, v in f.attrs.items()}


def read_checked(d: h5py.Dataset, path: Path, sel: Any = ()) -> np.ndarray:
    """d[sel], with a one-line CacheError naming the dataset when its bytes fail their checksum."""
    try:
        return d[sel]
    except H5_ERRORS as e:
        raise CacheError(f"{path}: {d.name} is corrupted ({str(e).splitlines()[0]}); its bytes were damaged "
                         "after writing: extract the cache again") from None


def verify(path: str | os.PathLike) -> int:
    """Read every dataset of a cache chunk by chunk, checking the Fletcher-32 checksums; returns the number of
    checksummed datasets. Raises CacheError naming the dataset and rows of the first damaged chunk."""
    path = Path(path)
    datasets: list[h5py.Dataset] = []
    with open_h5(path, "r") as f:
        f.visititems(lambda _, obj: datasets.append(obj) if isinstance(obj, h5py.Dataset) else None)
        for d in datasets:
            for sel in (d.iter_chunks() if d.chunks and d.size else [()]):
                try:
                    d[sel]
                except H5_ERRORS as e:
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
        with open_h5(self.path, "r") as f:
            return list(f["splits"].keys())

    def listing(self, split: str) -> Listing:
        """Labels, paths and status of every listed row of `split` (CacheError if the file lacks it)."""
        with open_h5(self.path, "r") as f:
            g = self._group(f, split)
            for spec in required(per_split=True):
                _check(spec.name in g, self.path, f"missing /{spec.at(split)}")
            labels, status = np.asarray(read_checked(g["labels"], self.path), np.int64), np.asarray(read_checked(g["status"], self.path), np.int8)
            paths = np.asarray(read_checked(g["paths"], self.path), dtype=bytes)  # fixed-width: half the memory of str objects
        _check(labels.shape == status.shape == paths.shape, self.path,
               f"/splits/{split} labels, paths and status differ in length")
        _check(bool(np.all(status != PENDING)), self.path, f"split {split!r} has rows that were never extracted")
        if len(labels):
            n_classes = len(self.classnames)
            _check(bool(labels.min() >= 0 and labels.max() < n_classes) or bool(np.all(labels == UNLABELLED)),
                   self.path, f"/splits/{split}/labels outside [0, {n_classes}) (or not all {UNLABELLED}: "
                   "unlabelled)")
        return Listing(labels, paths, status)

    def read(self, split: str, rows: np.ndarray, *, views: bool = False,
             out: np.ndarray | None = None) -> tuple[np.ndarray, np.ndarray | None]:
        """Features [n, D] float32 (and augmented views [n, A, D] when views=True) of encoded rows [n] of `split`.

        With views, both are slices of one array [n, 1 + A, D] (plain view first), so `features.base` holds them
        stacked without a copy. `out`: that array to fill instead of a new one, float32 C-contiguous [n', 1 + A
        (0 without views), D] with n' >= n (rows n.. untouched). CacheError naming the split if a row is not
        encoded (ABSENT) or unreadable, or views are asked but absent.
        """
        rows = np.asarray(rows, np.int64)
        with open_h5(self.path, "r") as f:
            g = self._group(f, split)
            status, slot = read_checked(g["status"], self.path), read_checked(g["slot"], self.path)
            missing = rows[status[rows] != OK]
            if len(missing):
                what = "not encoded" if status[missing[0]] == ABSENT else "unreadable images (skipped)"
                raise CacheError(f"{self.path}: {len(missing)} {split} rows asked for are {what}, e.g. "
                                 f"{decode_strings(g['paths'][missing[:1]])[0]!r}")
            dim = int(self.attrs.get("embed_dim", 0))
            dims = {"D": dim}
            if views and "aug_features" not in g:
                raise CacheError(f"{self.path}: split {split!r} has no augmented views; extract it with --aug-views")
            for spec in (stored("features"), *([stored("aug_features")] if views else [])):
                _check(spec.fits(g[spec.name].shape, dims), self.path,
                       f"/{spec.at(split)} rows are not {spec.row_text(dims)}")
            shape = (len(rows), 1 + (g["aug_features"].shape[1] if views else 0), dim)
            if out is not None and (out.dtype != np.float32 or len(out) < shape[0] or out.shape[1:] != shape[1:]):
                raise ValueError(f"out {out.dtype}{list(out.shape)} cannot hold float32 rows of {list(shape)}")
            stacked = np.empty(shape, np.float32) if out is None else out[: shape[0]]
            _read_slots(g["features"], slot[rows], stacked[:, 0], self.path)
            _check_norms(stacked[:, 0], self.path, f"/splits/{split}/features")
            if views:
                _read_slots(g["aug_features"], slot[rows], stacked[:, 1:], self.path)
        return stacked[:, 0], stacked[:, 1:] if views else None

    def norms(self, split: str, rows: np.ndarray, *, views: bool = False) -> np.ndarray:
        """Norms before L2-normalisation [n] of the features of encoded rows [n] of `split` (views=True: [n, 1 + A],
        the plain view first, as ``read`` stacks them)."""
        rows = np.asarray(rows, np.int64)
        with open_h5(self.path, "r") as f:
            g = self._group(f, split)
            status, slot = read_checked(g["status"], self.path), read_checked(g["slot"], self.path)
            _check(bool(np.all(status[rows] == OK)), self.path, f"norms asked of {split} rows that are not encoded")
            for spec in (stored("norms"), *([stored("aug_norms")] if views else [])):
                _check(spec.name in g and g[spec.name].shape[0] == g["features"].shape[0], self.path,
                       f"/{spec.at(split)} missing or not one per feature row")
            out = np.empty((len(rows), 1 + (g["aug_norms"].shape[1] if views else 0)), np.float32)
            _read_slots(g["norms"], slot[rows], out[:, 0], self.path)
            if views:
                _read_slots(g["aug_norms"], slot[rows], out[:, 1:], self.path)
        return out if views else out[:, 0]

    def has_views(self, split: str) -> bool:
        """Whether `split` stores augmented views."""
        with open_h5(self.path, "r") as f:
            return "aug_features" in self._group(f, split)

    def aug_views(self, split: str) -> int:
        """Augmented views stored per row of `split` (0: none)."""
        with open_h5(self.path, "r") as f:
            g = self._group(f, split)
            return int(g["aug_features"].shape[1]) if "aug_features" in g else 0

    def bad(self) -> dict[str, str]:
        """Path -> error of every image skipped as unreadable."""
        with open_h5(self.path, "r") as f:
            return (dict(zip(decode_strings(read_checked(f["bad/paths"], self.path)), decode_strings(read_checked(f["bad/errors"], self.path))))
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
            out[order[start:stop]] = read_checked(d, path, slice(int(want[0]), int(want[-1]) + 1))[want - want[0]]
        else:  # sparse: only the rows asked (h5py wants increasing, unique indices)
            unique, inverse = np.unique(want, return_inverse=True)
            out[order[start:stop]] = read_checked(d, path, unique.tolist())[inverse]
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
    with open_h5(path, "r") as f:
        for key in (*(s.path for s in required(per_split=False)), "splits"):
            _check(key in f, path, f"missing /{key}")
        classnames = decode_strings(read_checked(f["classnames"], path))
        templates = decode_strings(read_checked(f["templates"], path))
        text = np.asarray(read_checked(f["text_features"], path), dtype=np.float32)
    expected = STORED["text_features"].shape({"C": len(classnames), "P": len(templates),
                                              "D": int(attrs.get("embed_dim", 0))})
    _check(text.shape == expected, path, f"/text_features has shape {text.shape}, expected {expected}")
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
        views = with_aug and reader.has_views(name)
        features, aug = reader.read(name, rows, views=views)
        norms = reader.norms(name, rows, views=views)
        out[name] = Split(features, listing.labels[rows], np.asarray(decode_strings(listing.paths[rows]), dtype=object),
                          aug, norms[:, 0] if views else norms, norms[:, 1:] if views else None)
    return FeatureCache(reader.path, reader.attrs, reader.classnames, reader.templates, reader.text_features, out,
                        list(reader.bad()))


def inspect(path: str | os.PathLike) -> dict[str, Any]:
    """What a cache or .partial file holds, without validating it: attrs, classnames, templates, bad image count
    and per split its row counts (`Listing.counts`) and feature dataset shapes/dtype."""
    attrs = _format_attrs(path)
    with open_h5(Path(path), "r") as f:
        splits = {}
        for name, g in f["splits"].items():
            status = read_checked(g["status"], Path(path))
            splits[name] = {**Listing(status, status, status).counts(), "dtype": str(g["features"].dtype),
                            **{s.name: tuple(g[s.name].shape) for s in SCHEMA if s.per_split and s.rows == "M" and s.name in g}}
        return {"attrs": attrs, "classnames": decode_strings(read_checked(f["classnames"], Path(path))),
                "templates": decode_strings(read_checked(f["templates"], Path(path))),
                "bad": int(f["bad/paths"].shape[0]) if "bad/paths" in f else 0, "splits": splits}


def read_status(path: str | os.PathLike) -> dict[str, np.ndarray]:
    """Each split's row status [N] of a cache or .partial file of this schema ({} for anything else)."""
    try:
        if read_attrs(path).get("schema_version") != SCHEMA_VERSION:
            return {}
        with open_h5(Path(path), "r") as f:
            return {name: read_checked(g["status"], Path(path)) for name, g in f["splits"].items()}
    except (CacheError, OSError, KeyError):
        return {}


def h5_identity(f: h5py.File, path: Path) -> dict[str, Any]:
    """``identity`` of the open cache file ``f`` (``path``: its name in errors), from its attributes, class and
    template lists and each split's listing."""
    splits = {name: {"paths": decode_strings(read_checked(g["paths"], path)), "labels": read_checked(g["labels"], path)}
              for name, g in f["splits"].items()}
    return identity({k: attr_value(v) for k, v in f.attrs.items()}, decode_strings(read_checked(f["classnames"], path)),
                    decode_strings(read_checked(f["templates"], path)), splits)


