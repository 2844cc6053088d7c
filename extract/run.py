"""Extract a dataset's image and text features into a cache, resumably (see README.md, "Cache schema").

Every image is listed; the rows encoded are the val and test splits whole and, for train, the whole split or only
the rows the few-shot draws of some seeds at up to K shots can use (a pool, `data.fewshot.pool_rows`). Rows are
written batch by batch into `X.h5.partial`; an interrupted run resumes from the rows still pending, and only a
finished cache is renamed to `X.h5`. Rerunning with more seeds or shots encodes only the missing rows (the
encoded ones are copied byte for byte). Nothing is written before every input has been checked.
"""
from __future__ import annotations

import json
import platform
from collections.abc import Callable
from importlib.metadata import version
from pathlib import Path
from typing import Any

import numpy as np
import torch

from extract.augment import AugmentedViews
from data import fewshot
from data.cache import (ABSENT, BAD, OK, SCHEMA_VERSION, CacheBusy, CacheError, file_identity, identity,
                        partial_path, read_attrs, read_status)
from data.cache_writer import CacheWriter, check_writable, complete_status, reopen_complete
from data.progress import progress as bar_of
from extract.datasets import DatasetSpec
from extract.encode import encode_images, encode_texts, make_loader
from extract.errors import ExtractError
from extract.images import ImageRows
from extract.models import LoadedModel
from extract.shards import Shard, shard_path, shard_rows

FEATURE_DTYPES = ("float32", "float16")
OnBatch = Callable[[str, np.ndarray], None]  # (split, local rows just written)


def package_versions() -> str:
    """JSON of the versions of the packages that shape the features."""
    names = ("torch", "torchvision", "open_clip_torch", "numpy", "pillow", "h5py")
    return json.dumps({"python": platform.python_version(), **{n: version(n) for n in names}}, sort_keys=True)


def run_extraction(spec: DatasetSpec, loaded: LoadedModel, out: str | Path, *, templates: list[str],
                   splits: list[str] | None = None, pool: dict | None = None, aug_views: int = 0,
                   aug_seed: int = 0, batch_size: int = 64, workers: int = 0, feature_dtype: str = "float32",
                   skip_bad: bool = False, shard: Shard | None = None, device: str = "cpu", progress: bool = True,
                   command: list[str] | None = None, overwrite: bool = False, on_batch: OnBatch | None = None
                   ) -> Path:
    """Extract `splits` (default: all of the dataset's) of `spec` with `loaded` into `out` (or its shard file).

    templates: the cache's prompt templates (`prompts.cache_templates`). pool: dict(seeds=[...], shots=K) to encode
    only the train rows those draws can use (None: the whole split). aug_views: augmented views per encoded train
    image. command: the argv that ran this (stored, so a train run can say how to add rows). overwrite: replace a
    complete cache of another identity at `out` (else refused with an error). on_batch: called after each stored
    batch (tests use it to simulate an interruption). Returns the cache path.
    """
    if aug_views < 0 or batch_size < 1 or workers < 0:
        raise ExtractError(f"--aug-views {aug_views}, --batch-size {batch_size}, --workers {workers}: "
                           "use aug-views >= 0, batch-size >= 1, workers >= 0")
    names, augment, attrs, target, rows = _prepare(spec, loaded, out, splits=splits, pool=pool, aug_views=aug_views,
                                                   aug_seed=aug_seed, feature_dtype=feature_dtype, shard=shard,
                                                   command=command)
    if not overwrite:
        _usable_out(target)
    conflict = views_conflict(target, names, aug_views, overwrite)
    if conflict:
        raise ExtractError(conflict)
    status = None if overwrite else complete_status(target, attrs, list(spec.classnames), templates, rows)
    if status is not None:
        if not any(np.any(status[n][r["encode"]] == ABSENT) for n, r in rows.items()):
            print(f"{target}: already complete with this model and these settings; delete it to extract again")
            return target
        if not partial_path(target).exists():
            reopen_complete(target)  # add the missing rows to a copy; the encoded ones keep their bytes
    writer = CacheWriter.open(target, attrs=attrs, classnames=list(spec.classnames), templates=templates,
                              splits=rows, embed_dim=int(loaded.attrs["embed_dim"]), aug_views=attrs["aug_views"],
                              feature_dtype=feature_dtype, overwrite=overwrite)
    dev = torch.device(device)
    try:
        if not writer.text_done:
            writer.write_text(encode_texts(loaded.model, loaded.tokenizer, list(spec.classnames), templates, dev))
        pending = {name: writer.pending(name) for name in names}
        with bar_of(total=sum(len(p) for p in pending.values()), unit="img", desc=target.name,
                    disable=not progress, smoothing=0.1) as bar:
            for name in names:
                _extract_split(spec, loaded, writer, name, rows[name], pending[name],
                               augment if name == "train" else None, batch_size, workers, dev, skip_bad, bar,
                               on_batch)
        return writer.finalize()
    finally:
        writer.close()  # after finalize a no-op; otherwise the .partial stays for a resume


