"""Split an extraction over N processes (`--shard i/N`) and merge the shard caches.

Every shard cache lists all rows of every split; shard i encodes the contiguous slice [m*i//N, m*(i+1)//N) of the
m rows the extraction encodes (a pooled extraction's train rows, or whole splits). `merge_shards` checks that the
shards were made the same way, list the same images and encode no row twice, then writes one cache with the rows,
listing and attributes of an unsharded extraction (features copied byte for byte from the shards; they equal an
unsharded run's up to the rounding of other batches, README "Cache schema")."""
from __future__ import annotations

import os
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from data.cache import BAD, DEFAULT_ATTRS, IDENTITY_ATTRS, OK, open_cache
from data.cache_writer import CacheWriter
from data.progress import progress as bar_of
from extract.errors import ExtractError

MERGE_CHUNK = 8192  # rows copied at a time


@dataclass(frozen=True)
class Shard:
    """Shard `index` of `count` (0 <= index < count)."""

    index: int
    count: int

    def __str__(self) -> str:
        return f"{self.index}/{self.count}"


def parse_shard(text: str) -> Shard:
    """'i/N' (0-based i), or 'auto' for torchrun's RANK/WORLD_SIZE environment variables."""
    if text == "auto":
        if "RANK" not in os.environ or "WORLD_SIZE" not in os.environ:
            raise ExtractError("--shard auto needs RANK and WORLD_SIZE in the environment (as torchrun sets them); "
                               "pass --shard i/N instead")
        text = f"{os.environ['RANK']}/{os.environ['WORLD_SIZE']}"
    match = re.fullmatch(r"(\d+)/(\d+)", text.strip())
    if not match or not int(match[1]) < int(match[2]):
        raise ExtractError(f"--shard {text!r}: expected i/N with 0 <= i < N, e.g. 0/4, or 'auto'")
    return Shard(int(match[1]), int(match[2]))


