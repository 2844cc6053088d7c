"""Extraction into a cache: round trip against plain loops, seeded views, resume, shards + merge, bad images."""
from __future__ import annotations

import json
from pathlib import Path

import h5py
import numpy as np
import pytest

from extract import datasets
from data.cache import ABSENT, OK, CacheError, open_cache, partial_path, read_attrs, read_cache
from data.fewshot import FewClassWarning, pool_rows
from extract.errors import ExtractError
from extract.run import describe_plan, plan, run_extraction
from extract.shards import Shard, merge_shards, parse_shard, shard_path, shard_rows
from helpers_extract import (BATCH_ATOL, digest, make_class_folder, plain_image_features, plain_text_features,
                             templates, tiny_model)


@pytest.fixture()
def spec(tmp_path: Path) -> datasets.DatasetSpec:
    return datasets.from_folder(make_class_folder(tmp_path / "imgs", per_class=6), seed=0)


def extract(spec: datasets.DatasetSpec, out: Path, **kw) -> Path:
    kw = {"aug_views": 2, "batch_size": 4, "progress": False, **kw}
    return run_extraction(spec, tiny_model(), out, templates=templates(spec), **kw)


def test_round_trip_matches_plain_loops(spec: datasets.DatasetSpec, tmp_path: Path) -> None:
    path = extract(spec, tmp_path / "c.h5")
    cache = read_cache(path)
    loaded = tiny_model()
    assert cache.attrs["complete"] and not partial_path(path).exists()
    assert cache.attrs["model"] == "cmm-tiny-vit" and cache.attrs["pretrained"] == "" and cache.attrs["aug_views"] == 2
    assert cache.classnames == list(spec.classnames) and cache.templates == templates(spec)
    np.testing.assert_allclose(cache.text_features, plain_text_features(loaded, cache.classnames, cache.templates),
                               atol=1e-5)
    assert set(cache.splits) == set(spec.splits)
    for name, rows in spec.splits.items():
        split = cache.splits[name]
        assert split.paths.tolist() == [p for p, _ in rows] and split.labels.tolist() == [lab for _, lab in rows]
        expected = plain_image_features(loaded.model, loaded.preprocess, [spec.image_root / p for p, _ in rows])
        np.testing.assert_allclose(split.features, expected, atol=1e-5)
        assert (split.aug_features is not None) == (name == "train")
    aug = cache.splits["train"].aug_features
    assert aug.shape == (len(spec.splits["train"]), 2, 32)
    np.testing.assert_allclose(np.linalg.norm(aug, axis=-1), 1, atol=1e-5)
    assert not np.allclose(aug[:, 0], aug[:, 1]) and not np.allclose(aug[:, 0], cache.splits["train"].features)


def test_views_do_not_depend_on_batching_and_follow_the_seed(spec: datasets.DatasetSpec, tmp_path: Path) -> None:
    a = read_cache(extract(spec, tmp_path / "a.h5", batch_size=4, splits=["train"]))
    b = read_cache(extract(spec, tmp_path / "b.h5", batch_size=3, splits=["train"]))
    c = read_cache(extract(spec, tmp_path / "c.h5", batch_size=4, splits=["train"], aug_seed=1))
    np.testing.assert_allclose(a.splits["train"].aug_features, b.splits["train"].aug_features, atol=BATCH_ATOL)
    assert not np.allclose(a.splits["train"].aug_features, c.splits["train"].aug_features, atol=1e-3)
    np.testing.assert_allclose(a.splits["train"].features, c.splits["train"].features, atol=BATCH_ATOL)


def test_float16_storage(spec: datasets.DatasetSpec, tmp_path: Path) -> None:
    half = read_cache(extract(spec, tmp_path / "h.h5", feature_dtype="float16", splits=["test"]))
    full = read_cache(extract(spec, tmp_path / "f.h5", splits=["test"]))
    assert half.attrs["feature_dtype"] == "float16" and half.splits["test"].features.dtype == np.float32
    np.testing.assert_allclose(half.splits["test"].features, full.splits["test"].features, atol=2e-3)


