"""The HDF5 feature cache: the contract between `extract` and `train_jax` (schema: README, "Cache schema").

Needs only h5py + numpy: both stages read and write caches through this module, neither through the other.
"""
from __future__ import annotations

import hashlib
import json
import os
import shutil
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from typing import Any, Iterable, Mapping

import h5py
import numpy as np

from data.registry import ensemble_templates

FORMAT = "cmm-feature-cache"
SCHEMA_VERSION = 2
SPLITS = ("train", "val", "test")
# Row status: PENDING = to encode, OK = encoded, BAD = unreadable image (skipped), ABSENT = listed, not encoded
# (outside a pooled extraction's rows).
PENDING, OK, BAD, ABSENT = 0, 1, 2, 3
UNLABELLED = -1  # the label of every row of an unlabelled split (images to classify, never to train or score on)
READ_BLOCK_BYTES = 64 << 20  # features read from the file at a time
# Attributes that say which model and preprocessing made the features: a cache never mixes two of them.
IDENTITY_ATTRS = ("dataset", "model", "pretrained", "weights_sha256", "model_config", "embed_dim",
                  "feature_dtype", "preprocess", "aug_views", "aug_seed", "aug", "shard", "activation")
DEFAULT_ATTRS: dict[str, Any] = {
    "dataset": "", "model": "", "pretrained": "", "weights_sha256": "", "model_config": "", "embed_dim": 0,
    "feature_dtype": "float32", "preprocess": "{}", "aug_views": 0, "aug_seed": 0, "aug": "{}", "shard": "",
    "versions": "{}", "created": "", "pool": "", "command": "",
    "activation": "", "logit_scale": 0.0, "logit_bias": 0.0,  # the model's own; logit_scale 0: not recorded
}
_STR = h5py.string_dtype("utf-8")
_NORM_TOL = 1e-2  # float16 storage keeps norms within ~1e-3


class CacheError(Exception):
    """A cache file that cannot be read or written as asked; the message names the file and the fix."""


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
    return {**{k: full[k] for k in ("model", "pretrained", "weights_sha256", "model_config", "activation",
                                    "embed_dim", "preprocess")},
            "classnames_sha256": digest(classnames), "templates_sha256": digest(templates)}


def partial_path(path: str | os.PathLike) -> Path:
    """Where a cache is written until it is complete."""
    return Path(f"{path}.partial")


def read_attrs(path: str | os.PathLike) -> dict[str, Any]:
    """Root attributes of a cache file (no validation beyond being an HDF5 file)."""
    path = Path(path)
    if not path.is_file():
        raise CacheError(f"{path}: no such cache file; run `python -m extract run ...` to make it")
    try:
        with h5py.File(path, "r") as f:
            return {k: _attr(v) for k, v in f.attrs.items()}
    except OSError as e:
        raise CacheError(f"{path}: not a readable HDF5 file ({e}); delete it and extract again") from None


def _check(ok: bool, path: Path, what: str) -> None:
    if not ok:
        raise CacheError(f"{path}: {what}; the file is not a valid {FORMAT} v{SCHEMA_VERSION}, extract it again")