def _prepare(spec: DatasetSpec, loaded: LoadedModel, out: str | Path, *, splits: list[str] | None, pool: dict | None,
             aug_views: int, aug_seed: int, feature_dtype: str, shard: Shard | None, command: list[str] | None
             ) -> tuple[list[str], AugmentedViews | None, dict, Path, dict[str, dict]]:
    """What an extraction writes: (split names, the views' augmentation, the cache attributes, the target file,
    `plan_rows`' rows)."""
    if feature_dtype not in FEATURE_DTYPES:
        raise ExtractError(f"feature dtype {feature_dtype!r} not supported; use one of {', '.join(FEATURE_DTYPES)}")
    names = _split_names(spec, splits)
    augment = AugmentedViews(loaded.preprocess_cfg, aug_views, aug_seed) if aug_views and "train" in names else None
    attrs = {**loaded.attrs, "dataset": spec.name, "feature_dtype": feature_dtype,
             "aug_views": augment.views if augment else 0, "aug_seed": aug_seed if augment else 0,
             "aug": augment.describe() if augment else "{}", "shard": str(shard) if shard else "",
             "versions": package_versions(), "command": json.dumps(list(command or []))}
    target, rows, pool = plan_rows(spec, names, pool, shard, out)
    attrs["pool"] = json.dumps(pool) if pool else ""
    return names, augment, attrs, target, rows


def check_target(spec: DatasetSpec, loaded: LoadedModel, out: str | Path, *, templates: list[str],
                 splits: list[str] | None = None, pool: dict | None = None, aug_views: int = 0, aug_seed: int = 0,
                 feature_dtype: str = "float32", shard: Shard | None = None, overwrite: bool = False) -> None:
    """Raise what `run_extraction` would refuse about the file it writes (an unusable or other-identity `out`, an
    interrupted extraction of other settings in its .partial), reading only: what `--dry-run` checks."""
    names, _, attrs, target, rows = _prepare(spec, loaded, out, splits=splits, pool=pool, aug_views=aug_views,
                                             aug_seed=aug_seed, feature_dtype=feature_dtype, shard=shard, command=None)
    if not overwrite:
        _usable_out(target)
    conflict = views_conflict(target, names, aug_views, overwrite)
    if conflict:
        raise ExtractError(conflict)
    if not overwrite:
        complete_status(target, attrs, list(spec.classnames), templates, rows)
    check_writable(target, identity(attrs, list(spec.classnames), templates, rows), overwrite=overwrite)


def _usable_out(target: Path) -> None:
    """ExtractError naming --overwrite when `target` exists but cannot be read as a cache (truncated, not HDF5, no
    cache layout): extracting again into it would meet the same file."""
    if not target.is_file():
        return
    try:
        file_identity(target)
    except CacheBusy:
        raise
    except CacheError as e:
        why = str(e).removeprefix(f"{target}: ").split("; ")[0]
        raise ExtractError(f"{target}: exists and is not a usable cache ({why}); pass --overwrite to replace it, "
                           "or choose another --out") from None