def test_resume_after_interruption_gives_identical_arrays(spec: datasets.DatasetSpec, tmp_path: Path) -> None:
    reference = read_cache(extract(spec, tmp_path / "ref.h5"))
    out = tmp_path / "c.h5"

    def interrupt(split: str, rows: np.ndarray) -> None:
        raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        extract(spec, out, on_batch=interrupt)
    assert not out.exists() and partial_path(out).exists()
    assert read_attrs(partial_path(out))["complete"] is not True
    with pytest.raises(CacheError, match="incomplete"):
        read_cache(partial_path(out))
    done: list[int] = []
    extract(spec, out, on_batch=lambda split, rows: done.extend(rows))
    total = sum(len(r) for r in spec.splits.values())
    assert len(done) == total - 4  # the first batch of 4 was not redone
    resumed = read_cache(out)
    assert np.array_equal(resumed.text_features, reference.text_features)
    for name, split in reference.splits.items():
        assert np.array_equal(resumed.splits[name].features, split.features)
        assert np.array_equal(resumed.splits[name].labels, split.labels)
        assert resumed.splits[name].paths.tolist() == split.paths.tolist()
    assert np.array_equal(resumed.splits["train"].aug_features, reference.splits["train"].aug_features)


def test_rerun_of_a_complete_cache_leaves_it_alone(spec: datasets.DatasetSpec, tmp_path: Path) -> None:
    out = extract(spec, tmp_path / "c.h5", splits=["test"])
    before = digest(out)
    calls: list[str] = []
    extract(spec, out, splits=["test"], on_batch=lambda split, rows: calls.append(split))
    assert calls == [] and digest(out) == before


def test_two_shards_merged_equal_unsharded(spec: datasets.DatasetSpec, tmp_path: Path) -> None:
    full = read_cache(extract(spec, tmp_path / "full.h5"))
    out = tmp_path / "c.h5"
    paths = [extract(spec, out, shard=Shard(i, 2), batch_size=3) for i in (1, 0)]
    assert paths == [tmp_path / "c.shard-1-of-2.h5", tmp_path / "c.shard-0-of-2.h5"]
    half = read_cache(paths[1])
    assert half.attrs["shard"] == "0/2" and len(half.splits["train"].labels) == len(spec.splits["train"]) // 2
    merged = read_cache(merge_shards(out, paths, progress=False))
    assert merged.attrs["shard"] == "" and merged.classnames == full.classnames
    for key in ("model", "dataset", "preprocess", "aug", "aug_views", "embed_dim", "model_config"):
        assert merged.attrs[key] == full.attrs[key]
    assert np.array_equal(merged.text_features, full.text_features)
    for name, split in full.splits.items():
        got = merged.splits[name]
        assert got.paths.tolist() == split.paths.tolist() and np.array_equal(got.labels, split.labels)
        np.testing.assert_allclose(got.features, split.features, atol=BATCH_ATOL)
    np.testing.assert_allclose(merged.splits["train"].aug_features, full.splits["train"].aug_features, atol=BATCH_ATOL)
    merged_reader = open_cache(out)
    for path in paths:  # the shards' rows are copied, not re-encoded: their bytes
        shard = open_cache(path)
        for name in shard.split_names():
            rows = np.flatnonzero(shard.listing(name).status == OK)
            for got, kept in zip(merged_reader.read(name, rows, views=name == "train"),
                                 shard.read(name, rows, views=name == "train")):
                assert (got is None and kept is None) or got.tobytes() == kept.tobytes(), name