class CacheReader(CacheHead):
    """A validated complete cache read row by row: listings in memory, features read only for the rows asked.

    Memory is bounded by what is asked for (plus READ_BLOCK_BYTES), not by the file.
    """

    def split_names(self) -> list[str]:
        """The splits the file holds."""
        with h5py.File(self.path, "r") as f:
            return list(f["splits"].keys())

    def listing(self, split: str) -> Listing:
        """Labels, paths and status of every listed row of `split` (CacheError if the file lacks it)."""
        with h5py.File(self.path, "r") as f:
            g = self._group(f, split)
            for key in ("labels", "paths", "status", "slot", "features"):
                _check(key in g, self.path, f"missing /splits/{split}/{key}")
            labels, status = np.asarray(g["labels"][()], np.int64), np.asarray(g["status"][()], np.int8)
            paths = np.asarray(g["paths"][()], dtype=bytes)  # fixed-width: half the memory of str objects
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
        with h5py.File(self.path, "r") as f:
            g = self._group(f, split)
            status, slot = g["status"][()], g["slot"][()]
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
            _read_slots(g["features"], slot[rows], stacked[:, 0])
            _check_norms(stacked[:, 0], self.path, f"/splits/{split}/features")
            if views:
                _read_slots(g["aug_features"], slot[rows], stacked[:, 1:])
        return stacked[:, 0], stacked[:, 1:] if views else None

    def has_views(self, split: str) -> bool:
        """Whether `split` stores augmented views."""
        with h5py.File(self.path, "r") as f:
            return "aug_features" in self._group(f, split)

    def bad(self) -> dict[str, str]:
        """Path -> error of every image skipped as unreadable."""
        with h5py.File(self.path, "r") as f:
            return dict(zip(_decode(f["bad/paths"][()]), _decode(f["bad/errors"][()]))) if "bad" in f else {}

    def _group(self, f: h5py.File, split: str) -> h5py.Group:
        _check(split in f["splits"], self.path, f"missing split {split!r} (it has {list(f['splits'].keys())})")
        return f["splits"][split]


def _read_slots(d: h5py.Dataset, slots: np.ndarray, out: np.ndarray) -> None:
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
            out[order[start:stop]] = d[int(want[0]) : int(want[-1]) + 1][want - want[0]]
        else:  # sparse: only the rows asked (h5py wants increasing, unique indices)
            unique, inverse = np.unique(want, return_inverse=True)
            out[order[start:stop]] = d[unique.tolist()][inverse]
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
    with h5py.File(path, "r") as f:
        for key in ("classnames", "templates", "text_features", "splits"):
            _check(key in f, path, f"missing /{key}")
        classnames = _decode(f["classnames"][()])
        templates = _decode(f["templates"][()])
        text = np.asarray(f["text_features"][()], dtype=np.float32)
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