def plan_rows(spec: DatasetSpec, names: list[str], pool: dict | None, shard: Shard | None, out: str | Path
              ) -> tuple[Path, dict[str, dict], dict | None]:
    """The file to write, each split's listing and rows to encode, and the pool (joined with the one the file
    already holds: a cache only grows). Returns (target, {split: dict(paths, labels, encode [M])}, pool or None)."""
    target = shard_path(out, shard)
    pool = _joined_pool(pool, target)
    rows = {}
    for name in names:
        paths = [p for p, _ in spec.splits[name]]
        labels = np.array([y for _, y in spec.splits[name]], dtype=np.int64)
        if name == "train" and pool:
            encode = fewshot.pool_rows(labels, np.array(paths, dtype=object), spec.classnames, pool["seeds"],
                                       pool["shots"], val_from_train="val" not in names)
        else:
            encode = np.arange(len(paths))
        rows[name] = {"paths": paths, "labels": labels, "encode": encode[shard_rows(len(encode), shard)]}
    return target, rows, pool


def plan(spec: DatasetSpec, out: str | Path, *, splits: list[str] | None = None, pool: dict | None = None,
         aug_views: int = 0, shard: Shard | None = None, overwrite: bool = False) -> dict:
    """What ``run_extraction`` with these arguments would do, as data (nothing is loaded or written).

    Returns: {"target": path, "pool": {"seeds", "shots"} or None (the whole train split), "splits": {name:
    {"listed", "to_encode", "in_file", "forwards"}}, "to_encode": total, "views": {"asked": augmented views per
    train image, "in_file": those the cache at ``target`` holds (None: no cache there)}, "refused": the one-line
    reason the run would stop (``views_conflict``) or None}. Counts are of images; in_file: encoded rows held with
    the asked views (rows held with other views count as to_encode); forwards: image forwards, views included."""
    names = _split_names(spec, splits)
    target, rows, pool = plan_rows(spec, names, pool, shard, out)
    asked = aug_views if "train" in names else 0
    have: dict[str, np.ndarray] = {}
    for path, usable in ((partial_path(target), True), (target, not overwrite)):
        if usable and _views_held(path) == asked:
            have = read_status(path)
            break
    per_split = {}
    for name, r in rows.items():
        encode = r["encode"]
        if name in have and len(have[name]) == len(r["labels"]):
            encode = encode[~np.isin(have[name][encode], (OK, BAD))]  # not encoded (or found unreadable) yet
        views = aug_views if name == "train" else 0
        per_split[name] = {"listed": len(r["labels"]), "to_encode": len(encode),
                           "in_file": len(r["encode"]) - len(encode), "forwards": len(encode) * (1 + views)}
    return {"target": str(target), "pool": pool, "splits": per_split,
            "to_encode": sum(s["to_encode"] for s in per_split.values()),
            "views": {"asked": asked, "in_file": _views_held(target)},
            "refused": views_conflict(target, names, aug_views, overwrite)}


def views_conflict(target: Path, names: list[str], aug_views: int, overwrite: bool) -> str | None:
    """Why a run asking ``aug_views`` augmented views per train image (splits ``names``) cannot write ``target``,
    in one line, or None. A cache holds a fixed number of views per encoded row, so views cannot be added to
    rows already encoded: a complete cache with another number is replaced only with ``overwrite``, and an
    interrupted one (``X.h5.partial``) must be resumed with its own number or deleted."""
    asked = aug_views if "train" in names else 0
    partial = partial_path(target)
    held = _views_held(partial)
    if held is not None and held != asked:
        return (f"{partial}: an interrupted extraction with {held} augmented views per train image is in the way "
                f"(--aug-views {asked} asked); rerun it with --aug-views {held}, or delete the .partial file")
    held = _views_held(target)
    if held is not None and held != asked and not overwrite:
        return (f"{target}: holds {held} augmented views per train image, not {asked} (views cannot be added to "
                f"encoded rows); pass --aug-views {held} to use it, or --overwrite to encode it anew")
    return None


def _views_held(path: Path) -> int | None:
    """The augmented views per train image of the cache or .partial file at ``path`` (None: no file of this
    schema there)."""
    try:
        attrs = read_attrs(path) if path.is_file() else {}
    except CacheError:
        attrs = {}
    return int(attrs.get("aug_views") or 0) if attrs.get("schema_version") == SCHEMA_VERSION else None


