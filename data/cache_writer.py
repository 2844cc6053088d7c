"""Writing the HDF5 feature cache: a whole cache at once (``write_cache``) or incrementally and resumably
(``CacheWriter``: ``X.h5.partial`` under an flock, renamed to ``X.h5`` when complete). The layout is created from
``data.cache_schema.SCHEMA``. Only ``extract`` (and tests, benches) write; numpy + h5py only.
"""
from __future__ import annotations

import contextlib
import fcntl
import json
import os
import resource
import shutil
import sys
import time
from datetime import datetime, timezone
from pathlib import Path
from typing import Any, Iterable, Iterator, Mapping

import h5py
import numpy as np

from data.cache import (H5_ERRORS, busy, file_identity, h5_identity, open_h5, read_attrs, read_checked,
                        writer_active)
from data.cache_schema import (ABSENT, BAD, DEFAULT_ATTRS, FORMAT, LOCK_WAIT_S, OK, PENDING, SCHEMA_VERSION,
                               SCHEMA, CacheBusy, CacheError, Stored, attr_value, decode_strings, identity,
                               identity_attrs, identity_diff, lock_path, partial_path, required, schema_groups)

_STR = h5py.string_dtype("utf-8")


def _root_attrs(attrs: Mapping[str, Any]) -> dict[str, Any]:
    out = {**DEFAULT_ATTRS, **attrs, "format": FORMAT, "schema_version": SCHEMA_VERSION, "complete": False}
    out = {k: json.dumps(v, sort_keys=True) if isinstance(v, (dict, list, tuple)) else v for k, v in out.items()}
    if not out["created"]:
        out["created"] = datetime.now(timezone.utc).isoformat(timespec="seconds")
    return out


def _dataset(g: h5py.Group, spec: Stored, dims: Mapping[str, int], feature_dtype: str,
             data: Any = None) -> h5py.Dataset:
    """Create ``spec``'s dataset in ``g`` (a split's group: named ``spec.name``; the file: at ``spec.path``), of
    shape ``spec.shape(dims)``, filled with ``data``.

    A checksummed dataset is chunked (``spec.chunk_rows`` rows per chunk, a Fletcher-32 checksum per chunk) and
    allocated in full at creation, so filling it never needs more disk space; a growable one's first axis can grow
    (``CacheWriter.request``), each growth allocating the new chunks. Strings carry no filter.
    """
    shape = spec.shape(dims)
    name = spec.name if spec.per_split else spec.path
    if spec.dtype == "str":
        if spec.growable:
            return g.create_dataset(name, shape=shape, maxshape=(None, *shape[1:]), dtype=_STR)
        return g.create_dataset(name, data=np.asarray(data, dtype=object), dtype=_STR)
    dtype = feature_dtype if spec.dtype == "features" else spec.dtype
    dcpl = h5py.h5p.create(h5py.h5p.DATASET_CREATE)
    dcpl.set_alloc_time(h5py.h5d.ALLOC_TIME_EARLY)
    rows = spec.chunk_rows
    chunks = (rows if spec.growable else min(max(shape[0], 1), rows), *(max(s, 1) for s in shape[1:]))
    maxshape = (None, *shape[1:]) if spec.growable or 0 in shape else None  # a chunk may not exceed a fixed empty axis
    return g.create_dataset(name, shape=shape, dtype=dtype, data=data, chunks=chunks, maxshape=maxshape,
                            fletcher32=spec.checksummed, dcpl=dcpl)


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
        total += encoded * views * (embed_dim * item + 4) + n * (8 + 8 + 1 + 32)
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
    """Write attributes and every dataset of ``SCHEMA``: names, each split's listing (status all ABSENT, no slot);
    feature datasets start empty and grow as rows are requested (``CacheWriter.request``)."""
    for key, value in _root_attrs({**attrs, "embed_dim": embed_dim, "aug_views": aug_views,
                                   "feature_dtype": dtype}).items():
        f.attrs[key] = value
    dims = {"C": len(classnames), "P": len(templates), "D": embed_dim, "A": aug_views, "M": 0, "B": 0}
    root_data = {"classnames": classnames, "templates": templates}
    for per_split, group in schema_groups():
        if not per_split:
            for spec in group:
                _dataset(f, spec, dims, dtype, root_data.get(spec.path))
            continue
        for name, rows in splits.items():
            n = len(rows["labels"])
            data = {"labels": np.asarray(rows["labels"], dtype=np.int64), "paths": [str(p) for p in rows["paths"]],
                    "status": np.full(n, ABSENT, dtype=np.int8), "slot": np.full(n, -1, dtype=np.int64)}
            g = f.create_group(f"splits/{name}")
            for spec in group:
                if spec.applies(name, aug_views):
                    _dataset(g, spec, {**dims, "N": n}, dtype, data.get(spec.name))


