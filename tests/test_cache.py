"""The HDF5 cache contract: round trip, validation on read, resumable writer, refusal to mix models."""
from __future__ import annotations

import hashlib
from pathlib import Path

import h5py
import numpy as np
import pytest

from data.cache import (CacheError, CacheWriter, l2_normalize, partial_path, read_attrs, read_cache,
                        write_cache)
from data.registry import ensemble_templates

CLASSES = ["cat", "dog", "newt"]
TEMPLATES = ["a photo of a {}.", "art of the {}."]


def make_content(seed: int = 0, dim: int = 8, aug_views: int = 2) -> dict:
    rng = np.random.default_rng(seed)
    splits = {
        "train": dict(features=l2_normalize(rng.normal(size=(6, dim))), labels=np.array([0, 1, 2, 0, 1, 2]),
                      paths=[f"train/{i}.png" for i in range(6)],
                      aug_features=l2_normalize(rng.normal(size=(6, aug_views, dim)))),
        "test": dict(features=l2_normalize(rng.normal(size=(4, dim))), labels=np.array([2, 1, 0, 0]),
                     paths=[f"test/{i}.png" for i in range(4)]),
    }
    return dict(attrs=dict(dataset="toy", model="tiny-vit", preprocess={"image_size": 32}),
                classnames=CLASSES, templates=TEMPLATES,
                text_features=l2_normalize(rng.normal(size=(3, 2, dim))), splits=splits)


