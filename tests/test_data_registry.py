"""data.registry: definitions, layout checks and loading fake dataset trees."""
import json
import subprocess
import sys
from collections import Counter
from pathlib import Path

import pytest

from data.errors import DataError
from data.registry import check_layout, dataset_names, get_dataset, load_benchmark, prompt_classname

BENCHMARKS = ["ImageNet", "Caltech101", "OxfordPets", "StanfordCars", "Flowers102", "Food101", "FGVCAircraft",
              "SUN397", "DTD", "EuroSAT", "UCF101"]
SHIFTS = ["ImageNetV2", "ImageNetSketch", "ImageNetA", "ImageNetR"]
CLASS_COUNTS = {"ImageNet": 1000, "Caltech101": 100, "OxfordPets": 37, "StanfordCars": 196, "Flowers102": 102,
                "Food101": 101, "FGVCAircraft": 100, "SUN397": 397, "DTD": 47, "EuroSAT": 10, "UCF101": 101,
                "ImageNetV2": 1000, "ImageNetSketch": 1000, "ImageNetA": 200, "ImageNetR": 200, "FashionMNIST": 10}
ENSEMBLE = ("itap of a {}.", "a bad photo of the {}.", "a origami {}.", "a photo of the large {}.",
            "a {} in a video game.", "art of the {}.", "a photo of the small {}.")
TEMPLATES = {"OxfordPets": "a photo of a {}, a type of pet.", "Flowers102": "a photo of a {}, a type of flower.",
             "FGVCAircraft": "a photo of a {}, a type of aircraft.", "DTD": "{} texture.",
             "EuroSAT": "a centered satellite photo of {}.", "Food101": "a photo of {}, a type of food.",
             "UCF101": "a photo of a person doing {}."}

REPO = Path(__file__).resolve().parents[1]


def touch(path):
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(b"")


def test_names_and_groups():
    assert dataset_names("benchmark") == BENCHMARKS
    assert dataset_names("shift") == SHIFTS
    assert dataset_names() == BENCHMARKS + SHIFTS + ["FashionMNIST"]
    with pytest.raises(DataError, match="unknown dataset group"):
        dataset_names("nope")


@pytest.mark.parametrize("name", list(CLASS_COUNTS))
def test_entry(name):
    info = get_dataset(name)
    assert len(info.classnames) == CLASS_COUNTS[name]
    assert all(name.strip() == name and name for name in info.classnames)
    assert info.template == TEMPLATES.get(name, "a photo of a {}.")
    assert info.ensemble == ENSEMBLE
    for template in (info.template, *info.ensemble):
        assert "{}" in template and template.format("x") != template
    assert info.eval_only == (name in SHIFTS)
    assert info.steps.strip()
    if info.layout != "coop_split" and info.layout != "fgvc_variants":
        assert len(info.class_folders) == len(info.classnames)
    duplicates = sorted(n for n, c in Counter(info.classnames).items() if c > 1)
    assert duplicates == (["missile", "sunglasses"] if len(info.classnames) == 1000 else [])


@pytest.mark.parametrize("name", SHIFTS)
def test_shift_sets_use_imagenet_names(name):
    info, imagenet = get_dataset(name), get_dataset("ImageNet")
    assert info.parent == "ImageNet"
    assert [imagenet.classnames[i] for i in info.parent_labels] == list(info.classnames)
    assert [imagenet.class_folders[i] for i in info.parent_labels] == (
        list(info.class_folders) if name != "ImageNetV2" else list(imagenet.class_folders))
    if len(info.classnames) == 200:  # A and R: every name is an ImageNet name; only R's "missile" is ambiguous
        counts = Counter(imagenet.classnames)
        ambiguous = sorted(n for n in info.classnames if counts[n] != 1)
        assert all(counts[n] >= 1 for n in info.classnames)
        assert ambiguous == (["missile"] if name == "ImageNetR" else [])
        assert list(info.parent_labels) == sorted(info.parent_labels)


def test_known_class_facts():
    assert get_dataset("ImageNetA").classnames[:3] == ("stingray", "goldfinch", "junco")
    assert get_dataset("ImageNetA").parent_labels[:5] == (6, 11, 13, 15, 17)
    assert get_dataset("ImageNetR").parent_labels[:5] == (1, 2, 4, 6, 8)
    assert get_dataset("ImageNet").class_folders[:2] == ("n01440764", "n01443537")
    assert get_dataset("Caltech101").classnames[:5] == ("face", "leopard", "motorbike", "accordion", "airplane")
    assert get_dataset("EuroSAT").classnames[0] == "Annual Crop Land"
    assert prompt_classname("american_pit_bull_terrier") == "american pit bull terrier"


def test_get_dataset_case_insensitive_and_unknown():
    assert get_dataset("oxfordpets") is get_dataset("OXFORDPETS") is get_dataset("OxfordPets")
    with pytest.raises(DataError) as err:
        get_dataset("cifar10")
    assert "unknown dataset 'cifar10'" in str(err.value) and "ImageNetR" in str(err.value)


def test_check_layout_names_the_first_missing_path(tmp_path):
    info = get_dataset("DTD")
    expected = [tmp_path / "dtd", tmp_path / "dtd" / "images", tmp_path / "dtd" / "split_zhou_DescribableTextures.json"]
    for missing in expected:
        with pytest.raises(DataError) as err:
            check_layout(info, tmp_path)
        message = str(err.value)
        assert message.startswith(f"{missing}: not found") and "python -m data info DTD" in message
        assert "\n" not in message
        missing.mkdir() if missing.suffix == "" else missing.write_text("{}")
    assert check_layout(info, tmp_path) == tmp_path / "dtd"


