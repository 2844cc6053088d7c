"""The dataset registry: definitions from `datasets.json` + `classnames/`, layout checks and split loading.

`load_benchmark(name, data_root)` returns what the extraction stage needs: the image root, the class names as they
go into prompts, and `{split: [(relpath, label), ...]}`. Layout kinds (the `layout` field of `datasets.json`):

- `coop_split`: CoOp's `split_zhou_<Name>.json` over `image_dir` (train/val/test).
- `fgvc_variants`: FGVC-Aircraft's own `images_variant_{train,val,test}.txt` lists, as CoOp reads them.
- `imagenet`: `images/train/<wnid>/` and `images/val/<wnid>/`; as in CoOp, val is returned as the `test` split.
- `imagenet_shift`: one folder per class under `image_dir` (wnids, or `0`..`999` for ImageNet-V2); `test` only.
- `split_folders`: `<split>/<class folder>/` image trees (the offline Fashion-MNIST demo).
"""
from __future__ import annotations

import json
from dataclasses import dataclass, field
from functools import lru_cache
from pathlib import Path
from types import MappingProxyType
from typing import Any, Mapping

from data.errors import DataError
from data.splits import SPLIT_NAMES, Sample, read_split_json, scan_class_folders

DATA_DIR = Path(__file__).resolve().parent
DEFINITIONS = DATA_DIR / "datasets.json"
CLASSNAMES_DIR = DATA_DIR / "classnames"
LAYOUTS = ("coop_split", "fgvc_variants", "imagenet", "imagenet_shift", "split_folders")
GROUPS = ("benchmark", "shift", "demo")


@dataclass(frozen=True)
class DatasetInfo:
    """One dataset's definition.

    classnames: bundled names by label (CoOp's spelling, `_` kept). class_folders: folder of each class for the
    folder layouts (wnids, `0`..`999`, ...), else empty. parent_labels: each class's label in `parent` (the 4 shift
    sets map into ImageNet), else empty. steps: the manual download steps, one per line.
    """

    name: str
    group: str
    classnames: tuple[str, ...]
    template: str
    ensemble: tuple[str, ...]
    folder: str
    layout: str
    split_file: str | None
    image_dir: str
    parent: str | None
    eval_only: bool
    torchvision: str | None
    steps: str
    class_folders: tuple[str, ...] = ()
    parent_labels: tuple[int, ...] = ()
    download: Mapping[str, Any] = field(default_factory=lambda: MappingProxyType({}), compare=False, repr=False)


def prompt_classname(name: str) -> str:
    """A class name as it goes into a prompt: CoOp's `_` become spaces (`american_bulldog` -> `american bulldog`)."""
    return name.replace("_", " ")


def read_lines(path: Path, fix: str = "restore it from the repository") -> list[str]:
    """Non-empty stripped lines of a text file; `fix` ends the error message if it cannot be read."""
    try:
        return [line.strip() for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]
    except (OSError, UnicodeDecodeError) as exc:
        raise DataError(f"{path}: cannot read ({getattr(exc, 'strerror', None) or exc}); {fix}") from None


@lru_cache(maxsize=1)
def _registry() -> dict[str, DatasetInfo]:
    """All definitions by name, in file order."""
    raw = json.loads(DEFINITIONS.read_text(encoding="utf-8"))
    ensemble = tuple(raw["ensemble"])
    entries = {entry["name"]: entry for entry in raw["datasets"]}
    return {name: _build(entry, entries, ensemble) for name, entry in entries.items()}


