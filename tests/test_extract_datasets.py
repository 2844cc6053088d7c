"""The dataset interface: image folders (split sub-trees or a seeded ratio), CoOp split files, the data/ registry."""
from __future__ import annotations

import json
import os
from pathlib import Path

import pytest

from data.registry import ensemble_templates
from extract import datasets
from extract.errors import ExtractError
from extract.prompts import cache_templates, check_template, read_templates_file
from helpers_extract import CLASSES, make_class_folder, make_images


def test_folder_split_by_seeded_ratio(tmp_path: Path) -> None:
    root = make_class_folder(tmp_path / "pets", per_class=10)
    spec = datasets.from_folder(root, split_ratio=(0.5, 0.2, 0.3), seed=3)
    assert spec.name == "pets" and spec.classnames == ("cat", "dog", "red fox") and spec.image_root == root
    assert spec.templates == (datasets.DEFAULT_TEMPLATE,)
    for label in range(3):  # stratified: 5 / 2 / 3 of each class's 10 images
        assert [sum(lab == label for _, lab in spec.splits[s]) for s in ("train", "val", "test")] == [5, 2, 3]
    rows = [r for s in spec.splits.values() for r in s]
    assert sorted(rows) == sorted((f"{c}/img{i:02d}.png", label) for label, c in enumerate(CLASSES)
                                  for i in range(10))
    assert all((root / rel).is_file() for rel, _ in rows)
    assert datasets.from_folder(root, seed=3).splits == datasets.from_folder(root, seed=3).splits
    assert datasets.from_folder(root, seed=3).splits != datasets.from_folder(root, seed=4).splits


def test_folder_with_split_subtrees(tmp_path: Path) -> None:
    for split, n in (("train", 4), ("val", 2), ("test", 3)):
        make_class_folder(tmp_path / "ds" / split, per_class=n, classes=("a", "b"))
    spec = datasets.from_folder(tmp_path / "ds", name="mine", template="a {} texture.")
    assert spec.name == "mine" and spec.templates == ("a {} texture.",)
    assert {s: len(r) for s, r in spec.splits.items()} == {"train": 8, "val": 4, "test": 6}
    assert spec.splits["val"][0] == ("val/a/img00.png", 0) and spec.splits["test"][-1] == ("test/b/img02.png", 1)


def test_classnames_file_formats(tmp_path: Path) -> None:
    root = make_class_folder(tmp_path / "imgs", per_class=2)
    plain = tmp_path / "plain.txt"
    plain.write_text("a cat\na dog\na red fox\n")
    assert datasets.from_folder(root, classnames_file=plain).classnames == ("a cat", "a dog", "a red fox")
    mapped = tmp_path / "mapped.txt"  # CoOp ImageNet style 'folder name', labels in file order
    mapped.write_text("red_fox vulpes\ncat kitty\ndog good boy\n")
    spec = datasets.from_folder(root, classnames_file=mapped)
    assert spec.classnames == ("vulpes", "kitty", "good boy")
    assert ("red_fox/img00.png", 0) in [r for rows in spec.splits.values() for r in rows]
    short = tmp_path / "short.txt"
    short.write_text("only one\n")
    with pytest.raises(ExtractError, match="1 class names for 3 class folders"):
        datasets.from_folder(root, classnames_file=short)


def test_folder_errors(tmp_path: Path) -> None:
    with pytest.raises(ExtractError, match="image folder not found"):
        datasets.from_folder(tmp_path / "missing")
    root = make_class_folder(tmp_path / "imgs", per_class=2)
    (root / "empty_class").mkdir()
    with pytest.raises(ExtractError, match="empty_class: class folder holds no image"):
        datasets.from_folder(root)
    with pytest.raises(ExtractError, match="split ratio"):
        datasets.from_folder(make_class_folder(tmp_path / "ok", per_class=2), split_ratio=(0.5, 0.5, 0.5))


def test_split_json(tmp_path: Path) -> None:
    make_images(tmp_path / "images" / "x", 3, seed=0)
    split = {"train": [["x/img00.png", 0, "great_dane"], ["x/img01.png", 1, "pug"]],
             "test": [["x/img02.png", 1, "pug"]]}
    path = tmp_path / "split_zhou_Dogs.json"
    path.write_text(json.dumps(split))
    spec = datasets.from_split_json(path, tmp_path / "images")
    assert spec.name == "Dogs" and spec.classnames == ("great dane", "pug")
    assert spec.splits == {"train": [("x/img00.png", 0), ("x/img01.png", 1)], "test": [("x/img02.png", 1)]}
    with pytest.raises(ExtractError, match="image root not found"):
        datasets.from_split_json(path, tmp_path / "nope")
    with pytest.raises(ExtractError, match="split file not found"):
        datasets.from_split_json(tmp_path / "none.json", tmp_path / "images")