def _create_layout(f: h5py.File, attrs: Mapping[str, Any], classnames: list[str], templates: list[str],
                   splits: Mapping[str, Mapping[str, Any]], embed_dim: int, aug_views: int, dtype: str) -> None:
    """Write attributes, names and every split's listing (status all ABSENT); feature datasets start empty and
    grow as rows are requested (`CacheWriter.request`)."""
    for key, value in _root_attrs({**attrs, "embed_dim": embed_dim, "aug_views": aug_views,
                                   "feature_dtype": dtype}).items():
        f.attrs[key] = value
    f.create_dataset("classnames", data=np.asarray(classnames, dtype=object), dtype=_STR)
    f.create_dataset("templates", data=np.asarray(templates, dtype=object), dtype=_STR)
    f.create_dataset("text_features", shape=(len(classnames), len(templates), embed_dim), dtype="float32")
    for name, rows in splits.items():
        n = len(rows["labels"])
        g = f.create_group(f"splits/{name}")
        g.create_dataset("labels", data=np.asarray(rows["labels"], dtype=np.int64))
        g.create_dataset("paths", data=np.asarray([str(p) for p in rows["paths"]], dtype=object), dtype=_STR)
        g.create_dataset("status", data=np.full(n, ABSENT, dtype=np.int8))
        g.create_dataset("slot", data=np.full(n, -1, dtype=np.int64))
        g.create_dataset("features", shape=(0, embed_dim), maxshape=(None, embed_dim), dtype=dtype,
                         chunks=(1024, embed_dim))
        if aug_views and name == "train":
            g.create_dataset("aug_features", shape=(0, aug_views, embed_dim), maxshape=(None, aug_views, embed_dim),
                             dtype=dtype, chunks=(max(1, 256 // aug_views), aug_views, embed_dim))
    f.create_dataset("bad/paths", shape=(0,), maxshape=(None,), dtype=_STR)
    f.create_dataset("bad/errors", shape=(0,), maxshape=(None,), dtype=_STR)


def inspect(path: str | os.PathLike) -> dict[str, Any]:
    """What a cache or .partial file holds, without validating it: attrs, classnames, templates, bad image count
    and per split its row counts (`Listing.counts`) and feature dataset shapes/dtype."""
    attrs = _format_attrs(path)
    with h5py.File(path, "r") as f:
        splits = {}
        for name, g in f["splits"].items():
            status = g["status"][()]
            splits[name] = {**Listing(status, status, status).counts(), "dtype": str(g["features"].dtype),
                            **{key: tuple(g[key].shape) for key in ("features", "aug_features") if key in g}}
        return {"attrs": attrs, "classnames": _decode(f["classnames"][()]), "templates": _decode(f["templates"][()]),
                "bad": int(f["bad/paths"].shape[0]), "splits": splits}


def read_status(path: str | os.PathLike) -> dict[str, np.ndarray]:
    """Each split's row status [N] of a cache or .partial file of this schema ({} for anything else)."""
    try:
        if read_attrs(path).get("schema_version") != SCHEMA_VERSION:
            return {}
        with h5py.File(path, "r") as f:
            return {name: g["status"][()] for name, g in f["splits"].items()}
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


def _guard_existing(path: Path, attrs: Mapping[str, Any]) -> None:
    """Refuse to replace a complete cache that was made by another model or preprocessing."""
    if not path.exists():
        return
    old = _identity(read_attrs(path))
    new = _identity(attrs)
    diff = {k: (old[k], new[k]) for k in IDENTITY_ATTRS if old[k] != new[k]}
    if diff:
        key, (was, now) = next(iter(diff.items()))
        raise CacheError(f"{path}: exists with {key}={was!r}, not {now!r}; refusing to mix features of a different "
                         "model or setting into it: choose another --out file or delete it")


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
    with h5py.File(path, "r") as f:
        if (_decode(f["classnames"][()]) != list(classnames) or _decode(f["templates"][()]) != list(templates)
                or set(f["splits"]) != set(splits)):
            return None
        for name, rows in splits.items():
            diff = listing_diff(path, f["splits"][name]["paths"][()], f["splits"][name]["labels"][()],
                                rows["paths"], rows["labels"])
            if diff:
                raise CacheError(f"{diff} ({name} split); extract into a new --out, or delete {path} to "
                                 "extract it anew")
        return {name: f["splits"][name]["status"][()] for name in splits}


def write_cache(path: str | os.PathLike, *, attrs: Mapping[str, Any], classnames: list[str], templates: list[str],
                text_features: np.ndarray, splits: Mapping[str, Mapping[str, Any]],
                bad: Mapping[str, list[str]] | None = None) -> Path:
    """Write a whole cache at once, atomically.

    splits[name] = dict(features [N, D], labels [N], paths [N], optional aug_features [N, A, D]): every row
    encoded; bad = dict(paths=[...], errors=[...]) for images that were skipped.
    """
    text_features = np.asarray(text_features, dtype=np.float32)
    embed_dim = int(text_features.shape[-1])
    aug_views = int(np.shape(splits["train"]["aug_features"])[1]) if (
        "train" in splits and splits["train"].get("aug_features") is not None) else 0
    writer = CacheWriter.open(path, attrs=attrs, classnames=classnames, templates=templates, splits=splits,
                              embed_dim=embed_dim, aug_views=aug_views,
                              feature_dtype=str(attrs.get("feature_dtype", "float32")), fresh=True)
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
    """Incremental, resumable writer: fills `X.h5.partial`, then renames it to `X.h5` when every row is done."""

    def __init__(self, path: Path, f: h5py.File):
        self.path = path
        self._f = f

    @classmethod
    def open(cls, path: str | os.PathLike, *, attrs: Mapping[str, Any], classnames: list[str], templates: list[str],
             splits: Mapping[str, Mapping[str, Any]], embed_dim: int, aug_views: int = 0,
             feature_dtype: str = "float32", fresh: bool = False) -> "CacheWriter":
        """Start a cache, or resume `X.h5.partial` when it was begun with the same identity, names and listing.

        splits[name] = dict(paths [N], labels [N], optional encode [M]: the rows to encode, default all); rows
        not encoded yet among them become PENDING (`request`); attrs["pool"] says which (see README). fresh=True
        always starts over (an old partial file is replaced).
        """
        path = Path(path)
        if feature_dtype not in ("float32", "float16"):
            raise CacheError(f"{path}: feature dtype {feature_dtype!r} not supported; use float32 or float16")
        attrs = {**attrs, "embed_dim": embed_dim, "aug_views": aug_views, "feature_dtype": feature_dtype}
        _guard_existing(path, attrs)
        if not path.parent.is_dir():
            raise CacheError(f"{path.parent}: output folder does not exist; create it first")
        tmp = partial_path(path)
        if tmp.exists() and not fresh:
            f = cls._resumable(tmp, attrs, classnames, templates, splits)
            if f is not None:
                return cls(path, f)._request_all(splits, attrs)
        f = h5py.File(tmp, "w")
        try:
            _create_layout(f, attrs, list(classnames), list(templates), splits, embed_dim, aug_views, feature_dtype)
            f.flush()
        except BaseException:
            f.close()
            tmp.unlink(missing_ok=True)
            raise
        return cls(path, f)._request_all(splits, attrs)

    def _request_all(self, splits: Mapping[str, Mapping[str, Any]], attrs: Mapping[str, Any]) -> "CacheWriter":
        """Request each split's `encode` rows (default all) and record the pool; returns self."""
        for name, rows in splits.items():
            self.request(name, np.arange(len(rows["labels"])) if rows.get("encode") is None else rows["encode"])
        self._f.attrs["pool"] = str(attrs.get("pool", ""))
        self._f.flush()
        return self

    def request(self, split: str, rows: np.ndarray) -> None:
        """Mark listed rows [M] of `split` to be encoded: those not encoded yet become PENDING and get the next
        free slots of the feature datasets (which grow); encoded rows keep their bytes."""
        g = self._f[f"splits/{split}"]
        status = g["status"][()]
        new = np.unique(np.asarray(rows, np.int64))
        new = new[status[new] == ABSENT]
        if not len(new):
            return
        slot = g["slot"][()]
        start = g["features"].shape[0]
        for key in ("features", "aug_features"):
            if key in g:
                g[key].resize(start + len(new), axis=0)
        slot[new] = np.arange(start, start + len(new))
        status[new] = PENDING
        g["slot"][...] = slot
        g["status"][...] = status
    @staticmethod
    def _resumable(tmp: Path, attrs: Mapping[str, Any], classnames: list[str], templates: list[str],
                   splits: Mapping[str, Mapping[str, Any]]) -> h5py.File | None:
        """The open partial file if it matches exactly; None if unreadable; CacheError if made differently."""
        try:
            f = h5py.File(tmp, "r+")
        except OSError:
            return None  # a crash mid-write can leave HDF5 unreadable: start over
        if _attr(f.attrs.get("schema_version")) != SCHEMA_VERSION:
            f.close()
            return None  # begun by an older version of the writer: start over
        try:
            old = _identity({k: _attr(v) for k, v in f.attrs.items()})
            new = _identity(attrs)
            for key in IDENTITY_ATTRS:
                if old[key] != new[key]:
                    raise CacheError(f"{tmp}: an interrupted extraction with {key}={old[key]!r} (not {new[key]!r}) "
                                     "is in the way; rerun it with its settings, or delete the .partial file")
            if _decode(f["classnames"][()]) != list(classnames) or _decode(f["templates"][()]) != list(templates) \
                    or set(f["splits"].keys()) != set(splits):
                raise CacheError(f"{tmp}: an interrupted extraction with other classes, templates or splits is in "
                                 "the way; rerun it with its settings, or delete the .partial file to start over")
            for name, rows in splits.items():
                diff = listing_diff(tmp, f["splits"][name]["paths"][()], f["splits"][name]["labels"][()],
                                    rows["paths"], rows["labels"])
                if diff:
                    raise CacheError(f"{diff} ({name} split); extract into a new --out, or delete the .partial "
                                     "file to start over")
            return f
        except BaseException:
            f.close()
            raise

    def pending(self, split: str) -> np.ndarray:
        """Row ids [M] of `split` requested but not extracted yet."""
        return np.flatnonzero(self._f[f"splits/{split}/status"][()] == PENDING)

    def write_rows(self, split: str, rows: np.ndarray, features: np.ndarray,
                   aug_features: np.ndarray | None = None) -> None:
        """Store features [n, D] (and aug_features [n, A, D]) of requested rows [n], then mark them done."""
        g = self._f[f"splits/{split}"]
        rows = np.asarray(rows, dtype=np.int64)
        if len(rows) == 0:
            return
        slots = g["slot"][()][rows]
        if np.any(slots < 0):
            raise CacheError(f"{self.path}: {split} rows {rows[slots < 0][:3].tolist()} were not requested")
        order = np.argsort(slots)  # h5py fancy indexing needs increasing indices
        rows, slots = rows[order], slots[order]
        where = slice(int(slots[0]), int(slots[-1]) + 1) if slots[-1] - slots[0] + 1 == len(slots) else slots.tolist()
        g["features"][where] = np.asarray(features)[order].astype(g["features"].dtype)
        if aug_features is not None:
            if "aug_features" not in g:
                raise CacheError(f"{self.path}: split {split!r} has no aug_features dataset")
            g["aug_features"][where] = np.asarray(aug_features)[order].astype(g["aug_features"].dtype)
        g["status"][rows] = np.full(len(rows), OK, dtype=np.int8)
        self._f.flush()

    def mark_bad(self, split: str, rows: np.ndarray, errors: list[str]) -> None:
        """Mark rows of unreadable images as skipped and record their paths and errors in /bad."""
        g = self._f[f"splits/{split}"]
        rows = np.asarray(rows, dtype=np.int64)
        order = np.argsort(rows)  # h5py fancy indexing needs increasing indices
        rows, errors = rows[order], [errors[i] for i in order]
        self.record_bad(_decode(g["paths"][rows]), errors)
        g["status"][rows] = np.full(len(rows), BAD, dtype=np.int8)
        self._f.flush()

    def record_bad(self, paths: list[str], errors: list[str]) -> None:
        """Append (path, error) pairs to /bad."""
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
        d[...] = text_features
        self._f.attrs["text_done"] = True
        self._f.flush()

    @property
    def text_done(self) -> bool:
        """Whether the text features were written (a resumed run can skip them)."""
        return bool(self._f.attrs.get("text_done", False))

    def finalize(self) -> Path:
        """Check every row is done, mark the cache complete and move it into place; returns the final path."""
        left = {name: int(np.sum(g["status"][()] == PENDING)) for name, g in self._f["splits"].items()}
        text_done = self.text_done
        if any(left.values()) or not text_done:
            self.close()
            raise CacheError(f"{partial_path(self.path)}: not finished ({left} rows left, text written: "
                             f"{text_done}); rerun the extraction to complete it")
        self._f.attrs["complete"] = True
        self._f.close()
        os.replace(partial_path(self.path), self.path)
        return self.path

    def close(self) -> None:
        """Close the partial file, keeping it for a later resume."""
        if self._f.id.valid:
            self._f.close()

    def discard(self) -> None:
        """Close and delete the partial file."""
        self.close()
        partial_path(self.path).unlink(missing_ok=True)


def reopen_complete(path: str | os.PathLike) -> None:
    """Copy a complete cache to `X.h5.partial` (marked incomplete) so a writer can add rows to it; `X.h5` stays
    as it is until the extended file is finalized over it."""
    path, tmp = Path(path), partial_path(path)
    staging = Path(f"{tmp}.copy")
    shutil.copyfile(path, staging)
    with h5py.File(staging, "r+") as f:
        f.attrs["complete"] = False
    os.replace(staging, tmp)
