"""Feature norms in the cache (schema 3): each encoded row's and view's norm before L2-normalisation is written by
extraction (equal to the model's raw output), carried by shard merges, read back by row, and a cache of the
previous schema is refused with the one-line re-extract message."""

from pathlib import Path

import h5py
import numpy as np
import pytest
import torch
from PIL import Image

from data.cache import CacheError, open_cache, read_cache
from data.cache_writer import CacheWriter, write_cache
from extract import datasets
from extract.run import run_extraction
from extract.shards import Shard, merge_shards
from helpers_extract import make_class_folder, templates, tiny_model

FEATS = np.eye(4, 3, dtype=np.float32)[[0, 1, 2, 0]]  # unit rows


def _content(norms=None, aug_norms=None):
    train = {"features": FEATS, "labels": np.array([0, 1, 1, 0]), "paths": [f"t{i}.png" for i in range(4)],
             "aug_features": np.stack([FEATS, FEATS[::-1]], axis=1)}
    if norms is not None:
        train |= {"norms": norms, "aug_norms": aug_norms}
    test = {"features": FEATS[:2], "labels": np.array([0, 1]), "paths": ["a.png", "b.png"]}
    return dict(attrs={"dataset": "Norms", "model": "synthetic"}, classnames=["x", "y"], templates=["{}."],
                text_features=np.eye(2, 3, dtype=np.float32)[:, None], splits={"train": train, "test": test})


def test_norms_round_trip_by_row_and_default_to_one(tmp_path):
    norms, aug = np.array([2.0, 3.0, 5.0, 7.0], np.float32), np.arange(8, dtype=np.float32).reshape(4, 2) + 1
    cache = read_cache(write_cache(tmp_path / "c.h5", **_content(norms, aug)))
    np.testing.assert_array_equal(cache.splits["train"].norms, norms)
    np.testing.assert_array_equal(cache.splits["train"].aug_norms, aug)
    np.testing.assert_array_equal(cache.splits["test"].norms, [1.0, 1.0])  # not given: 1
    reader = open_cache(tmp_path / "c.h5")
    np.testing.assert_array_equal(reader.norms("train", np.array([3, 0, 3])), norms[[3, 0, 3]])
    np.testing.assert_array_equal(reader.norms("train", np.array([2, 1]), views=True),
                                  np.concatenate([norms[[2, 1], None], aug[[2, 1]]], axis=1))


def test_incremental_writes_keep_each_rows_norms(tmp_path):
    content = _content()
    splits, text = content.pop("splits"), content.pop("text_features")
    writer = CacheWriter.open(tmp_path / "c.h5", **content, splits=splits, embed_dim=3, aug_views=2)
    writer.write_text(text)
    train = splits["train"]
    for rows in (np.array([3, 1]), np.array([2, 0])):  # out of order, as batches of a resumed extraction
        writer.write_rows("train", rows, train["features"][rows], train["aug_features"][rows], rows + 10.0,
                          np.stack([rows + 20.0, rows + 30.0], axis=1))
    writer.write_rows("test", np.arange(2), splits["test"]["features"], norms=np.array([4.0, 6.0]))
    cache = read_cache(writer.finalize())
    np.testing.assert_array_equal(cache.splits["train"].norms, np.arange(4) + 10.0)
    np.testing.assert_array_equal(cache.splits["train"].aug_norms, np.arange(4)[:, None] + [20.0, 30.0])
    np.testing.assert_array_equal(cache.splits["test"].norms, [4.0, 6.0])


def test_a_cache_of_schema_2_gets_the_re_extract_line(tmp_path):
    path = write_cache(tmp_path / "c.h5", **_content())
    with h5py.File(path, "r+") as f:  # as the previous schema wrote it: no norms
        f.attrs["schema_version"] = 2
        del f["splits/train/norms"], f["splits/test/norms"]
    with pytest.raises(CacheError, match=r"schema version 2 but this code reads version 3; re-extract it") as err:
        read_cache(path)
    assert "\n" not in str(err.value)


@torch.inference_mode()
def _raw_norms(model, preprocess, paths):
    """The norm of the model's image embedding of each image, one at a time (no DataLoader, no normalisation)."""
    out = []
    for path in paths:
        with Image.open(path) as image:
            out.append(float(model.encode_image(preprocess(image.convert("RGB"))[None])[0].norm()))
    return np.array(out)


def test_extraction_writes_the_raw_norms_and_merges_keep_them(tmp_path):
    spec = datasets.from_folder(make_class_folder(tmp_path / "imgs", per_class=4), seed=0)
    kw = {"templates": templates(spec), "aug_views": 2, "batch_size": 3, "progress": False}
    full = read_cache(run_extraction(spec, tiny_model(), tmp_path / "c.h5", **kw))
    loaded = tiny_model()
    for name, rows in spec.splits.items():
        want = _raw_norms(loaded.model, loaded.preprocess, [spec.image_root / p for p, _ in rows])
        np.testing.assert_allclose(full.splits[name].norms, want, rtol=1e-5)  # float32 forwards, batched or not
    aug = full.splits["train"].aug_norms
    assert aug.shape == (len(spec.splits["train"]), 2) and np.all(aug > 0)
    assert not np.allclose(aug[:, 0], full.splits["train"].norms, rtol=1e-3)  # each view its own norm
    out = tmp_path / "m.h5"
    shards = [run_extraction(spec, tiny_model(), out, shard=Shard(i, 2), **kw) for i in (0, 1)]
    merged = read_cache(merge_shards(out, shards, progress=False))
    for name, split in full.splits.items():
        np.testing.assert_allclose(merged.splits[name].norms, split.norms, rtol=1e-6)
    np.testing.assert_allclose(merged.splits["train"].aug_norms, aug, rtol=1e-6)