def describe_plan(spec: DatasetSpec, out: str | Path, *, splits: list[str] | None = None, pool: dict | None = None,
                  aug_views: int = 0, shard: Shard | None = None, overwrite: bool = False) -> str:
    """Per split: images listed, images this run would encode (those `out` does not hold yet) and forwards
    (``plan_text`` of ``plan``)."""
    return plan_text(plan(spec, out, splits=splits, pool=pool, aug_views=aug_views, shard=shard,
                          overwrite=overwrite))


def plan_text(planned: dict) -> str:
    """``plan``'s result in words: per split, images listed, to encode, already in the file, and forwards; then
    why the run would stop, if it would."""
    pool = planned["pool"]
    what = f"seeds {' '.join(map(str, pool['seeds']))} at <= {pool['shots']} shots" if pool else "the whole split"
    lines = [f"{planned['target']}: train rows encoded: {what}"]
    for name, n in planned["splits"].items():
        lines.append(f"  {name}: {n['listed']} listed, {n['to_encode']} to encode ({n['in_file']} already in the "
                     f"file), {n['forwards']} image forwards")
    if planned.get("refused"):
        lines.append(f"  the run would stop: {planned['refused']}")
    return "\n".join(lines)


def _joined_pool(pool: dict | None, target: Path) -> dict | None:
    """`pool` joined with the pool of `target` (or of its .partial) when that is a cache of this schema: seeds
    united, shots the larger; None (the whole train split) when either is whole."""
    for path in (partial_path(target), target):
        try:
            attrs = read_attrs(path) if path.is_file() else {}
        except CacheError:  # an unreadable partial is started over by the writer
            attrs = {}
        if attrs.get("schema_version") == SCHEMA_VERSION:
            if not pool or not attrs.get("pool"):
                return None
            old = json.loads(attrs["pool"])
            return {"seeds": sorted(set(old["seeds"]) | set(pool["seeds"])), "shots": max(old["shots"], pool["shots"])}
    return pool


def _split_names(spec: DatasetSpec, splits: list[str] | None) -> list[str]:
    """The requested splits that exist and have rows."""
    names = list(spec.splits) if splits is None else list(splits)
    unknown = [n for n in names if n not in spec.splits]
    if unknown:
        raise ExtractError(f"split {unknown[0]!r} is not in dataset {spec.name!r} (it has "
                           f"{', '.join(spec.splits) or 'none'}); fix --splits")
    names = [n for n in names if spec.splits[n]]
    if not names:
        raise ExtractError(f"dataset {spec.name!r} has no image in the requested splits; "
                           "check the folder or split file")
    return names


def _extract_split(spec: DatasetSpec, loaded: LoadedModel, writer: CacheWriter, name: str, rows: dict,
                   pending: np.ndarray, augment: AugmentedViews | None, batch_size: int, workers: int,
                   device: torch.device, skip_bad: bool, bar: Any, on_batch: OnBatch | None) -> None:
    """Encode the pending rows of one split batch by batch, storing each batch as it completes."""
    if not len(pending):
        return
    dataset = ImageRows(spec.image_root, rows["paths"], pending.tolist(), loaded.preprocess, augment,
                        loaded.image_size)
    bar.set_postfix_str(name)
    for batch in make_loader(dataset, batch_size, workers, device):
        local = batch["row"].numpy()
        bad = np.array([bool(e) for e in batch["error"]])
        if bad.any() and not skip_bad:
            i = int(np.flatnonzero(bad)[0])
            raise ExtractError(f"{spec.image_root / rows['paths'][local[i]]}: cannot read image "
                               f"({batch['error'][i]}); fix or remove it, or pass --skip-bad to skip and record it")
        ok = ~bad
        if ok.any():  # mask only when needed: a masked copy costs a batch-sized memcpy and loses the pinned memory
            images, views = (batch["image"], batch["aug"]) if ok.all() else (batch["image"][ok], batch["aug"][ok])
            enc = encode_images(loaded.model, images, views, device)
            writer.write_rows(name, local[ok], enc.features, enc.aug, enc.norms, enc.aug_norms)
        if bad.any():
            writer.mark_bad(name, local[bad], [e for e in batch["error"] if e])
        bar.update(len(local))
        if on_batch is not None:
            on_batch(name, local)