def test_merge_refuses_shards_that_do_not_fit(spec: datasets.DatasetSpec, tmp_path: Path) -> None:
    out = tmp_path / "c.h5"
    s0, s1 = (extract(spec, out, shard=Shard(i, 2), splits=["test"]) for i in (0, 1))
    with pytest.raises(ExtractError, match="exactly once"):
        merge_shards(out, [s0], progress=False)
    with pytest.raises(ExtractError, match="exactly once"):
        merge_shards(out, [s0, s0], progress=False)
    other = extract(spec, tmp_path / "o.h5", shard=Shard(1, 2), splits=["test"], aug_seed=5, aug_views=0,
                    feature_dtype="float16")
    with pytest.raises(ExtractError, match="feature_dtype"):
        merge_shards(out, [s0, other], progress=False)
    with pytest.raises(ExtractError, match="not a shard"):
        merge_shards(out, [s0, extract(spec, tmp_path / "whole.h5", splits=["test"])], progress=False)
    assert not out.exists() and not partial_path(out).exists()
    merge_shards(out, [s1, s0], progress=False)
    assert read_cache(out).splits["test"].paths.tolist() == [p for p, _ in spec.splits["test"]]


def test_shard_arithmetic(monkeypatch: pytest.MonkeyPatch) -> None:
    slices = [shard_rows(10, Shard(i, 3)).tolist() for i in range(3)]
    assert slices == [[0, 1, 2], [3, 4, 5], [6, 7, 8, 9]]
    assert parse_shard("2/4") == Shard(2, 4) and str(Shard(2, 4)) == "2/4"
    monkeypatch.setenv("RANK", "1")
    monkeypatch.setenv("WORLD_SIZE", "2")
    assert parse_shard("auto") == Shard(1, 2)
    for bad in ("4/4", "1", "a/b", "-1/2"):
        with pytest.raises(ExtractError, match="--shard"):
            parse_shard(bad)
    assert shard_path("x/c.h5", Shard(0, 2)) == Path("x/c.shard-0-of-2.h5") and shard_path("c.h5", None) == Path("c.h5")


def test_corrupt_image_fails_by_default_and_is_skipped_and_recorded_with_skip_bad(spec: datasets.DatasetSpec,
                                                                                   tmp_path: Path) -> None:
    bad_rel = spec.splits["test"][1][0]
    (spec.image_root / bad_rel).write_bytes(b"\x89PNG\r\n\x1a\n this is not an image")
    out = tmp_path / "c.h5"
    with pytest.raises(ExtractError, match=f"{bad_rel}: cannot read image .*--skip-bad"):
        extract(spec, out, splits=["test"])
    assert not out.exists()
    path = extract(spec, out, splits=["test"], skip_bad=True)
    cache = read_cache(path)
    assert cache.bad_paths == [bad_rel]
    assert cache.splits["test"].paths.tolist() == [p for p, _ in spec.splits["test"] if p != bad_rel]


def test_different_model_is_refused_and_leaves_the_cache_untouched(spec: datasets.DatasetSpec,
                                                                   tmp_path: Path) -> None:
    out = extract(spec, tmp_path / "c.h5", splits=["test"])
    before = digest(out)
    other = tiny_model()
    other = type(other)(other.model, other.tokenizer, other.preprocess, other.preprocess_cfg,
                        {**other.attrs, "pretrained": "other.pt", "weights_sha256": "ab" * 32})
    with pytest.raises(CacheError, match="pretrained"):
        run_extraction(spec, other, out, templates=templates(spec), splits=["test"], progress=False)
    assert digest(out) == before and not partial_path(out).exists()


def test_unknown_split_is_an_error(spec: datasets.DatasetSpec, tmp_path: Path) -> None:
    with pytest.raises(ExtractError, match="split 'valid' is not in dataset"):
        extract(spec, tmp_path / "c.h5", splits=["valid"])


def _train_listing(spec: datasets.DatasetSpec) -> tuple[np.ndarray, np.ndarray]:
    rows = spec.splits["train"]
    return np.array([y for _, y in rows]), np.array([p for p, _ in rows], dtype=object)


