"""data.fashion_mnist on tiny generated IDX files (no network, no apt)."""
import gzip
import struct

import numpy as np
import pytest
from PIL import Image

from data.__main__ import main
from data.errors import DataError
from data.fashion_mnist import IDX_FILES, build, decode_idx, fetch_package, pick_per_class, read_idx
from data.registry import get_dataset, load_benchmark

FOLDERS = get_dataset("FashionMNIST").class_folders


def idx_bytes(array: np.ndarray, code: int, dtype: str) -> bytes:
    """Plain IDX encoder: magic, big-endian dims, big-endian data."""
    header = bytes([0, 0, code, array.ndim]) + b"".join(struct.pack(">I", d) for d in array.shape)
    return header + array.astype(dtype).tobytes()


@pytest.mark.parametrize("array, code, dtype", [
    (np.arange(2 * 3 * 4, dtype=np.uint8).reshape(2, 3, 4), 0x08, "u1"),
    (np.array([9, 0, 3], dtype=np.uint8), 0x08, "u1"),
    (np.array([[-70000, 5], [1, 2]], dtype=np.int32), 0x0C, ">i4"),
    (np.array([0.5, -2.25], dtype=np.float32), 0x0D, ">f4"),
])
def test_decode_idx_round_trip(array, code, dtype):
    decoded = decode_idx(idx_bytes(array, code, dtype))
    assert decoded.shape == array.shape and np.array_equal(decoded, array)


def test_decode_idx_rejects_bad_files():
    good = idx_bytes(np.zeros((2, 2), np.uint8), 0x08, "u1")
    with pytest.raises(DataError, match="bad magic"):
        decode_idx(b"\x01" + good[1:], "f.idx")
    with pytest.raises(DataError, match="15 bytes, expected 16 for shape"):
        decode_idx(good[:-1], "f.idx")
    with pytest.raises(DataError, match="header cut short"):
        decode_idx(good[:6], "f.idx")


def test_read_idx_gz_and_plain(tmp_path):
    array = np.arange(12, dtype=np.uint8).reshape(3, 4)
    (tmp_path / "a.gz").write_bytes(gzip.compress(idx_bytes(array, 0x08, "u1")))
    (tmp_path / "a").write_bytes(idx_bytes(array, 0x08, "u1"))
    assert np.array_equal(read_idx(tmp_path / "a.gz"), array) and np.array_equal(read_idx(tmp_path / "a"), array)


def test_pick_per_class():
    labels = np.repeat(np.arange(3), 10)[np.random.default_rng(5).permutation(30)]
    train, val = pick_per_class(labels, [4, 2], 3, seed=1)
    assert np.bincount(labels[train], minlength=3).tolist() == [4, 4, 4]
    assert np.bincount(labels[val], minlength=3).tolist() == [2, 2, 2]
    assert not set(train) & set(val) and list(train) == sorted(train)
    again = pick_per_class(labels, [4, 2], 3, seed=1)
    assert all(np.array_equal(a, b) for a, b in zip(again, (train, val)))
    assert not np.array_equal(pick_per_class(labels, [4, 2], 3, seed=2)[0], train)
    with pytest.raises(DataError, match="fewer than the 11 asked"):
        pick_per_class(labels, [10, 1], 3, seed=1)


@pytest.fixture()
def idx_dir(tmp_path):
    """Fake Fashion-MNIST: 8 train and 5 test images per class, each pixel value unique per image."""
    rng = np.random.default_rng(0)
    folder = tmp_path / "idx"
    folder.mkdir()
    for split, per_class in (("train", 8), ("test", 5)):
        labels = np.repeat(np.arange(10, dtype=np.uint8), per_class)[rng.permutation(10 * per_class)]
        images = rng.integers(0, 256, size=(len(labels), 28, 28), dtype=np.uint8)
        (folder / IDX_FILES[f"{split}_images"]).write_bytes(gzip.compress(idx_bytes(images, 0x08, "u1")))
        (folder / IDX_FILES[f"{split}_labels"]).write_bytes(gzip.compress(idx_bytes(labels, 0x08, "u1")))
    return folder


