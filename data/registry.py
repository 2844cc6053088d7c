"""The dataset registry: definitions from `datasets.json` + `classnames/`, layout checks and split loading.

`load_benchmark(name, data_root)` returns what the extraction stage needs: the image root, the class names as they
go into prompts, and `{split: [(relpath, label), ...]}`. Layout kinds (the `layout` field of `datasets.json`):

- `coop_split`: CoOp's `split_zhou_<Name>.json` over `image_dir` (train/val/test).
- `fgvc_variants`: FGVC-Aircraft's own `images_variant_{train,val,test}.txt` lists, as CoOp reads them.
- `imagenet`: `images/train/<wnid>/` and `images/val/<wnid>/`; as in CoOp, val is returned as the `test` split.
- `imagenet_shift`: one folder per class under `image_dir` (wnids, or `0`..`999` for ImageNet-V2); `test` only.
- `split_folders`: `<split>/<class folder>/` image trees (the offline Fashion-MNIST demo).

A dataset may also accept the folder its archive unpacks to (`archive_dirs`, e.g. ImageNet-Sketch's `sketch/`) in
place of `image_dir`. Names are matched ignoring case, '-' and '_', and by their `aliases` (the names CoOp's code
gives the datasets, e.g. `DescribableTextures`); `resolve_names` turns what a user typed into registry entries.
"""
from __future__ import annotations

import json
from dataclasses import dataclass, field
from functools import lru_cache
from pathlib import Path
from types import MappingProxyType
from typing import Any, Iterable, Mapping

from data.errors import DataError
from data.splits import IMAGE_SUFFIXES, SPLIT_NAMES, Sample, missing_files, read_split_json, scan_class_folders

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
    archive_dirs: tuple[str, ...] = ()
    aliases: tuple[str, ...] = ()
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
        archive_dirs=tuple(entry.get("archive_dirs", ())), aliases=tuple(entry.get("aliases", ())),
        download=MappingProxyType(download))


def ensemble_templates() -> tuple[str, ...]:
    """CLIP's 7-template ImageNet prompt ensemble (`datasets.json`), as Tip-Adapter uses it."""
    return next(iter(_registry().values())).ensemble


def _name_key(name: str) -> str:
    return "".join(ch for ch in name.lower() if ch.isalnum())


@lru_cache(maxsize=1)
def _by_key() -> dict[str, DatasetInfo]:
    """Every name and alias, as `_name_key`, -> its definition."""
    return {_name_key(key): info for info in _registry().values() for key in (info.name, *info.aliases)}


def find_dataset(name: str) -> DatasetInfo | None:
    """The definition of `name`, ignoring case, '-' and '_' and accepting aliases ('imagenet-v2', 'dtd',
    'DescribableTextures'); None when it is not registered."""
    return _by_key().get(_name_key(name))


def in_imagenet_family(name: str) -> bool:
    """Whether `name` is ImageNet or one of its shift sets (case, '-' and '_' ignored: 'imagenet-sketch' is)."""
    info = find_dataset(name)
    return info is not None and (info.name == "ImageNet" or info.parent == "ImageNet")


def dataset_names(group: str | None = None) -> list[str]:
    """Registered names in definition order; `group` picks "benchmark" (11), "shift" (4) or "demo"."""
    if group is not None and group not in GROUPS:
        raise DataError(f"unknown dataset group {group!r}; use one of {', '.join(GROUPS)}")
    return [name for name, info in _registry().items() if group is None or info.group == group]


def get_dataset(name: str) -> DatasetInfo:
    """The definition of `name` (see `find_dataset`); DataError naming the valid names when there is none."""
    info = find_dataset(name)
    if info is None:
        raise DataError(f"unknown dataset {name!r}; valid names: {', '.join(_registry())}")
    return info


NAME_GROUPS = {"all": ("benchmark", "shift"), "benchmarks": ("benchmark",), "shifts": ("shift",)}


def resolve_names(words: Iterable[str]) -> list[DatasetInfo]:
    """The datasets a user named, as typed (any case, '-'/'_', aliases; words may hold several names separated by
    spaces or commas; `all` = the 11 benchmarks and the 4 shift sets, `benchmarks`, `shifts`), each once, in the
    order given. Raises DataError for an unknown name or for a test-only set named without its training set
    (ImageNetV2 without ImageNet)."""
    infos: dict[str, DatasetInfo] = {}
    for word in (w for text in words for w in text.replace(",", " ").split()):
        groups = NAME_GROUPS.get(word.lower())
        for info in ([i for i in _registry().values() if i.group in groups] if groups else [get_dataset(word)]):
            infos.setdefault(info.name, info)
    if not infos:
        raise DataError("no dataset named; give names from `python -m data list`, or all / benchmarks")
    for info in infos.values():
        if info.parent is not None and info.parent not in infos:
            raise DataError(f"{info.name} is a test-only set of {info.parent} (a model trained on {info.parent} is "
                            f"evaluated on it): name {info.parent} too, e.g. --datasets \"{info.parent} {info.name}\"")
    return list(infos.values())


def display_order(names: Iterable[str]) -> list[str]:
    """`names` once each, in registry order (the 11 benchmarks, the 4 shift sets, the demo), then the others
    alphabetically: the one order of datasets in tables and plots."""
    rank = {name: i for i, name in enumerate(_registry())}

    def key(name: str) -> tuple[int, str]:
        info = find_dataset(name)
        return (rank[info.name] if info else len(rank), name)
    return sorted(dict.fromkeys(names), key=key)