def test_pooled_extraction_encodes_the_draws_only_and_grows_without_touching_encoded_rows(
        spec: datasets.DatasetSpec, tmp_path: Path) -> None:
    labels, paths = _train_listing(spec)
    full = open_cache(extract(spec, tmp_path / "full.h5"))
    out = tmp_path / "p.h5"
    extract(spec, out, pool={"seeds": [1], "shots": 1})
    first = pool_rows(labels, paths, spec.classnames, [1], 1, val_from_train=False)
    reader = open_cache(out)
    status = reader.listing("train").status
    assert np.flatnonzero(status == OK).tolist() == first.tolist() and np.all(np.delete(status, first) == ABSENT)
    assert len(reader.listing("train").labels) == len(labels)  # every row is listed
    feats, aug = reader.read("train", first, views=True)
    full_feats, full_aug = full.read("train", first, views=True)
    np.testing.assert_allclose(feats, full_feats, atol=BATCH_ATOL)
    np.testing.assert_allclose(aug, full_aug, atol=BATCH_ATOL)  # views seeded by the row id: same as a whole extraction
    with h5py.File(out, "r") as f:
        assert f["splits/train/aug_features"].shape[0] == len(first)  # views only for the encoded rows
    for name in ("val", "test"):
        assert np.all(reader.listing(name).status == OK)
    with pytest.raises(CacheError, match="not encoded"):
        reader.read("train", np.delete(np.arange(len(labels)), first)[:1])

    done: list[int] = []
    extract(spec, out, pool={"seeds": [2], "shots": 2}, on_batch=lambda split, rows: done.extend(rows))
    grown = pool_rows(labels, paths, spec.classnames, [1, 2], 2, val_from_train=False)
    reader = open_cache(out)
    assert json.loads(reader.attrs["pool"]) == {"seeds": [1, 2], "shots": 2}
    assert np.flatnonzero(reader.listing("train").status == OK).tolist() == grown.tolist()
    assert sorted(done) == sorted(set(grown.tolist()) - set(first.tolist()))  # only the missing rows
    again = reader.read("train", first, views=True)
    assert again[0].tobytes() == feats.tobytes() and again[1].tobytes() == aug.tobytes()  # rows written stay
    added = np.setdiff1d(grown, first)  # encoded in other batches than the whole extraction's: equal up to rounding
    for got, direct in zip(reader.read("train", added, views=True), full.read("train", added, views=True)):
        np.testing.assert_allclose(got, direct, atol=BATCH_ATOL)
    before = digest(out)
    extract(spec, out, pool={"seeds": [1, 2], "shots": 1}, on_batch=lambda split, rows: done.append(-1))
    assert digest(out) == before and -1 not in done  # a smaller pool is already there


def test_sharded_pooled_extraction_merged_equals_unsharded(spec: datasets.DatasetSpec, tmp_path: Path) -> None:
    pool = {"seeds": [1, 2], "shots": 2}
    ref = read_cache(extract(spec, tmp_path / "ref.h5", pool=pool))
    out = tmp_path / "c.h5"
    paths = [extract(spec, out, shard=Shard(i, 2), pool=pool, batch_size=3) for i in (0, 1)]
    halves = [open_cache(p).listing("train").status == OK for p in paths]
    assert not np.any(halves[0] & halves[1]) and abs(int(halves[0].sum()) - int(halves[1].sum())) <= 1
    merged = read_cache(merge_shards(out, paths, progress=False))
    assert merged.attrs["pool"] == ref.attrs["pool"]
    for name, split in ref.splits.items():
        got = merged.splits[name]
        assert got.paths.tolist() == split.paths.tolist() and np.array_equal(got.labels, split.labels)
        np.testing.assert_allclose(got.features, split.features, atol=BATCH_ATOL)
    np.testing.assert_allclose(merged.splits["train"].aug_features, ref.splits["train"].aug_features, atol=BATCH_ATOL)
    assert np.array_equal(open_cache(out).listing("train").status,
                          open_cache(tmp_path / "ref.h5").listing("train").status)


