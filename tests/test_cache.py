"""The HDF5 cache contract: round trip, validation on read, resumable writer, refusal to mix models."""
from __future__ import annotations

import errno
import hashlib
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

import h5py
import numpy as np
import pytest

from data.cache import (CacheError, file_identity, identity, identity_diff, l2_normalize, partial_path, read_attrs,
                        read_cache, verify)
from data.cache_writer import CacheWriter, write_cache
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


def test_a_partial_file_of_schema_1_is_started_over(tmp_path: Path) -> None:
    content = make_content()
    path = tmp_path / "c.h5"
    writer = _open_writer(path, content)
    writer.close()
    with h5py.File(partial_path(path), "r+") as f:  # as an interrupted extraction of the previous schema left it
        f.attrs["schema_version"] = 1
        del f["splits/train/slot"]
    writer = _open_writer(path, content)
    assert writer.pending("train").tolist() == list(range(6))
    writer.discard()


def test_pooled_rows_stay_listed_and_requested_rows_grow_the_file(tmp_path: Path) -> None:
    content = make_content()
    train = content["splits"]["train"]
    splits = {k: dict(paths=v["paths"], labels=v["labels"]) for k, v in content["splits"].items()}
    splits["train"]["encode"] = np.array([4, 1])
    writer = CacheWriter.open(tmp_path / "c.h5", attrs=content["attrs"], classnames=CLASSES, templates=TEMPLATES,
                              splits=splits, embed_dim=8, aug_views=2)
    writer.write_text(content["text_features"])
    assert writer.pending("train").tolist() == [1, 4]
    writer.write_rows("train", np.array([4, 1]), train["features"][[4, 1]], train["aug_features"][[4, 1]])
    writer.request("train", np.array([1, 2]))  # row 1 is encoded already: only row 2 is added
    assert writer.pending("train").tolist() == [2]
    writer.write_rows("train", np.array([2]), train["features"][[2]], train["aug_features"][[2]])
    writer.write_rows("test", np.arange(4), content["splits"]["test"]["features"])
    path = writer.finalize()
    cache = read_cache(path)
    assert cache.splits["train"].paths.tolist() == ["train/1.png", "train/2.png", "train/4.png"]
    assert cache.splits["train"].features.tobytes() == train["features"][[1, 2, 4]].astype(np.float32).tobytes()
    with h5py.File(path, "r") as f:
        assert f["splits/train/status"][()].tolist() == [3, 1, 1, 3, 1, 3] and f["splits/train/features"].shape[0] == 3


def _half_written(path: Path, content: dict) -> str:
    """A partial file with text and two train rows done (an interrupted run); returns its digest."""
    train = content["splits"]["train"]
    writer = _open_writer(path, content)
    writer.write_text(content["text_features"])
    writer.write_rows("train", np.array([0, 1]), train["features"][:2], train["aug_features"][:2])
    writer.close()
    return digest(partial_path(path))


def test_second_writer_is_refused_and_never_touches_the_partial(tmp_path: Path) -> None:
    content, path = make_content(), tmp_path / "c.h5"
    before = _half_written(path, content)
    first = _open_writer(path, content)
    with pytest.raises(CacheError, match=f"another extraction is writing {path}; wait for it or stop it"):
        CacheWriter.open(path, attrs=content["attrs"], classnames=CLASSES, templates=TEMPLATES,
                         splits={k: dict(paths=v["paths"], labels=v["labels"]) for k, v in content["splits"].items()},
                         embed_dim=8, aug_views=2, lock_wait=0.3)
    first.close()
    assert digest(partial_path(path)) == before


def test_rerun_while_a_reader_holds_the_partial_keeps_its_rows(tmp_path: Path) -> None:
    content, path = make_content(), tmp_path / "c.h5"
    before = _half_written(path, content)
    holder = subprocess.Popen([sys.executable, "-c", "import h5py, sys, time\n"
                               f"f = h5py.File({str(partial_path(path))!r}, 'r'); print('open', flush=True); "
                               "time.sleep(30)"], stdout=subprocess.PIPE, text=True)
    try:  # like a worker of a killed run still holding the file
        assert holder.stdout.readline().strip() == "open"
        with pytest.raises(CacheError, match="another process has it open"):
            _open_writer(path, content)
    finally:
        holder.kill()
        holder.wait()
    assert digest(partial_path(path)) == before
    writer = _open_writer(path, content)
    assert writer.pending("train").tolist() == [2, 3, 4, 5]
    writer.close()


def test_lock_is_held_by_forked_children_until_they_exit(tmp_path: Path) -> None:
    content, path = make_content(), tmp_path / "c.h5"
    writer = _open_writer(path, content)
    child = os.fork()
    if child == 0:  # like a DataLoader worker outliving its killed parent
        time.sleep(1.0)
        os._exit(0)
    writer.close()
    splits = {k: dict(paths=v["paths"], labels=v["labels"]) for k, v in content["splits"].items()}
    kw = dict(attrs=content["attrs"], classnames=CLASSES, templates=TEMPLATES, splits=splits, embed_dim=8,
              aug_views=2)
    with pytest.raises(CacheError, match="another extraction is writing"):
        CacheWriter.open(path, **kw, lock_wait=0.1)
    CacheWriter.open(path, **kw, lock_wait=10).close()  # waits for the child
    os.waitpid(child, 0)


def _truncate(path: Path, keep: int = 3000) -> None:
    """Cut a file to its first `keep` bytes (a copy or a disk that lost its tail): HDF5 then says "truncated file:
    eof = ..., sblock->base_addr = ..."."""
    with open(path, "r+b") as f:
        f.truncate(keep)