def shard_rows(n: int, shard: Shard | None) -> np.ndarray:
    """Positions [M] in a list of n rows to encode that a shard encodes: the contiguous slice [n*i//N, n*(i+1)//N)."""
    if shard is None:
        return np.arange(n)
    return np.arange(n * shard.index // shard.count, n * (shard.index + 1) // shard.count)


def shard_path(out: str | Path, shard: Shard | None) -> Path:
    """Where a shard's cache goes: `x.h5` -> `x.shard-i-of-N.h5` (`out` itself when not sharded)."""
    out = Path(out)
    return out if shard is None else out.with_name(f"{out.stem}.shard-{shard.index}-of-{shard.count}{out.suffix}")


def merge_shards(out: str | Path, shard_paths: list[str | Path], *, progress: bool = True) -> Path:
    """Check that shard caches fit together and write them as one cache at `out`; returns `out`."""
    out, paths = Path(out), [Path(p) for p in shard_paths]
    if not paths:
        raise ExtractError("merge needs the shard files: python -m extract merge OUT SHARD...")
    if out.resolve() in {p.resolve() for p in paths}:
        raise ExtractError(f"{out}: the merged file cannot be one of the shards; choose another output path")
    heads = [_shard_head(p) for p in paths]
    first = heads[0]
    _check_same(heads)
    rows = _encoded_rows(heads)
    attrs = {k: first["attrs"][k] for k in DEFAULT_ATTRS if k not in ("shard", "created") and k in first["attrs"]}
    writer = CacheWriter.open(out, attrs={**attrs, "shard": ""}, classnames=first["classnames"],
                              templates=first["templates"], splits=rows, embed_dim=int(attrs["embed_dim"]),
                              aug_views=int(attrs["aug_views"]), feature_dtype=str(attrs["feature_dtype"]),
                              fresh=True)
    try:
        writer.write_text(first["text"])
        with bar_of(total=sum(len(r["encode"]) for r in rows.values()), unit="row", desc=f"merge {out.name}",
                    disable=not progress) as bar:
            for head in heads:
                _copy_rows(head, writer, bar)
        return writer.finalize()
    except BaseException:
        writer.discard()
        raise


def _shard_head(path: Path) -> dict[str, Any]:
    """Validated attrs, names, text features and per-split listings of one shard file."""
    cache = open_cache(path)  # checks format, version, completeness, shapes
    shard = str(cache.attrs.get("shard", ""))
    if not re.fullmatch(r"\d+/\d+", shard):
        raise ExtractError(f"{path}: not a shard (shard={shard!r}); merge only files made with --shard i/N")
    return {"path": path, "cache": cache, "attrs": cache.attrs, "shard": parse_shard(shard),
            "classnames": cache.classnames, "templates": cache.templates, "text": cache.text_features,
            "splits": {name: cache.listing(name) for name in cache.split_names()}}


def _check_same(heads: list[dict[str, Any]]) -> None:
    """Same identity (but the shard), names and text features; shards 0..N-1 each exactly once."""
    first = heads[0]
    for head in heads[1:]:
        for key in (*IDENTITY_ATTRS, "pool"):
            if key != "shard" and str(head["attrs"].get(key)) != str(first["attrs"].get(key)):
                raise ExtractError(f"{head['path']}: {key}={head['attrs'].get(key)!r} differs from {first['path']} "
                                   f"({first['attrs'].get(key)!r}); merge shards of one extraction only")
        for key in ("classnames", "templates"):
            if head[key] != first[key]:
                raise ExtractError(f"{head['path']}: its {key} differ from {first['path']}'s; "
                                   "merge shards of one extraction only")
        if set(head["splits"]) != set(first["splits"]):
            raise ExtractError(f"{head['path']}: splits {sorted(head['splits'])} differ from {first['path']}'s "
                               f"{sorted(first['splits'])}; merge shards of one extraction only")
        for name, listing in head["splits"].items():
            other = first["splits"][name]
            if not (np.array_equal(listing.paths, other.paths) and np.array_equal(listing.labels, other.labels)):
                raise ExtractError(f"{head['path']}: lists other {name} images than {first['path']}; "
                                   "merge shards of one extraction only")
        if not np.allclose(head["text"], first["text"], atol=1e-3):
            raise ExtractError(f"{head['path']}: its text features differ from {first['path']}'s; "
                               "merge shards of one extraction only")
    count = first["shard"].count
    seen = sorted(h["shard"].index for h in heads)
    if any(h["shard"].count != count for h in heads) or seen != list(range(count)):
        have = ", ".join(str(h["shard"]) for h in heads)
        raise ExtractError(f"shards {have} are not each of 0/{count} .. {count - 1}/{count} exactly once; "
                           "pass every shard file once")


def _encoded_rows(heads: list[dict[str, Any]]) -> dict[str, dict[str, Any]]:
    """Per split, the listing and the rows some shard encoded (or found unreadable); no row may come from two."""
    rows = {}
    for name, listing in heads[0]["splits"].items():
        done = [np.flatnonzero(np.isin(h["splits"][name].status, (OK, BAD))) for h in heads]
        encode = np.concatenate(done)
        if len(np.unique(encode)) != len(encode):
            raise ExtractError(f"split {name!r}: some rows are encoded by two shards; pass every shard of one "
                               "extraction once")
        rows[name] = {"paths": [str(p, "utf-8") for p in listing.paths], "labels": listing.labels,
                      "encode": np.sort(encode)}
    return rows


def _copy_rows(head: dict[str, Any], writer: CacheWriter, bar: Any) -> None:
    """Copy one shard's encoded rows and skipped rows (with their errors) into the merged cache."""
    cache, errors = head["cache"], head["cache"].bad()
    for name, listing in head["splits"].items():
        views = cache.has_views(name)
        ok = np.flatnonzero(listing.status == OK)
        for start in range(0, len(ok), MERGE_CHUNK):
            rows = ok[start : start + MERGE_CHUNK]
            features, aug = cache.read(name, rows, views=views)
            norms = cache.norms(name, rows, views=views)
            writer.write_rows(name, rows, features, aug, norms[:, 0] if views else norms,
                              norms[:, 1:] if views else None)
            bar.update(len(rows))
        bad = np.flatnonzero(listing.status == BAD)
        if len(bad):
            writer.mark_bad(name, bad, [errors.get(str(p, "utf-8"), "") for p in listing.paths[bad]])
            bar.update(len(bad))