def test_load_coop_split(tmp_path):
    info = get_dataset("OxfordPets")
    root = tmp_path / "oxford_pets"
    names = list(info.classnames)
    raw = {"train": [[f"{n}_{k}.jpg", i, n] for i, n in enumerate(names) for k in range(2)],
           "val": [[f"{n}_9.jpg", i, n] for i, n in reversed(list(enumerate(names)))],
           "test": [[f"{names[3]}_7.jpg", 3, names[3]]]}
    for entries in raw.values():
        for rel, _, _ in entries:
            touch(root / "images" / rel)
    (root / "split_zhou_OxfordPets.json").write_text(json.dumps(raw))
    image_root, classnames, splits = load_benchmark("oxfordpets", tmp_path)
    assert image_root == root / "images"
    assert classnames == [n.replace("_", " ") for n in names] and "american bulldog" in classnames
    assert splits == {s: [(rel, label) for rel, label, _ in entries] for s, entries in raw.items()}


def test_load_coop_split_takes_labels_from_the_split_file(tmp_path):
    root = tmp_path / "eurosat"
    names = list(get_dataset("EuroSAT").classnames)[::-1]  # a split file with another label order
    raw = {"train": [[f"{i}.jpg", i, n] for i, n in enumerate(names)]}
    for rel, _, _ in raw["train"]:
        touch(root / "2750" / rel)
    (root / "split_zhou_EuroSAT.json").write_text(json.dumps(raw))
    _, classnames, _ = load_benchmark("EuroSAT", tmp_path)
    assert classnames == names


def test_load_coop_split_rejects_foreign_split_and_missing_images(tmp_path):
    root = tmp_path / "eurosat"
    (root / "2750").mkdir(parents=True)
    split = root / "split_zhou_EuroSAT.json"
    split.write_text(json.dumps({"train": [["a.jpg", 0, "cat"]]}))
    with pytest.raises(DataError, match="differ from the 10 bundled EuroSAT names"):
        load_benchmark("EuroSAT", tmp_path)
    names = get_dataset("EuroSAT").classnames
    split.write_text(json.dumps({"train": [[f"{i}.jpg", i, n] for i, n in enumerate(names)]}))
    with pytest.raises(DataError, match=r"2750/0.jpg: first train image"):
        load_benchmark("EuroSAT", tmp_path)


def test_load_fgvc(tmp_path):
    info = get_dataset("FGVCAircraft")
    root = tmp_path / "fgvc_aircraft"
    (root / "images").mkdir(parents=True)
    (root / "variants.txt").write_text("\n".join(info.classnames) + "\n")
    lists = {"train": [("0001", 5), ("0002", 72)], "val": [("0003", 73)], "test": [("0004", 0), ("0005", 99)]}
    for split, rows in lists.items():
        lines = [f"{image_id} {info.classnames[label]}" for image_id, label in rows]
        (root / f"images_variant_{split}.txt").write_text("\n".join(lines) + "\n")
    image_root, classnames, splits = load_benchmark("FGVCAircraft", tmp_path)
    assert image_root == root / "images" and classnames[72] == "F-16A/B"
    assert splits == {s: [(f"{i}.jpg", label) for i, label in rows] for s, rows in lists.items()}
    (root / "images_variant_val.txt").write_text("0003 Concorde\n")
    with pytest.raises(DataError, match="unknown variant 'Concorde'"):
        load_benchmark("FGVCAircraft", tmp_path)


def test_load_imagenet(tmp_path):
    info = get_dataset("ImageNet")
    images = tmp_path / "imagenet" / "images"
    for label, wnid in enumerate(info.class_folders):
        touch(images / "train" / wnid / f"{wnid}_1.JPEG")
        if label % 100 == 0:
            touch(images / "train" / wnid / f"{wnid}_0.JPEG")
        touch(images / "val" / wnid / f"ILSVRC2012_val_{label:08d}.JPEG")
    image_root, classnames, splits = load_benchmark("ImageNet", tmp_path)
    assert image_root == images and classnames == list(info.classnames)
    assert sorted(splits) == ["test", "train"]
    expected_train = []
    for label, wnid in enumerate(info.class_folders):
        names = sorted([f"{wnid}_1.JPEG"] + ([f"{wnid}_0.JPEG"] if label % 100 == 0 else []))
        expected_train += [(f"train/{wnid}/{n}", label) for n in names]
    assert splits["train"] == expected_train
    assert splits["test"] == [(f"val/{w}/ILSVRC2012_val_{i:08d}.JPEG", i) for i, w in enumerate(info.class_folders)]


@pytest.mark.parametrize("name, image_dir", [("ImageNetA", "imagenet-adversarial/imagenet-a"),
                                             ("ImageNetV2", "imagenetv2/imagenetv2-matched-frequency-format-val")])
def test_load_shift_set(tmp_path, name, image_dir):
    info = get_dataset(name)
    for folder in info.class_folders:
        touch(tmp_path / image_dir / folder / "img.jpg")
    image_root, classnames, splits = load_benchmark(name, tmp_path)
    assert image_root == tmp_path / image_dir and classnames == list(info.classnames)
    assert splits == {"test": [(f"{folder}/img.jpg", label) for label, folder in enumerate(info.class_folders)]}
    if name == "ImageNetV2":
        assert splits["test"][10] == ("10/img.jpg", 10)


def test_data_imports_no_torch_or_jax():
    code = ("import sys, data.registry, data.splits, data.download, data.fashion_mnist, data.__main__; "
            "bad = [m for m in ('torch', 'torchvision', 'jax') if m in sys.modules]; assert not bad, bad")
    subprocess.run([sys.executable, "-c", code], check=True, cwd=REPO)