def _truncated_partial(p: Path) -> None:
    _half_written(p.with_name(p.name.removesuffix(".partial")), make_content())
    _truncate(p)


@pytest.mark.parametrize("make_partial", [
    lambda p: p.write_bytes(b"\x89HDF\r\n garbage from a killed run"),
    lambda p: h5py.File(p, "w").close(),  # killed before any attribute was written
    _truncated_partial,
])
def test_unresumable_partial_is_moved_aside(tmp_path: Path, capsys: pytest.CaptureFixture, make_partial) -> None:
    content, path = make_content(), tmp_path / "c.h5"
    make_partial(partial_path(path))
    before = digest(partial_path(path))
    _open_writer(path, content).close()
    aside = list(tmp_path.glob("c.h5.partial.unusable-*"))
    assert len(aside) == 1 and digest(aside[0]) == before
    assert "cannot be resumed" in capsys.readouterr().err
    assert read_attrs(partial_path(path))["format"] == "cmm-feature-cache"


def test_truncated_cache_is_reported_as_damaged_not_as_busy(tmp_path: Path) -> None:
    content, path = make_content(), tmp_path / "c.h5"
    write_cache(path, **content)
    _truncate(path)
    for read in (read_cache, read_attrs, file_identity, verify):
        with pytest.raises(CacheError) as info:
            read(path)
        assert "truncated file" in str(info.value) and "another process" not in str(info.value), read


def test_write_error_is_one_line_and_the_partial_resumes(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    content, path = make_content(), tmp_path / "c.h5"
    train, test = content["splits"]["train"], content["splits"]["test"]
    writer = _open_writer(path, content)
    writer.write_text(content["text_features"])
    writer.write_rows("train", np.arange(3), train["features"][:3], train["aug_features"][:3])
    real = h5py.Dataset.__setitem__

    def disk_full(self, key, value):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(h5py.Dataset, "__setitem__", disk_full)
    with pytest.raises(CacheError, match=r"c\.h5\.partial: cannot write it .*free disk space .* rerun") as err:
        writer.write_rows("train", np.arange(3, 6), train["features"][3:], train["aug_features"][3:])
    assert "\n" not in str(err.value)
    monkeypatch.setattr(h5py.Dataset, "__setitem__", real)
    writer = _open_writer(path, content)
    assert writer.pending("train").tolist() == [3, 4, 5]
    writer.write_rows("train", np.arange(3, 6), train["features"][3:], train["aug_features"][3:])
    writer.write_rows("test", np.arange(4), test["features"])
    resumed, reference = read_cache(writer.finalize()), read_cache(write_cache(tmp_path / "ref.h5", **content))
    for name in ("train", "test"):
        assert resumed.splits[name].features.tobytes() == reference.splits[name].features.tobytes()


def test_too_little_space_is_refused_before_writing(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(shutil, "disk_usage", lambda _: shutil._ntuple_diskusage(10**9, 10**9 - 1000, 1000))
    with pytest.raises(CacheError, match=r"c\.h5\.partial: needs 1\.\d MiB of free space, its disk has 0\.0 MiB"):
        write_cache(tmp_path / "c.h5", **make_content())
    assert list(tmp_path.iterdir()) == []


def _flip_byte(path: Path, dataset: str) -> None:
    with h5py.File(path, "r") as f:
        offset = f[dataset].id.get_chunk_info(0).byte_offset
    with open(path, "r+b") as raw:
        raw.seek(offset)
        byte = raw.read(1)
        raw.seek(offset)
        raw.write(bytes([byte[0] ^ 0xFF]))


@pytest.mark.parametrize("dataset", ["/splits/train/status", "/splits/test/features", "/text_features"])
def test_corrupted_bytes_are_reported_with_the_dataset(tmp_path: Path, dataset: str) -> None:
    path = write_cache(tmp_path / "c.h5", **make_content())
    assert verify(path) == 13  # text, 7 train and 5 test datasets (norms and aug_norms included)
    _flip_byte(path, dataset)
    with pytest.raises(CacheError, match=f"{dataset} is corrupted") as err:
        read_cache(path)
    assert "\n" not in str(err.value)
    with pytest.raises(CacheError, match=f"{dataset} rows 0-.* is corrupted"):
        verify(path)


def test_cache_without_bad_group_reads(tmp_path: Path) -> None:
    path = write_cache(tmp_path / "c.h5", **make_content())
    with h5py.File(path, "r+") as f:
        del f["bad"]
    assert read_cache(path).bad_paths == []


def test_identity_names_model_classes_and_listing(tmp_path: Path) -> None:
    content = make_content()
    path = write_cache(tmp_path / "c.h5", **content)
    splits = {k: dict(paths=v["paths"], labels=v["labels"]) for k, v in content["splits"].items()}
    full_attrs = {**content["attrs"], "embed_dim": 8, "aug_views": 2, "feature_dtype": "float32"}
    assert file_identity(path) == identity(full_attrs, CLASSES, TEMPLATES, splits)
    moved = splits | {"test": dict(paths=splits["test"]["paths"][::-1], labels=splits["test"]["labels"])}
    assert identity_diff(file_identity(path), identity(full_attrs, CLASSES, TEMPLATES, moved)) == \
        "another image listing (paths and labels)"
    before = digest(path)
    other = make_content()
    other["splits"]["test"]["paths"] = [f"elsewhere/{i}.png" for i in range(4)]
    with pytest.raises(CacheError, match="exists with another image listing .* --overwrite"):
        write_cache(path, **other)
    assert digest(path) == before
    write_cache(path, **other, overwrite=True)
    assert read_cache(path).splits["test"].paths.tolist() == other["splits"]["test"]["paths"]