def image_root(info: DatasetInfo, data_root: str | Path) -> Path:
    """The folder the images lie under: `image_dir`, or the first of `archive_dirs` that exists instead."""
    root = dataset_dir(info, data_root)
    for folder in info.archive_dirs:
        if not (root / info.image_dir).exists() and (root / folder).is_dir():
            return root / folder
    return root / info.image_dir


def dataset_dir(info: DatasetInfo, data_root: str | Path) -> Path:
    """Where the dataset lives: `data_root/<folder>`."""
    return Path(data_root).expanduser() / info.folder


def required_paths(info: DatasetInfo, data_root: str | Path) -> list[Path]:
    """The files and folders that must exist before extraction, outermost first."""
    root = dataset_dir(info, data_root)
    images = image_root(info, data_root)
    if info.layout == "coop_split":
        return [root, images, root / info.split_file]
    if info.layout == "fgvc_variants":
        return [root, images, *(root / info.split_file.format(split=s) for s in SPLIT_NAMES)]
    if info.layout == "imagenet":
        return [root, images, images / "train", images / "val"]
    if info.layout == "imagenet_shift":
        return [root, images]
    return [root, images / "train", images / "test"]


def check_layout(info: DatasetInfo, data_root: str | Path) -> Path:
    """Return the dataset folder if every required path exists, else raise a one-line DataError naming the first
    missing one."""
    for path in required_paths(info, data_root):
        if not path.exists():
            instead = "".join(f" (nor {f}/, the folder its archive unpacks to)" for f in info.archive_dirs[:1]
                              if path == dataset_dir(info, data_root) / info.image_dir)
            raise DataError(f"{path}: not found{instead}; {info.name} is not set up under "
                            f"{Path(data_root).expanduser()}: run `python -m data info {info.name}` for the download "
                            "steps and folder layout")
    return dataset_dir(info, data_root)


def load_benchmark(name: str, data_root: str | Path, *, every_file: bool = False
                   ) -> tuple[Path, list[str], dict[str, list[Sample]]]:
    """Check the layout and list the images of dataset `name` under `data_root`.

    Returns (image_root, class names ready for prompts (`_` -> space), {split: [(path relative to image_root,
    label)]}). coop_split class names come from the split file (CoOp's exact names and labels); they must be the
    same set as the bundled list. Listed files are checked to exist: the first of each split, or with `every_file`
    every one (a stat each), refused with the count missing and the first few names.
    """
    info = get_dataset(name)
    root = check_layout(info, data_root)
    images = image_root(info, data_root)
    scan = lambda prefix: scan_class_folders(  # noqa: E731
        images, {f"{prefix}{f}": i for i, f in enumerate(info.class_folders)}, name=info.name)
    if info.layout == "coop_split":
        classnames, splits = _load_coop_split(info, root / info.split_file, images, first_only=not every_file)
    elif info.layout == "fgvc_variants":
        classnames, splits = _load_fgvc(info, root)
    elif info.layout == "imagenet":
        _check_sorted(info, images / "val")
        classnames = list(info.classnames)
        splits = {"train": scan("train/"), "test": scan("val/")}
    elif info.layout == "imagenet_shift":
        classnames = list(info.classnames)
        splits = {"test": scan("")}
    else:
        classnames = list(info.classnames)
        splits = {split: scan(f"{split}/") for split in SPLIT_NAMES if (images / split).is_dir()}
    if every_file:
        _check_files(info, images, splits)
    return images, [prompt_classname(c) for c in classnames], splits


SHOWN_MISSING = 3  # missing files named in the error


def _check_files(info: DatasetInfo, images: Path, splits: dict[str, list[Sample]]) -> None:
    """Refuse listed images that are not files under `images`: how many per split, and the first few names."""
    missing = {split: missing_files(images, samples) for split, samples in splits.items()}
    total = sum(map(len, missing.values()))
    if total:
        listed = sum(map(len, splits.values()))
        counts = ", ".join(f"{split} {len(m):,}" for split, m in missing.items() if m)
        first = ", ".join([rel for m in missing.values() for rel in m][:SHOWN_MISSING])
        raise DataError(f"{images}: {total:,} of the {listed:,} listed images are missing ({counts}), e.g. {first}; "
                        f"extract the image archive again (`python -m data info {info.name}`)")


def _check_sorted(info: DatasetInfo, folder: Path) -> None:
    """Refuse a folder that holds its images loose instead of in the class folders (ImageNet's val/ as shipped)."""
    loose = sum(1 for p in folder.iterdir() if p.suffix.lower() in IMAGE_SUFFIXES and p.is_file())
    if loose:
        raise DataError(f"{folder}: {loose} images lie loose in the folder, as ILSVRC2012_img_val.tar ships them; "
                        f"sort them into the {len(info.class_folders):,} wnid class folders (e.g. with valprep.sh of "
                        f"soumith/imagenetloader.torch; `python -m data info {info.name}`)")


def _load_coop_split(info: DatasetInfo, split_path: Path, image_root: Path,
                     first_only: bool = True) -> tuple[list[str], dict[str, list[Sample]]]:
    """Read a CoOp split file and check it against the bundled names (and, `first_only`, that each split's first
    image exists)."""
    classnames, splits = read_split_json(split_path, name=info.name)
    if sorted(classnames) != sorted(info.classnames):
        extra = sorted(set(classnames) - set(info.classnames)) or sorted(set(info.classnames) - set(classnames))
        raise DataError(f"{split_path}: {len(classnames)} classes that differ from the {len(info.classnames)} bundled "
                        f"{info.name} names (e.g. {extra[:1]}); use CoOp's split file for {info.name}")
    for split, samples in splits.items() if first_only else ():
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
