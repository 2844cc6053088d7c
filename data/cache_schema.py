"""The feature cache's schema, declared once as data: what the HDF5 file holds (``SCHEMA``: every dataset's
path, dtype, per-row shape, growth, checksum and first schema version), its attributes, row status codes and
identity. The writer (``data.cache_writer``) creates its layout from ``SCHEMA`` and the reader (``data.cache``)
checks files against it.

numpy + h5py only.
"""
from __future__ import annotations

import hashlib
import itertools
import json
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterable, Iterator, Mapping

import numpy as np

FORMAT = "cmm-feature-cache"
SCHEMA_VERSION = 3  # 3: norms, aug_norms (each encoded feature's norm before L2-normalisation)
SPLITS = ("train", "val", "test")
# Row status: PENDING = to encode, OK = encoded, BAD = unreadable image (skipped), ABSENT = listed, not encoded
# (outside a pooled extraction's rows).
PENDING, OK, BAD, ABSENT = 0, 1, 2, 3
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
LOCK_WAIT_S = 15.0  # a second writer waits this long for the lock (workers of a killed run exit within ~5 s)


class CacheError(Exception):
    """A cache file that cannot be read or written as asked; the message names the file and the fix."""


class CacheBusy(CacheError):
    """A cache file another process holds open for writing (HDF5's file lock)."""


@dataclass(frozen=True)
class Stored:
    """One HDF5 dataset of the schema.

    path: its path in the file, ``{split}`` standing for each split's name; dtype: "str" (utf-8), a numpy dtype
    name, or "features" (the cache's ``feature_dtype``, float32 or float16); rows: what its first axis counts
    (C classes, P templates, N listed rows of the split, M encoded rows, B skipped images); row: the shape of one
    row in the same symbols (D = embed_dim, A = aug_views); growable: its first axis grows as rows are added;
    checksummed: chunked with a Fletcher-32 checksum per chunk (HDF5 cannot filter strings); since: the schema
    version that introduced it in this form; chunk_rows: rows per chunk; views_only: present only in the train
    split of a cache with augmented views; required: a reader refuses a file without it.
    """

    path: str
    dtype: str
    rows: str
    row: tuple[str, ...]
    growable: bool
    checksummed: bool
    since: int
    chunk_rows: int = 65536
    views_only: bool = False
    required: bool = True

    @property
    def per_split(self) -> bool:
        """Whether each split has its own copy (``path`` contains ``{split}``)."""
        return "{split}" in self.path

    @property
    def name(self) -> str:
        """The last part of ``path``, e.g. "features"."""
        return self.path.rsplit("/", 1)[-1]

    def at(self, split: str = "") -> str:
        """``path`` of split ``split``."""
        return self.path.format(split=split)

    def shape(self, dims: Mapping[str, int]) -> tuple[int, ...]:
        """The full shape, each symbol of ``rows`` and ``row`` looked up in ``dims``."""
        return tuple(int(dims[s]) for s in (self.rows, *self.row))

    def fits(self, shape: tuple[int, ...], dims: Mapping[str, int]) -> bool:
        """Whether ``shape`` has this dataset's axes, each row axis equal to its symbol's size in ``dims`` (symbols
        missing from ``dims`` match any size)."""
        return len(shape) == 1 + len(self.row) and all(s not in dims or n == dims[s] for s, n in zip(self.row, shape[1:]))

    def row_text(self, dims: Mapping[str, int]) -> str:
        """One row's shape in words, e.g. "[A, 512]" (symbols missing from ``dims`` stay symbols)."""
        return "[" + ", ".join(str(dims.get(s, s)) for s in self.row) + "]"

    def applies(self, split: str, aug_views: int) -> bool:
        """Whether split ``split`` of a cache with ``aug_views`` views holds this dataset."""
        return not self.views_only or (split == "train" and aug_views > 0)


# Every dataset of a schema-version-SCHEMA_VERSION file, in the order the writer creates them.
SCHEMA: tuple[Stored, ...] = (
    Stored("classnames", "str", "C", (), growable=False, checksummed=False, since=1),
    Stored("templates", "str", "P", (), growable=False, checksummed=False, since=1),
    Stored("text_features", "float32", "C", ("P", "D"), growable=False, checksummed=True, since=1),
    Stored("splits/{split}/labels", "int64", "N", (), growable=False, checksummed=True, since=1),
    Stored("splits/{split}/paths", "str", "N", (), growable=False, checksummed=False, since=1),
    Stored("splits/{split}/status", "int8", "N", (), growable=False, checksummed=True, since=2),
    Stored("splits/{split}/slot", "int64", "N", (), growable=False, checksummed=True, since=2),
    Stored("splits/{split}/features", "features", "M", ("D",), growable=True, checksummed=True, since=2,
           chunk_rows=1024),
    Stored("splits/{split}/aug_features", "features", "M", ("A", "D"), growable=True, checksummed=True, since=2,
           chunk_rows=256, views_only=True, required=False),
    Stored("splits/{split}/norms", "float32", "M", (), growable=True, checksummed=True, since=3, chunk_rows=1024),
    Stored("splits/{split}/aug_norms", "float32", "M", ("A",), growable=True, checksummed=True, since=3,
           chunk_rows=256, views_only=True, required=False),
    Stored("bad/paths", "str", "B", (), growable=True, checksummed=False, since=1, required=False),
    Stored("bad/errors", "str", "B", (), growable=True, checksummed=False, since=1, required=False),
)
STORED = {s.path: s for s in SCHEMA}


def schema_groups() -> Iterator[tuple[bool, tuple[Stored, ...]]]:
    """``SCHEMA`` in runs of consecutive entries: (per_split, entries); a per-split run is written for each split."""
    for per_split, group in itertools.groupby(SCHEMA, key=lambda s: s.per_split):
        yield per_split, tuple(group)


def required(per_split: bool) -> tuple[Stored, ...]:
    """The datasets a reader refuses a file without: the root ones (per_split=False) or each split's."""
    return tuple(s for s in SCHEMA if s.required and s.per_split == per_split)


def stored(name: str) -> Stored:
    """The per-split entry named ``name`` (e.g. "features"), else the root entry of that path."""
    return STORED.get(f"splits/{{split}}/{name}") or STORED[name]


def decode_strings(values: Iterable[Any]) -> list[str]:
    """Strings of HDF5 values (utf-8 bytes decoded)."""
    return [v.decode("utf-8") if isinstance(v, bytes) else str(v) for v in values]


def attr_value(value: Any) -> Any:
    """An HDF5 attribute as a plain Python value (bytes decoded, numpy scalars unwrapped)."""
    return value.decode("utf-8") if isinstance(value, bytes) else value.item() if isinstance(value, np.generic) else value


def identity_attrs(attrs: Mapping[str, Any]) -> dict[str, Any]:
    """The IDENTITY_ATTRS of `attrs` (defaults filled in, JSON for containers)."""
    full = {**DEFAULT_ATTRS, **attrs}
    return {k: json.dumps(v, sort_keys=True) if isinstance(v, (dict, list, tuple)) else attr_value(v)
            for k, v in ((k, full[k]) for k in IDENTITY_ATTRS)}


def cache_identity(attrs: Mapping[str, Any], classnames: Iterable[str], templates: Iterable[str]) -> dict[str, Any]:
    """What makes two caches' features and prototypes interchangeable: the model, its weights, the preprocessing
    and the class and template lists (as sha256 of their JSON); not the dataset or its images."""
    full = identity_attrs(attrs)
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
    return {**identity_attrs(attrs), **cache_identity(attrs, classnames, templates), "listing_sha256": listing.hexdigest()}


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
