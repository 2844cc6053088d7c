"""The HDF5 feature cache: the contract between `extract` and `train_jax` (schema: README, "Cache schema").

Needs only h5py + numpy: both stages read and write caches through this module, neither through the other.
"""
from __future__ import annotations

import hashlib
import json
import os
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from typing import Any, Iterable, Mapping

import h5py
import numpy as np

from data.registry import ensemble_templates

FORMAT = "cmm-feature-cache"
SCHEMA_VERSION = 1
SPLITS = ("train", "val", "test")
PENDING, OK, BAD = 0, 1, 2
UNLABELLED = -1  # the label of every row of an unlabelled split (images to classify, never to train or score on)
# Attributes that say which model and preprocessing made the features: a cache never mixes two of them.
IDENTITY_ATTRS = ("dataset", "model", "pretrained", "weights_sha256", "model_config", "embed_dim",
                  "feature_dtype", "preprocess", "aug_views", "aug_seed", "aug", "shard", "activation")
DEFAULT_ATTRS: dict[str, Any] = {
    "dataset": "", "model": "", "pretrained": "", "weights_sha256": "", "model_config": "", "embed_dim": 0,
    "feature_dtype": "float32", "preprocess": "{}", "aug_views": 0, "aug_seed": 0, "aug": "{}", "shard": "",
    "versions": "{}", "created": "",
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
class FeatureCache:
    """A validated cache in memory."""

    path: Path
    attrs: dict[str, Any]
    classnames: list[str]
    templates: list[str]
    text_features: np.ndarray  # [C, P, D] float32, L2-normalised
    splits: dict[str, Split]
    bad_paths: list[str] = field(default_factory=list)

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


def read_cache(path: str | os.PathLike, *, splits: Iterable[str] | None = None, with_aug: bool = True) -> FeatureCache:
    """Read and validate a complete cache; rows of unreadable images (status 2) are dropped."""
    path = Path(path)
    attrs = read_attrs(path)
    if attrs.get("format") != FORMAT:
        raise CacheError(f"{path}: not a {FORMAT} file (format={attrs.get('format')!r}); make it with `python -m extract`")
    if attrs.get("schema_version") != SCHEMA_VERSION:
        raise CacheError(f"{path}: cache schema version {attrs.get('schema_version')} but this code reads version "
                         f"{SCHEMA_VERSION}; re-extract it with this version of `python -m extract`")
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
        _check(bool(np.all(np.abs(np.linalg.norm(text, axis=-1) - 1) < _NORM_TOL)), path,
               "/text_features rows are not L2-normalised")
        wanted = list(f["splits"].keys()) if splits is None else list(splits)
        out: dict[str, Split] = {}
        for name in wanted:
            _check(name in f["splits"], path, f"missing split {name!r} (it has {list(f['splits'].keys())})")
            out[name] = _read_split(f["splits"][name], path, name, n_classes, dim, with_aug)
        bad = _decode(f["bad/paths"][()]) if "bad" in f else []
    return FeatureCache(path, attrs, classnames, templates, text, out, bad)


def _read_split(g: h5py.Group, path: Path, name: str, n_classes: int, dim: int, with_aug: bool) -> Split:
    for key in ("features", "labels", "paths", "status"):
        _check(key in g, path, f"missing /splits/{name}/{key}")
    status = g["status"][()]
    _check(bool(np.all(status != PENDING)), path, f"split {name!r} has rows that were never extracted")
    keep = status == OK
    features = np.asarray(g["features"][()][keep], dtype=np.float32)
    labels = np.asarray(g["labels"][()][keep], dtype=np.int64)
    paths = np.asarray(_decode(g["paths"][()][keep]), dtype=object)
    _check(features.ndim == 2 and features.shape[1] == dim, path,
           f"/splits/{name}/features has shape {features.shape}, expected [N, {dim}]")
    _check(labels.shape == (len(features),) and paths.shape == (len(features),), path,
           f"/splits/{name} features, labels and paths differ in length")
    if len(labels):
        _check(bool(labels.min() >= 0 and labels.max() < n_classes) or bool(np.all(labels == UNLABELLED)), path,
               f"/splits/{name}/labels outside [0, {n_classes}) (or not all {UNLABELLED}: unlabelled)")
        _check(bool(np.all(np.abs(np.linalg.norm(features, axis=1) - 1) < _NORM_TOL)), path,
               f"/splits/{name}/features rows are not L2-normalised")
    aug = None
    if with_aug and "aug_features" in g:
        aug = np.asarray(g["aug_features"][()][keep], dtype=np.float32)
        _check(aug.ndim == 3 and aug.shape[0] == len(features) and aug.shape[2] == dim, path,
               f"/splits/{name}/aug_features has shape {aug.shape}, expected [{len(features)}, A, {dim}]")
    return Split(features, labels, paths, aug)


def _root_attrs(attrs: Mapping[str, Any]) -> dict[str, Any]:
    out = {**DEFAULT_ATTRS, **attrs, "format": FORMAT, "schema_version": SCHEMA_VERSION, "complete": False}
    out = {k: json.dumps(v, sort_keys=True) if isinstance(v, (dict, list, tuple)) else v for k, v in out.items()}
    if not out["created"]:
        out["created"] = datetime.now(timezone.utc).isoformat(timespec="seconds")
    return out


def _create_layout(f: h5py.File, attrs: Mapping[str, Any], classnames: list[str], templates: list[str],
                   splits: Mapping[str, Mapping[str, Any]], embed_dim: int, aug_views: int, dtype: str) -> None:
    """Write attributes, names and per-split row metadata; allocate feature datasets (status all PENDING)."""
    for key, value in _root_attrs({**attrs, "embed_dim": embed_dim, "aug_views": aug_views,
                                   "feature_dtype": dtype}).items():
        f.attrs[key] = value
    f.create_dataset("classnames", data=np.asarray(classnames, dtype=object), dtype=_STR)
    f.create_dataset("templates", data=np.asarray(templates, dtype=object), dtype=_STR)
    f.create_dataset("text_features", shape=(len(classnames), len(templates), embed_dim), dtype="float32")
    for name, rows in splits.items():
        n = len(rows["labels"])
        g = f.create_group(f"splits/{name}")
        g.attrs["total_rows"] = int(rows.get("total_rows", n))
        g.create_dataset("labels", data=np.asarray(rows["labels"], dtype=np.int64))
        g.create_dataset("paths", data=np.asarray([str(p) for p in rows["paths"]], dtype=object), dtype=_STR)
        g.create_dataset("index", data=np.asarray(rows.get("index", np.arange(n)), dtype=np.int64))
        g.create_dataset("status", data=np.zeros(n, dtype=np.int8))
        g.create_dataset("features", shape=(n, embed_dim), dtype=dtype, chunks=(min(max(n, 1), 1024), embed_dim))
        if aug_views and name == "train":
            g.create_dataset("aug_features", shape=(n, aug_views, embed_dim), dtype=dtype,
                             chunks=(min(max(n, 1), 256), aug_views, embed_dim))
    f.create_dataset("bad/paths", shape=(0,), maxshape=(None,), dtype=_STR)
    f.create_dataset("bad/errors", shape=(0,), maxshape=(None,), dtype=_STR)


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


def write_cache(path: str | os.PathLike, *, attrs: Mapping[str, Any], classnames: list[str], templates: list[str],
                text_features: np.ndarray, splits: Mapping[str, Mapping[str, Any]],
                bad: Mapping[str, list[str]] | None = None) -> Path:
    """Write a whole cache at once, atomically.

    splits[name] = dict(features [N, D], labels [N], paths [N], optional aug_features [N, A, D], index [N],
    total_rows); bad = dict(paths=[...], errors=[...]) for images that were skipped.
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
        """Start a cache, or resume `X.h5.partial` when it was begun with the same identity, names and rows.

        fresh=True always starts over (an old partial file is replaced).
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
                return cls(path, f)
        f = h5py.File(tmp, "w")
        try:
            _create_layout(f, attrs, list(classnames), list(templates), splits, embed_dim, aug_views, feature_dtype)
            f.flush()
        except BaseException:
            f.close()
            tmp.unlink(missing_ok=True)
            raise
        return cls(path, f)

    @staticmethod
    def _resumable(tmp: Path, attrs: Mapping[str, Any], classnames: list[str], templates: list[str],
                   splits: Mapping[str, Mapping[str, Any]]) -> h5py.File | None:
        """The open partial file if it matches exactly; None if unreadable; CacheError if made differently."""
        try:
            f = h5py.File(tmp, "r+")
        except OSError:
            return None  # a crash mid-write can leave HDF5 unreadable: start over
        try:
            old = _identity({k: _attr(v) for k, v in f.attrs.items()})
            new = _identity(attrs)
            for key in IDENTITY_ATTRS:
                if old[key] != new[key]:
                    raise CacheError(f"{tmp}: an interrupted extraction with {key}={old[key]!r} (not {new[key]!r}) "
                                     "is in the way; rerun it with its settings, or delete the .partial file")
            same = (_decode(f["classnames"][()]) == list(classnames) and _decode(f["templates"][()]) == list(templates)
                    and set(f["splits"].keys()) == set(splits))
            for name, rows in splits.items():
                same = same and (name in f["splits"]
                                 and _decode(f["splits"][name]["paths"][()]) == [str(p) for p in rows["paths"]]
                                 and np.array_equal(f["splits"][name]["labels"][()], np.asarray(rows["labels"])))
            if not same:
                raise CacheError(f"{tmp}: an interrupted extraction of a different image list is in the way; "
                                 "delete the .partial file to start over")
            return f
        except BaseException:
            f.close()
            raise

    def pending(self, split: str) -> np.ndarray:
        """Local row ids [M] of `split` that are not extracted yet."""
        return np.flatnonzero(self._f[f"splits/{split}/status"][()] == PENDING)

    def write_rows(self, split: str, rows: np.ndarray, features: np.ndarray,
                   aug_features: np.ndarray | None = None) -> None:
        """Store features [n, D] (and aug_features [n, A, D]) of local rows [n], then mark them done."""
        g = self._f[f"splits/{split}"]
        rows = np.asarray(rows, dtype=np.int64)
        if len(rows) == 0:
            return
        order = np.argsort(rows)  # h5py fancy indexing needs increasing indices
        rows = rows[order]
        g["features"][rows] = np.asarray(features)[order].astype(g["features"].dtype)
        if aug_features is not None:
            if "aug_features" not in g:
                raise CacheError(f"{self.path}: split {split!r} has no aug_features dataset")
            g["aug_features"][rows] = np.asarray(aug_features)[order].astype(g["aug_features"].dtype)
        g["status"][rows] = np.full(len(rows), OK, dtype=np.int8)
        self._f.flush()

    def mark_bad(self, split: str, rows: np.ndarray, errors: list[str]) -> None:
        """Mark local rows of unreadable images as skipped and record their paths and errors in /bad."""
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