def _build(entry: dict, entries: dict[str, dict], ensemble: tuple[str, ...]) -> DatasetInfo:
    """One DatasetInfo from its JSON entry (shift sets take names from their parent)."""
    name, layout, group = entry["name"], entry["layout"], entry["group"]
    if layout not in LAYOUTS or group not in GROUPS:
        raise DataError(f"{DEFINITIONS}: {name} has layout {layout!r} / group {group!r}; "
                        f"use one of {LAYOUTS} / {GROUPS}")
    folders_spec = entry.get("class_folders")
    class_folders = tuple(read_lines(CLASSNAMES_DIR / folders_spec)) if folders_spec not in (None, "index") else ()
    parent = entry.get("parent")
    parent_labels: tuple[int, ...] = ()
    if parent is not None:
        parent_entry = entries[parent]
        parent_names = read_lines(CLASSNAMES_DIR / parent_entry["classnames"])
        if folders_spec == "index":
            parent_labels = tuple(range(len(parent_names)))
            class_folders = tuple(str(i) for i in parent_labels)
        else:
            parent_folders = read_lines(CLASSNAMES_DIR / parent_entry["class_folders"])
            index = {folder: i for i, folder in enumerate(parent_folders)}
            missing = [f for f in class_folders if f not in index]
            if missing:
                raise DataError(f"{CLASSNAMES_DIR / folders_spec}: {missing[0]} is not a {parent} class; fix the list")
            parent_labels = tuple(index[f] for f in class_folders)
        classnames = tuple(parent_names[i] for i in parent_labels)
    else:
        classnames = tuple(read_lines(CLASSNAMES_DIR / entry["classnames"]))
    if class_folders and len(class_folders) != len(classnames):
        raise DataError(f"{DEFINITIONS}: {name} has {len(class_folders)} class folders for {len(classnames)} names")
    download = entry.get("torchvision") or {}
    if entry.get("split_gdrive_id"):
        download = {**download, "split_gdrive_id": entry["split_gdrive_id"]}
    return DatasetInfo(
        name=name, group=group, classnames=classnames, template=entry["template"], ensemble=ensemble,
        folder=entry["folder"], layout=layout, split_file=entry.get("split_file"), image_dir=entry["image_dir"],
        parent=parent, eval_only=group == "shift", torchvision=download.get("class"),
        steps="\n".join(entry["steps"]), class_folders=class_folders, parent_labels=parent_labels,
        download=MappingProxyType(download))


def ensemble_templates() -> tuple[str, ...]:
    """CLIP's 7-template ImageNet prompt ensemble (`datasets.json`), as Tip-Adapter uses it."""
    return next(iter(_registry().values())).ensemble


def _name_key(name: str) -> str:
    return "".join(ch for ch in name.lower() if ch.isalnum())


def in_imagenet_family(name: str) -> bool:
    """Whether `name` is ImageNet or one of its shift sets (case, '-' and '_' ignored: 'imagenet-sketch' is)."""
    info = {_name_key(key): info for key, info in _registry().items()}.get(_name_key(name))
    return info is not None and (info.name == "ImageNet" or info.parent == "ImageNet")


def dataset_names(group: str | None = None) -> list[str]:
    """Registered names in definition order; `group` picks "benchmark" (11), "shift" (4) or "demo"."""
    if group is not None and group not in GROUPS:
        raise DataError(f"unknown dataset group {group!r}; use one of {', '.join(GROUPS)}")
    return [name for name, info in _registry().items() if group is None or info.group == group]


def get_dataset(name: str) -> DatasetInfo:
    """The definition of `name` (case-insensitive)."""
    by_lower = {key.lower(): info for key, info in _registry().items()}
    info = by_lower.get(name.lower())
    if info is None:
        raise DataError(f"unknown dataset {name!r}; valid names: {', '.join(_registry())}")
    return info


def dataset_dir(info: DatasetInfo, data_root: str | Path) -> Path:
    """Where the dataset lives: `data_root/<folder>`."""
    return Path(data_root).expanduser() / info.folder


def required_paths(info: DatasetInfo, data_root: str | Path) -> list[Path]:
    """The files and folders that must exist before extraction, outermost first."""
    root = dataset_dir(info, data_root)
    image_root = root / info.image_dir
    if info.layout == "coop_split":
        return [root, image_root, root / info.split_file]
    if info.layout == "fgvc_variants":
        return [root, image_root, *(root / info.split_file.format(split=s) for s in SPLIT_NAMES)]
    if info.layout == "imagenet":
        return [root, image_root, image_root / "train", image_root / "val"]
    if info.layout == "imagenet_shift":
        return [root, image_root]
    return [root, image_root / "train", image_root / "test"]