def test_registry_dataset_keeps_its_template_first(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    import data.registry

    rows = {"test": [("a/1.png", 0)]}
    monkeypatch.setattr(data.registry, "load_benchmark", lambda name, root: (Path(root) / "dtd", ["banded"], rows))
    spec = datasets.from_registry("DTD", tmp_path)
    info = data.registry.get_dataset("DTD")
    assert spec.name == info.name and spec.templates[0] == info.template == "{} texture."
    assert spec.splits == rows and spec.image_root == tmp_path / "dtd"
    assert cache_templates(spec.templates)[0] == "{} texture."
    with pytest.raises(ExtractError, match="unknown dataset"):
        datasets.from_registry("NoSuchSet", tmp_path)


def test_templates_order_dedup_and_validation(tmp_path: Path) -> None:
    out = cache_templates(["a photo of a {}.", "art of the {}."], ["itap of a {}.", "my {} prompt"])
    assert out == ["a photo of a {}.", *ensemble_templates(), "my {} prompt"]
    for bad in ("a photo", "a {0} photo of {}", "a {name}"):
        with pytest.raises(ExtractError, match="placeholder"):
            check_template(bad, "--template")
    f = tmp_path / "t.txt"
    f.write_text("# mine\nthe {} again\n\nno placeholder\n")
    with pytest.raises(ExtractError, match=r"t\.txt: template 'no placeholder'"):
        read_templates_file(f)


def test_class_with_one_image_is_refused_up_front(tmp_path: Path) -> None:
    root = make_class_folder(tmp_path / "pets", per_class=4)
    make_images(root / "zebra", 1, seed=9)
    with pytest.raises(ExtractError, match=r"zebra: 1 image, too few to split by 0\.5,0\.2,0\.3 .* no train image"):
        datasets.from_folder(root)


def test_file_name_not_utf8_is_refused_up_front(tmp_path: Path) -> None:
    root = make_class_folder(tmp_path / "pets", per_class=3)
    (root / "cat" / "img00.png").rename(root / "cat" / os.fsdecode(b"caf\xe9.png"))
    with pytest.raises(ExtractError, match=r"caf\\xe9\.png'?: file name is not valid UTF-8; rename it"):
        datasets.from_folder(root)


def test_unlabelled_folder_takes_another_caches_classes_and_templates(tmp_path: Path) -> None:
    import numpy as np

    from data.cache import UNLABELLED
    from data.cache_writer import write_cache

    make_images(tmp_path / "new" / "sub", 2, seed=1)
    make_images(tmp_path / "new", 1, seed=2)
    (tmp_path / "new" / "notes.txt").write_text("not an image")
    templates = ["{} texture.", *ensemble_templates()]
    train = write_cache(tmp_path / "train.h5", attrs={"dataset": "T", "embed_dim": 4}, classnames=["a", "b"],
                        templates=templates,
                        text_features=np.tile(np.eye(4, dtype=np.float32)[0], (2, len(templates), 1)),
                        splits={"train": {"features": np.eye(4, dtype=np.float32)[:1], "labels": [0], "paths": ["x"]}})
    spec = datasets.from_unlabelled(tmp_path / "new", classes_from=train, split="holiday")
    assert spec.classnames == ("a", "b") and spec.templates == tuple(templates) and spec.name == "new"
    assert spec.splits == {"holiday": [(p, UNLABELLED) for p in ("img00.png", "sub/img00.png", "sub/img01.png")]}
    names = tmp_path / "names.txt"
    names.write_text("cat\n\ndog\n")
    spec = datasets.from_unlabelled(tmp_path / "new", classnames_file=names, template="{} texture.")
    assert spec.classnames == ("cat", "dog") and spec.templates == ("{} texture.",) and list(spec.splits) == ["test"]
    for kwargs, message in (({}, "exactly one of"), ({"classes_from": train, "classnames_file": names}, "exactly one"),
                            ({"classes_from": train, "split": "a/b"}, "without '/'")):
        with pytest.raises(ExtractError, match=message):
            datasets.from_unlabelled(tmp_path / "new", **kwargs)
    (tmp_path / "empty").mkdir()
    with pytest.raises(ExtractError, match="holds no image"):
        datasets.from_unlabelled(tmp_path / "empty", classes_from=train)
