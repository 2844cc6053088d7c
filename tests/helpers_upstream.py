"""Benchmarks laid out as their sources ship them, with generated images: CoOp split files in their real format
(`{"train"|"val"|"test": [[relpath, label, classname], ...]}`) over the registry's real class lists, FGVC-Aircraft's
variant lists, ImageNet's train/ and val/ (sorted or as ILSVRC2012_img_val.tar ships it), and the four shift sets as
their archives unpack (ImageNet-V2's numbered folders, ImageNet-Sketch's sketch/, ImageNet-A/-R's wnid folders)."""
from __future__ import annotations

import functools
import io
import json
from pathlib import Path

import numpy as np
from PIL import Image

from data.registry import dataset_dir, get_dataset


@functools.lru_cache(maxsize=None)
def jpeg(label: int) -> bytes:
    """A small JPEG whose colour depends on `label` (so classes differ), encoded once per label."""
    rng = np.random.default_rng(label)
    pixels = rng.integers(0, 60, size=(24, 24, 3), dtype=np.uint8)
    pixels += np.array([(label * 37) % 190, (label * 91) % 190, (label * 53) % 190], dtype=np.uint8)
    buf = io.BytesIO()
    Image.fromarray(pixels).save(buf, format="JPEG", quality=90)
    return buf.getvalue()


def _write(path: Path, label: int) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(jpeg(label))


def coop_split(name: str, data_root: Path, per_split: dict[str, int] | None = None) -> dict[str, list]:
    """A coop_split benchmark: `per_split` images per class and split under its image folder, listed in CoOp's
    split file (class folder = the class name with `_` for spaces, as DTD ships). Returns the split file's content."""
    info = get_dataset(name)
    per_split = per_split or {"train": 3, "val": 1, "test": 2}
    root = dataset_dir(info, data_root)
    image_root = root / info.image_dir
    raw: dict[str, list] = {}
    for split, n in per_split.items():
        entries = []
        for label, cname in enumerate(info.classnames):
            folder = cname.replace(" ", "_")
            for k in range(n):
                rel = f"{folder}/{folder}_{split}_{k:04d}.jpg"
                _write(image_root / rel, label)
                entries.append([rel, label, cname])
        raw[split] = entries
    (root / info.split_file).write_text(json.dumps(raw))
    return raw


def fgvc_aircraft(data_root: Path, per_split: int = 1) -> None:
    """fgvc-aircraft-2013b/data/ as moved to DATA/fgvc_aircraft/: images/<id>.jpg, variants.txt and
    images_variant_{train,val,test}.txt with `<id> <variant>` lines."""
    info = get_dataset("FGVCAircraft")
    root = dataset_dir(info, data_root)
    (root / "images").mkdir(parents=True, exist_ok=True)
    (root / "variants.txt").write_text("\n".join(info.classnames) + "\n")
    image_id = 1000000
    for split in ("train", "val", "test"):
        lines = []
        for label, variant in enumerate(info.classnames):
            for _ in range(per_split):
                image_id += 1
                _write(root / "images" / f"{image_id}.jpg", label)
                lines.append(f"{image_id} {variant}")
        (root / f"images_variant_{split}.txt").write_text("\n".join(lines) + "\n")


def imagenet(data_root: Path, train_per_class: int = 2, val_per_class: int = 1, sorted_val: bool = True) -> None:
    """DATA/imagenet/images/train/<wnid>/<wnid>_<k>.JPEG and val/: ILSVRC2012_val_<n>.JPEG in the wnid folders
    (`sorted_val`) or loose, as ILSVRC2012_img_val.tar ships them."""
    info = get_dataset("ImageNet")
    images = dataset_dir(info, data_root) / info.image_dir
    n = 0
    for label, wnid in enumerate(info.class_folders):
        for k in range(train_per_class):
            _write(images / "train" / wnid / f"{wnid}_{k}.JPEG", label)
        for _ in range(val_per_class):
            n += 1
            _write(images / "val" / (wnid if sorted_val else "") / f"ILSVRC2012_val_{n:08d}.JPEG", label)


def shift_set(name: str, data_root: Path, per_class: int = 1) -> Path:
    """A shift set as its archive unpacks in DATA/<folder>/: ImageNet-V2's <folder>/0..999/<hash>.jpeg,
    ImageNet-Sketch's sketch/<wnid>/sketch_<k>.JPEG, ImageNet-A/-R's <dir>/<wnid>/ files (names with spaces, as
    ImageNet-A's). Returns the folder the images were written under."""
    info = get_dataset(name)
    root = dataset_dir(info, data_root)
    folder = root / (info.archive_dirs[0] if info.archive_dirs else info.image_dir)
    for label, class_folder in enumerate(info.class_folders):
        for k in range(per_class):
            file = {"ImageNetV2": f"{label:04x}{k:036x}.jpeg", "ImageNetSketch": f"sketch_{k}.JPEG",
                    "ImageNetA": f"0.{label:06d}_digital clock _ digital clock_0.{k:06d}.jpg"}.get(name, f"art_{k}.jpg")
            _write(folder / class_folder / file, info.parent_labels[label])
    return folder
