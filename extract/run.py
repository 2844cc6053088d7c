"""Extract a dataset's image and text features into a cache, resumably (see README.md, "Cache schema").

Rows are written batch by batch into `X.h5.partial`; an interrupted run resumes from the rows still pending, and
only a finished cache is renamed to `X.h5`. Nothing is written before every input has been checked.
"""
from __future__ import annotations

import json
import platform
from collections.abc import Callable
from importlib.metadata import version
from pathlib import Path

import numpy as np
import torch
from tqdm import tqdm

from extract.augment import AugmentedViews
from data.cache import CacheWriter, file_identity, identity, read_attrs
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
                   splits: list[str] | None = None, aug_views: int = 0, aug_seed: int = 0, batch_size: int = 64,
                   workers: int = 0, feature_dtype: str = "float32", skip_bad: bool = False,
                   shard: Shard | None = None, device: str = "cpu", progress: bool = True,
                   overwrite: bool = False, on_batch: OnBatch | None = None) -> Path:
    """Extract `splits` (default: all of the dataset's) of `spec` with `loaded` into `out` (or its shard file).

    templates: the cache's prompt templates (`prompts.cache_templates`). aug_views: augmented views per train image.
    overwrite: replace a complete cache of another identity at `out` (else refused with an error).
    on_batch: called after each stored batch (tests use it to simulate an interruption). Returns the cache path.
    """
    names = _split_names(spec, splits)
    if feature_dtype not in FEATURE_DTYPES:
        raise ExtractError(f"feature dtype {feature_dtype!r} not supported; use one of {', '.join(FEATURE_DTYPES)}")
    if aug_views < 0 or batch_size < 1 or workers < 0:
        raise ExtractError(f"--aug-views {aug_views}, --batch-size {batch_size}, --workers {workers}: "
                           "use aug-views >= 0, batch-size >= 1, workers >= 0")
    augment = AugmentedViews(loaded.preprocess_cfg, aug_views, aug_seed) if aug_views and "train" in names else None
    attrs = {**loaded.attrs, "dataset": spec.name, "feature_dtype": feature_dtype,
             "aug_views": augment.views if augment else 0, "aug_seed": aug_seed if augment else 0,
             "aug": augment.describe() if augment else "{}", "shard": str(shard) if shard else "",
             "versions": package_versions()}
    rows = {}
    for name in names:
        index = shard_rows(len(spec.splits[name]), shard)
        rows[name] = {"paths": [spec.splits[name][i][0] for i in index],
                      "labels": np.array([spec.splits[name][i][1] for i in index], dtype=np.int64),
                      "index": index, "total_rows": len(spec.splits[name])}
    target = shard_path(out, shard)
    if _already_done(target, attrs, list(spec.classnames), templates, rows):
        print(f"{target}: already complete with this model and these settings; delete it to extract again")
        return target
    writer = CacheWriter.open(target, attrs=attrs, classnames=list(spec.classnames), templates=templates,
                              splits=rows, embed_dim=int(loaded.attrs["embed_dim"]), aug_views=attrs["aug_views"],
                              feature_dtype=feature_dtype, overwrite=overwrite)
    dev = torch.device(device)
    try:
        if not writer.text_done:
            writer.write_text(encode_texts(loaded.model, loaded.tokenizer, list(spec.classnames), templates, dev))
        pending = {name: writer.pending(name) for name in names}
        with tqdm(total=sum(len(p) for p in pending.values()), unit="img", desc=target.name,
                  disable=not progress, smoothing=0.1) as bar:
            for name in names:
                _extract_split(spec, loaded, writer, name, rows[name], pending[name],
                               augment if name == "train" else None, batch_size, workers, dev, skip_bad, bar,
                               on_batch)
        return writer.finalize()
    finally:
        writer.close()  # after finalize a no-op; otherwise the .partial stays for a resume


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
                   device: torch.device, skip_bad: bool, bar: tqdm, on_batch: OnBatch | None) -> None:
    """Encode the pending rows of one split batch by batch, storing each batch as it completes."""
    if not len(pending):
        return
    dataset = ImageRows(spec.image_root, rows["paths"], pending.tolist(), rows["index"].tolist(),
                        loaded.preprocess, augment, loaded.image_size)
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
            features, aug = encode_images(loaded.model, images, views, device)
            writer.write_rows(name, local[ok], features, aug)
        if bad.any():
            writer.mark_bad(name, local[bad], [e for e in batch["error"] if e])
        bar.update(len(local))
        if on_batch is not None:
            on_batch(name, local)


def _already_done(path: Path, attrs: dict, classnames: list[str], templates: list[str], rows: dict) -> bool:
    """Whether `path` is a complete cache of exactly this extraction (same `identity`)."""
    if not path.is_file() or not read_attrs(path).get("complete"):
        return False
    return file_identity(path) == identity(attrs, classnames, templates, rows)