def test_build_tree(tmp_path, idx_dir):
    out = tmp_path / "data" / "fashion-mnist"
    build(out, train_per_class=3, val_per_class=2, test_per_class=4, seed=0, idx_dir=idx_dir)
    images = {s: read_idx(idx_dir / IDX_FILES[f"{s}_images"]) for s in ("train", "test")}
    labels = {s: read_idx(idx_dir / IDX_FILES[f"{s}_labels"]) for s in ("train", "test")}
    seen = {"train": set(), "test": set()}
    for split, per_class in (("train", 3), ("val", 2), ("test", 4)):
        for label, folder in enumerate(FOLDERS):
            pngs = sorted((out / split / folder).glob("*.png"))
            assert len(pngs) == per_class
            for png in pngs:
                source = "test" if split == "test" else "train"
                index = int(png.stem.removeprefix(source))
                assert labels[source][index] == label and index not in seen[source]
                seen[source].add(index)
                assert np.array_equal(np.asarray(Image.open(png)), images[source][index])
    _, classnames, splits = load_benchmark("FashionMNIST", tmp_path / "data")
    assert classnames[0] == "t-shirt or top" and [len(splits[s]) for s in ("train", "val", "test")] == [30, 20, 40]


def test_build_is_idempotent_and_deterministic(tmp_path, idx_dir):
    out = tmp_path / "fm"
    build(out, train_per_class=3, val_per_class=1, test_per_class=2, idx_dir=idx_dir)
    first = sorted(p.relative_to(out) for p in out.rglob("*.png"))
    stamp = (out / "train").stat().st_mtime_ns
    build(out, train_per_class=3, val_per_class=1, test_per_class=2, idx_dir=idx_dir)
    assert (out / "train").stat().st_mtime_ns == stamp
    build(tmp_path / "fm2", train_per_class=3, val_per_class=1, test_per_class=2, idx_dir=idx_dir)
    assert sorted(p.relative_to(tmp_path / "fm2") for p in (tmp_path / "fm2").rglob("*.png")) == first
    build(out, train_per_class=2, val_per_class=1, test_per_class=2, idx_dir=idx_dir)
    assert len(list((out / "train").rglob("*.png"))) == 20


def test_build_refuses_foreign_folder_and_bad_counts(tmp_path, idx_dir):
    (tmp_path / "mine").mkdir()
    (tmp_path / "mine" / "keep.txt").write_text("x")
    with pytest.raises(DataError, match="not written by this command"):
        build(tmp_path / "mine", train_per_class=1, val_per_class=0, test_per_class=1, idx_dir=idx_dir)
    with pytest.raises(DataError, match="must be >= 1"):
        build(tmp_path / "x", train_per_class=0, val_per_class=0, test_per_class=1, idx_dir=idx_dir)
    with pytest.raises(DataError, match="IDX file not found"):
        build(tmp_path / "y", train_per_class=1, val_per_class=0, test_per_class=1, idx_dir=tmp_path)


def test_fetch_without_apt(tmp_path, monkeypatch):
    monkeypatch.setenv("PATH", str(tmp_path))
    with pytest.raises(DataError, match="`apt-get` not found"):
        fetch_package(tmp_path / "cache")


def test_cli_builds_and_checks(tmp_path, idx_dir, capsys):
    args = ["fashion-mnist", "--out", str(tmp_path / "fashion-mnist"), "--train-per-class", "2",
            "--val-per-class", "1", "--test-per-class", "2", "--idx-dir", str(idx_dir)]
    assert main(args) == 0
    assert main(["check", "fashionmnist", "--root", str(tmp_path)]) == 0
    out = capsys.readouterr().out
    assert "FashionMNIST: ok, 10 classes" in out and "train       20 images, 10 classes, 2-2 per class" in out