def digest(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def test_round_trip_is_exact(tmp_path: Path) -> None:
    content = make_content()
    path = write_cache(tmp_path / "c.h5", **content)
    cache = read_cache(path)
    assert cache.classnames == CLASSES and cache.templates == TEMPLATES
    assert cache.text_features.tobytes() == content["text_features"].astype(np.float32).tobytes()
    for name, rows in content["splits"].items():
        split = cache.splits[name]
        assert split.features.tobytes() == rows["features"].astype(np.float32).tobytes()
        assert split.labels.tolist() == list(rows["labels"])
        assert split.paths.tolist() == rows["paths"]
    assert cache.splits["train"].aug_features.tobytes() == content["splits"]["train"]["aug_features"].astype(
        np.float32).tobytes()
    assert cache.splits["test"].aug_features is None
    assert cache.attrs["preprocess"] == '{"image_size": 32}' and cache.attrs["complete"]
    assert not partial_path(path).exists()


def test_prototypes_single_and_ensemble(tmp_path: Path) -> None:
    content = make_content()
    cache = read_cache(write_cache(tmp_path / "c.h5", **content))
    text = content["text_features"]
    np.testing.assert_array_equal(cache.prototypes(1), text[:, 1])
    np.testing.assert_array_equal(cache.prototypes("art of the {}."), text[:, 1])
    with pytest.raises(CacheError, match="not in the cache"):
        cache.prototypes("missing {}")
    with pytest.raises(CacheError, match="has 1 of the 7 ensemble templates"):
        cache.prototypes("ensemble")


def test_ensemble_is_exactly_the_seven_templates(tmp_path: Path) -> None:
    """The dataset's own template (stored first) and user templates are not part of the ensemble."""
    rng = np.random.default_rng(0)
    templates = ["a photo of a {}, a type of pet.", *ensemble_templates(), "my own {}."]
    text = l2_normalize(rng.normal(size=(len(CLASSES), len(templates), 8)))
    content = {**make_content(), "templates": templates, "text_features": text}
    cache = read_cache(write_cache(tmp_path / "c.h5", **content))
    ens = text[:, 1:8].mean(axis=1)
    np.testing.assert_allclose(cache.prototypes("ensemble"), ens / np.linalg.norm(ens, axis=1, keepdims=True),
                               rtol=1e-6)


def test_float16_storage_reads_back_as_float32(tmp_path: Path) -> None:
    content = make_content()
    content["attrs"]["feature_dtype"] = "float16"
    cache = read_cache(write_cache(tmp_path / "c.h5", **content))
    feats = cache.splits["train"].features
    assert feats.dtype == np.float32
    np.testing.assert_array_equal(feats, content["splits"]["train"]["features"].astype(np.float16).astype(np.float32))


@pytest.mark.parametrize("mutate, message", [
    (lambda f: f.attrs.__setitem__("schema_version", 99), "schema version 99"),
    (lambda f: f.attrs.__setitem__("format", "something-else"), "not a cmm-feature-cache file"),
    (lambda f: f.attrs.__setitem__("complete", False), "incomplete"),
    (lambda f: f["splits/test/labels"].__setitem__(0, 7), "labels outside"),
    (lambda f: f["splits/test/status"].__setitem__(0, 0), "never extracted"),
    (lambda f: f["splits/test/features"].__setitem__(0, np.full(8, 3.0)), "not L2-normalised"),
    (lambda f: f.__delitem__("templates"), "missing /templates"),
])
def test_invalid_files_are_refused(tmp_path: Path, mutate, message: str) -> None:
    path = write_cache(tmp_path / "c.h5", **make_content())
    with h5py.File(path, "r+") as f:
        mutate(f)
    with pytest.raises(CacheError, match=message) as err:
        read_cache(path)
    assert str(path) in str(err.value) and "\n" not in str(err.value)


def test_not_hdf5_and_missing_file(tmp_path: Path) -> None:
    junk = tmp_path / "junk.h5"
    junk.write_bytes(b"not hdf5")
    with pytest.raises(CacheError, match="not a readable HDF5 file"):
        read_cache(junk)
    with pytest.raises(CacheError, match="no such cache file"):
        read_cache(tmp_path / "absent.h5")


def test_other_model_never_overwrites_existing_cache(tmp_path: Path) -> None:
    path = write_cache(tmp_path / "c.h5", **make_content())
    before = digest(path)
    other = make_content(seed=1)
    other["attrs"]["model"] = "ViT-B-32"
    with pytest.raises(CacheError, match="model='tiny-vit', not 'ViT-B-32'"):
        write_cache(path, **other)
    assert digest(path) == before and not partial_path(path).exists()


def _open_writer(path: Path, content: dict) -> CacheWriter:
    splits = {k: dict(paths=v["paths"], labels=v["labels"]) for k, v in content["splits"].items()}
    return CacheWriter.open(path, attrs=content["attrs"], classnames=CLASSES, templates=TEMPLATES, splits=splits,
                            embed_dim=8, aug_views=2)


def test_writer_resumes_and_matches_one_shot_write(tmp_path: Path) -> None:
    content = make_content()
    train = content["splits"]["train"]
    path = tmp_path / "c.h5"
    writer = _open_writer(path, content)
    writer.write_text(content["text_features"])
    writer.write_rows("train", np.array([3, 0]), train["features"][[3, 0]], train["aug_features"][[3, 0]])
    writer.close()  # interrupted
    assert not path.exists() and partial_path(path).exists()
    with pytest.raises(CacheError, match="incomplete|no such cache"):
        read_cache(path)

    writer = _open_writer(path, content)
    assert writer.text_done
    assert writer.pending("train").tolist() == [1, 2, 4, 5]
    rest = writer.pending("train")
    writer.write_rows("train", rest, train["features"][rest], train["aug_features"][rest])
    writer.write_rows("test", np.arange(4), content["splits"]["test"]["features"])
    writer.finalize()

    reference = read_cache(write_cache(tmp_path / "ref.h5", **content))
    resumed = read_cache(path)
    for name in ("train", "test"):
        assert resumed.splits[name].features.tobytes() == reference.splits[name].features.tobytes()
    assert resumed.splits["train"].aug_features.tobytes() == reference.splits["train"].aug_features.tobytes()


def test_writer_refuses_partial_of_other_model(tmp_path: Path) -> None:
    content = make_content()
    path = tmp_path / "c.h5"
    _open_writer(path, content).close()
    content["attrs"]["model"] = "RN50"
    with pytest.raises(CacheError, match="interrupted extraction with model='tiny-vit'"):
        _open_writer(path, content)


def test_finalize_refuses_unfinished_rows(tmp_path: Path) -> None:
    content = make_content()
    path = tmp_path / "c.h5"
    writer = _open_writer(path, content)
    writer.write_text(content["text_features"])
    with pytest.raises(CacheError, match="not finished"):
        writer.finalize()
    assert not path.exists() and partial_path(path).exists()


def test_bad_rows_dropped_and_recorded(tmp_path: Path) -> None:
    content = make_content()
    path = tmp_path / "c.h5"
    writer = _open_writer(path, content)
    writer.write_text(content["text_features"])
    train, test = content["splits"]["train"], content["splits"]["test"]
    writer.write_rows("train", np.arange(6), train["features"], train["aug_features"])
    writer.write_rows("test", np.array([0, 2, 3]), test["features"][[0, 2, 3]])
    writer.mark_bad("test", np.array([1]), ["cannot identify image file"])
    writer.finalize()
    cache = read_cache(path)
    assert cache.bad_paths == ["test/1.png"]
    assert cache.splits["test"].paths.tolist() == ["test/0.png", "test/2.png", "test/3.png"]
    np.testing.assert_array_equal(cache.splits["test"].features, test["features"][[0, 2, 3]].astype(np.float32))
    assert read_attrs(path)["complete"]