def check_layout(info: DatasetInfo, data_root: str | Path) -> Path:
    """Return the dataset folder if every required path exists, else raise a one-line DataError naming the first
    missing one."""
    for path in required_paths(info, data_root):
        if not path.exists():
            raise DataError(f"{path}: not found ({info.name} is not set up under {Path(data_root).expanduser()}); "
                            f"run `python -m data info {info.name}` for the download steps and folder layout")
    return dataset_dir(info, data_root)


def load_benchmark(name: str, data_root: str | Path) -> tuple[Path, list[str], dict[str, list[Sample]]]:
    """Check the layout and list the images of dataset `name` under `data_root`.

    Returns (image_root, class names ready for prompts (`_` -> space), {split: [(path relative to image_root,
    label)]}). coop_split class names come from the split file (CoOp's exact names and labels); they must be the
    same set as the bundled list.
    """
    info = get_dataset(name)
    root = check_layout(info, data_root)
    image_root = root / info.image_dir
    if info.layout == "coop_split":
        classnames, splits = _load_coop_split(info, root / info.split_file, image_root)
    elif info.layout == "fgvc_variants":
        classnames, splits = _load_fgvc(info, root)
    elif info.layout == "imagenet":
        classnames = list(info.classnames)
        splits = {split: scan_class_folders(image_root, {f"{sub}/{f}": i for i, f in enumerate(info.class_folders)})
                  for split, sub in (("train", "train"), ("test", "val"))}
    elif info.layout == "imagenet_shift":
        classnames = list(info.classnames)
        splits = {"test": scan_class_folders(image_root, {f: i for i, f in enumerate(info.class_folders)})}
    else:
        classnames = list(info.classnames)
        splits = {split: scan_class_folders(image_root, {f"{split}/{f}": i for i, f in enumerate(info.class_folders)})
                  for split in SPLIT_NAMES if (image_root / split).is_dir()}
    return image_root, [prompt_classname(c) for c in classnames], splits


def _load_coop_split(info: DatasetInfo, split_path: Path,
                     image_root: Path) -> tuple[list[str], dict[str, list[Sample]]]:
    """Read a CoOp split file and check it against the bundled names and the image folder."""
    classnames, splits = read_split_json(split_path)
    if sorted(classnames) != sorted(info.classnames):
        extra = sorted(set(classnames) - set(info.classnames)) or sorted(set(info.classnames) - set(classnames))
        raise DataError(f"{split_path}: {len(classnames)} classes that differ from the {len(info.classnames)} bundled "
                        f"{info.name} names (e.g. {extra[:1]}); use CoOp's split file for {info.name}")
    for split, samples in splits.items():
        if samples and not (image_root / samples[0][0]).is_file():
            raise DataError(f"{image_root / samples[0][0]}: first {split} image of {split_path.name} not found; "
                            f"check the image folder with `python -m data info {info.name}`")
    return classnames, splits


def _load_fgvc(info: DatasetInfo, root: Path) -> tuple[list[str], dict[str, list[Sample]]]:
    """CoOp's FGVCAircraft: labels follow variants.txt (checked against the bundled list); lines `<id> <variant>`."""
    variants_file = root / "variants.txt"
    fix = "re-extract fgvc-aircraft-2013b/data/"
    if variants_file.is_file() and read_lines(variants_file, fix) != list(info.classnames):
        raise DataError(f"{variants_file}: differs from the bundled FGVCAircraft variants; re-extract "
                        "fgvc-aircraft-2013b/data/")
    label_of = {name: i for i, name in enumerate(info.classnames)}
    splits = {}
    for split in SPLIT_NAMES:
        path = root / info.split_file.format(split=split)
        samples = []
        for n, line in enumerate(read_lines(path, fix), start=1):
            image_id, _, variant = line.partition(" ")
            if variant not in label_of:
                raise DataError(f"{path}:{n}: unknown variant {variant!r}; {fix}")
            samples.append((f"{image_id}.jpg", label_of[variant]))
        splits[split] = samples
    return list(info.classnames), splits