def test_plan_counts_what_would_be_encoded(spec: datasets.DatasetSpec, tmp_path: Path) -> None:
    labels, paths = _train_listing(spec)
    pooled = len(pool_rows(labels, paths, spec.classnames, [1], 1, val_from_train=False))
    text = describe_plan(spec, tmp_path / "p.h5", pool={"seeds": [1], "shots": 1}, aug_views=2)
    assert (f"train: {len(labels)} listed, {pooled} to encode (0 already in the file), {3 * pooled} image "
            "forwards") in text
    extract(spec, tmp_path / "p.h5", pool={"seeds": [1], "shots": 1})
    text = describe_plan(spec, tmp_path / "p.h5", pool={"seeds": [1], "shots": 1}, aug_views=2)
    assert f"{pooled} already in the file" in text and f"test: {len(spec.splits['test'])} listed, 0 to encode" in text
    with pytest.warns(FewClassWarning, match="fewer than 9 train images"):
        describe_plan(spec, tmp_path / "q.h5", pool={"seeds": [1], "shots": 9})  # a class gives all it has


def test_plan_counts_rows_held_without_the_asked_views_and_the_run_stops(spec: datasets.DatasetSpec,
                                                                         tmp_path: Path) -> None:
    """A cache holds a fixed number of views per row: one made without views, asked for 2, has every row still to
    encode; the run stops with one line naming --overwrite (the cache untouched), and --overwrite re-encodes it."""
    pool = {"seeds": [1], "shots": 1}
    out = extract(spec, tmp_path / "c.h5", pool=pool, aug_views=0)
    before = digest(out)
    same = plan(spec, out, pool=pool, aug_views=0)
    assert same["to_encode"] == 0 and same["refused"] is None and same["views"] == {"asked": 0, "in_file": 0}
    asked = plan(spec, out, pool=pool, aug_views=2)
    rows = {name: s["in_file"] for name, s in same["splits"].items()}
    assert asked["views"] == {"asked": 2, "in_file": 0} and asked["to_encode"] == sum(rows.values())
    assert {name: s["in_file"] for name, s in asked["splits"].items()} == dict.fromkeys(rows, 0)
    assert asked["splits"]["train"]["forwards"] == 3 * rows["train"]  # each row: the image and its 2 views
    assert "--aug-views 0 to use it, or --overwrite" in asked["refused"] and "\n" not in asked["refused"]
    assert f"the run would stop: {asked['refused']}" in describe_plan(spec, out, pool=pool, aug_views=2)
    with pytest.raises(ExtractError, match="holds 0 augmented views per train image, not 2") as e:
        extract(spec, out, pool=pool, aug_views=2)
    assert "--overwrite" in str(e.value) and digest(out) == before and not partial_path(out).exists()
    forced = plan(spec, out, pool=pool, aug_views=2, overwrite=True)
    assert forced["refused"] is None and forced["to_encode"] == asked["to_encode"]
    extract(spec, out, pool=pool, aug_views=2, overwrite=True)
    assert read_cache(out).splits["train"].aug_features.shape[1] == 2
    assert plan(spec, out, pool=pool, aug_views=2)["to_encode"] == 0


def test_an_interrupted_extraction_with_other_views_is_named(spec: datasets.DatasetSpec, tmp_path: Path) -> None:
    out = tmp_path / "c.h5"

    def interrupt(split: str, rows: np.ndarray) -> None:
        raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        extract(spec, out, aug_views=0, on_batch=interrupt)
    refused = plan(spec, out, aug_views=2, overwrite=True)["refused"]
    assert refused.startswith(f"{partial_path(out)}: an interrupted extraction with 0 augmented views")
    assert "rerun it with --aug-views 0, or delete the .partial file" in refused
    with pytest.raises(ExtractError, match="interrupted extraction with 0 augmented views"):
        extract(spec, out, aug_views=2)
    resumed = plan(spec, out, aug_views=0)
    assert resumed["refused"] is None and 0 < resumed["to_encode"] < sum(len(r) for r in spec.splits.values())