def listing_diff(path: Path, old_paths: Iterable[Any], old_labels: np.ndarray, paths: Iterable[Any],
                 labels: np.ndarray) -> str | None:
    """None when two listings are equal, else one phrase saying how they differ (images added/removed/relabelled)."""
    old, new = decode_strings(old_paths), [str(p) for p in paths]
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
    if not old.get("complete") or old.get("schema_version") != SCHEMA_VERSION or identity_attrs(old) != identity_attrs(attrs):
        return None
    with open_h5(path, "r") as f:
        if (decode_strings(read_checked(f["classnames"], path)) != list(classnames)
                or decode_strings(read_checked(f["templates"], path)) != list(templates)
                or set(f["splits"]) != set(splits)):
            return None
        for name, rows in splits.items():
            diff = listing_diff(path, read_checked(f["splits"][name]["paths"], path), read_checked(f["splits"][name]["labels"], path),
                                rows["paths"], rows["labels"])
            if diff:
                raise CacheError(f"{path}: exists with another image listing: {diff} ({name} split); choose "
                                 "another --out, or pass --overwrite to replace it")
        return {name: read_checked(f["splits"][name]["status"], path) for name in splits}


def write_cache(path: str | os.PathLike, *, attrs: Mapping[str, Any], classnames: list[str], templates: list[str],
                text_features: np.ndarray, splits: Mapping[str, Mapping[str, Any]],
                bad: Mapping[str, list[str]] | None = None, overwrite: bool = False) -> Path:
    """Write a whole cache at once, atomically (overwrite=True: an existing cache of another identity too).

    splits[name] = dict(features [N, D], labels [N], paths [N], optional aug_features [N, A, D], optional norms
    [N] and aug_norms [N, A] (default 1: the features are their own raw features)): every row encoded;
    bad = dict(paths=[...], errors=[...]) for images that were skipped.
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
            writer.write_rows(name, np.arange(n), rows["features"], rows.get("aug_features"), rows.get("norms"),
                              rows.get("aug_norms"))
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
        if attr_value(self._f.attrs.get("pool", "")) != pool:  # a resume that adds nothing leaves the file as it was
            with self._writing():
                self._f.attrs["pool"] = pool
                self._f.flush()
        return self

    def request(self, split: str, rows: np.ndarray) -> None:
        """Mark listed rows [M] of `split` to be encoded: those not encoded yet become PENDING and get the next
        free slots of the feature datasets (which grow); encoded rows keep their bytes."""
        g = self._f[f"splits/{split}"]
        tmp = partial_path(self.path)
        status = read_checked(g["status"], tmp)
        new = np.unique(np.asarray(rows, np.int64))
        new = new[status[new] == ABSENT]
        if not len(new):
            return
        slot = read_checked(g["slot"], tmp)
        start = g["features"].shape[0]
        slot[new] = np.arange(start, start + len(new))
        status[new] = PENDING
        with self._writing():
            for spec in SCHEMA:
                if spec.per_split and spec.growable and spec.name in g:
                    g[spec.name].resize(start + len(new), axis=0)
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
            except H5_ERRORS:
                pass
            new.unlink(missing_ok=True)
            if isinstance(e, H5_ERRORS):
                raise CacheError(f"{tmp}: cannot write it ({str(e).splitlines()[0][:200]}); it needs {_mib(need)} "
                                 f"of free space, its disk has {_mib(_free_bytes(tmp.parent))}") from None
            raise
        os.replace(new, tmp)
        return open_h5(tmp, "r+")

    @staticmethod
    def _resumable(tmp: Path, new: Mapping[str, Any]) -> h5py.File | None:
        """The open partial file if it continues the extraction of identity `new`; None (after moving it aside) if
        it cannot be resumed; CacheError if it belongs to another extraction."""
        try:
            f = h5py.File(tmp, "r+")
        except H5_ERRORS as e:
            if busy(e):
                raise CacheBusy(f"{tmp}: another process has it open; wait for it or stop it") from None
            _move_aside(tmp, f"not a readable HDF5 file: {str(e).splitlines()[0][:200]}")
            return None
        try:
            layout = (f.attrs.get("format") == FORMAT and f.attrs.get("schema_version") == SCHEMA_VERSION
                      and "splits" in f and all(s.path in f for s in SCHEMA if not s.per_split)
                      and all(s.name in g for g in f["splits"].values() for s in required(per_split=True)))
            diff = identity_diff(h5_identity(f, tmp), new) if layout else ""
        except (CacheError, *H5_ERRORS) as e:
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
        except H5_ERRORS as e:
            tmp = partial_path(self.path)
            self.close()
            raise CacheError(f"{tmp}: cannot write it ({str(e).splitlines()[0][:200]}); free disk space (the cache "
                             f"needs {_mib(self._need)} in all, its disk has {_mib(_free_bytes(tmp.parent))} free) "
                             "and rerun the same command: finished rows are kept") from None

    def pending(self, split: str) -> np.ndarray:
        """Local row ids [M] of `split` that are not extracted yet."""
        return np.flatnonzero(read_checked(self._f[f"splits/{split}/status"], partial_path(self.path)) == PENDING)

    def write_rows(self, split: str, rows: np.ndarray, features: np.ndarray, aug_features: np.ndarray | None = None,
                   norms: np.ndarray | None = None, aug_norms: np.ndarray | None = None) -> None:
        """Store features [n, D] (and aug_features [n, A, D]) of requested rows [n], and their norms before
        L2-normalisation [n] (and [n, A]; default 1), then mark them done.

        The features are flushed before the status says done, so a kill never leaves a done row without them."""
        g = self._f[f"splits/{split}"]
        rows = np.asarray(rows, dtype=np.int64)
        if len(rows) == 0:
            return
        slots = read_checked(g["slot"], partial_path(self.path))[rows]
        if np.any(slots < 0):
            raise CacheError(f"{self.path}: {split} rows {rows[slots < 0][:3].tolist()} were not requested")
        if aug_features is not None and "aug_features" not in g:
            raise CacheError(f"{self.path}: split {split!r} has no aug_features dataset")
        order = np.argsort(slots)  # h5py fancy indexing needs increasing indices
        rows, slots = rows[order], slots[order]
        where = slice(int(slots[0]), int(slots[-1]) + 1) if slots[-1] - slots[0] + 1 == len(slots) else slots.tolist()
        with self._writing():
            g["features"][where] = np.asarray(features)[order].astype(g["features"].dtype)
            g["norms"][where] = np.ones(len(rows), np.float32) if norms is None else np.asarray(norms, np.float32)[order]
            if aug_features is not None:
                g["aug_features"][where] = np.asarray(aug_features)[order].astype(g["aug_features"].dtype)
                g["aug_norms"][where] = (np.ones((len(rows), g["aug_norms"].shape[1]), np.float32)
                                         if aug_norms is None else np.asarray(aug_norms, np.float32)[order])
            self._f.flush()
            g["status"][rows] = np.full(len(rows), OK, dtype=np.int8)
            self._f.flush()

    def mark_bad(self, split: str, rows: np.ndarray, errors: list[str]) -> None:
        """Mark local rows of unreadable images as skipped and record their paths and errors in /bad."""
        g = self._f[f"splits/{split}"]
        rows = np.asarray(rows, dtype=np.int64)
        order = np.argsort(rows)  # h5py fancy indexing needs increasing indices
        rows, errors = rows[order], [errors[i] for i in order]
        self.record_bad(decode_strings(g["paths"][rows]), errors)
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
        left = {name: int(np.sum(read_checked(g["status"], tmp) == PENDING)) for name, g in self._f["splits"].items()}
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
            except H5_ERRORS:
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
