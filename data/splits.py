"""Read CoOp split files and class-folder image trees as (relative path, label) lists."""
from __future__ import annotations

import json
from pathlib import Path

from data.errors import DataError

IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png", ".bmp", ".gif", ".webp", ".tif", ".tiff")
SPLIT_NAMES = ("train", "val", "test")

Sample = tuple[str, int]


def _see(name: str | None) -> str:
    """The pointer at a registered dataset's layout and download steps that ends an error message."""
    return f"see `python -m data info {name}`" if name else "check the folder and the path given"


def read_split_json(path: str | Path, name: str | None = None) -> tuple[list[str], dict[str, list[Sample]]]:
    """Read a CoOp ``split_zhou_<Name>.json`` (of registered dataset ``name``, which error messages point at).

    The file holds ``{"train"|"val"|"test": [[relpath, label, classname], ...]}``. Returns the class names
    indexed by label (taken from the entries) and ``{split: [(relpath, label), ...]}`` in file order.
    """
    path = Path(path)
    try:
        raw = json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise DataError(f"{path}: split file not found; download it ({_see(name)})") from None
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise DataError(f"{path}: not a readable JSON split file ({exc}); download it again") from None
    if not isinstance(raw, dict) or not any(name in raw for name in SPLIT_NAMES):
        raise DataError(f"{path}: expected a JSON object with 'train'/'val'/'test' lists; download it again")
    names: dict[int, str] = {}
    splits: dict[str, list[Sample]] = {}
    for split in SPLIT_NAMES:
        if split not in raw:
            continue
        entries = raw[split]
        if not isinstance(entries, list):
            raise DataError(f"{path}: '{split}' must be a list of [relpath, label, classname]; download it again")
        samples = []
        for i, entry in enumerate(entries):
            samples.append(_parse_entry(path, split, i, entry, names))
        splits[split] = samples
    if not names:
        raise DataError(f"{path}: the split file has no entries; download it again")
    missing = sorted(set(range(max(names) + 1)) - set(names))
    if missing:
        raise DataError(f"{path}: labels {missing[:5]} never occur, so class names are incomplete; download it again")
    return [names[label] for label in range(len(names))], splits


def _parse_entry(path: Path, split: str, i: int, entry: object, names: dict[int, str]) -> Sample:
    """Check one ``[relpath, label, classname]`` entry and record its class name."""
    where = f"{path}: {split}[{i}]"
    if not (isinstance(entry, list) and len(entry) == 3):
        raise DataError(f"{where} = {entry!r} is not [relpath, label, classname]; download the split file again")
    relpath, label, classname = entry
    if not isinstance(relpath, str) or not relpath:
        raise DataError(f"{where}: image path {relpath!r} is not a non-empty string; download the split file again")
    if isinstance(label, bool) or not isinstance(label, int) or label < 0:
        raise DataError(f"{where}: label {label!r} is not a non-negative integer; download the split file again")
    if not isinstance(classname, str) or not classname:
        raise DataError(f"{where}: class name {classname!r} is not a non-empty string; download the split file again")
    known = names.setdefault(label, classname)
    if known != classname:
        raise DataError(f"{where}: label {label} is named both {known!r} and {classname!r}; "
                        "download the split file again")
    return relpath, label


def scan_class_folders(root: str | Path, folder_to_label: dict[str, int], name: str | None = None) -> list[Sample]:
    """List the images under ``root/<folder>/`` (recursive) for every folder of ``folder_to_label`` (of registered
    dataset ``name``, which error messages point at).

    Returns ``[(path relative to root, label), ...]`` sorted by folder order of the mapping, then by path.
    Raises DataError if ``root`` or a folder is missing or a folder holds no image.
    """
    root = Path(root)
    if not root.is_dir():
        raise DataError(f"{root}: image folder not found; check the data root ({_see(name)})")
    samples: list[Sample] = []
    for folder, label in folder_to_label.items():
        class_dir = root / folder
        if not class_dir.is_dir():
            raise DataError(f"{class_dir}: class folder not found; check the layout ({_see(name)})")
        images = sorted(p.relative_to(root).as_posix() for p in class_dir.rglob("*")
                        if p.suffix.lower() in IMAGE_SUFFIXES and p.is_file())
        if not images:
            raise DataError(f"{class_dir}: class folder holds no image ({', '.join(IMAGE_SUFFIXES)}); "
                            "re-extract the dataset")
        samples.extend((rel, label) for rel in images)
    return samples


def missing_files(root: str | Path, samples: list[Sample]) -> list[str]:
    """The relative paths of ``samples`` that are not files under ``root`` (one stat each, no decoding)."""
    root = Path(root)
    return [rel for rel, _ in samples if not (root / rel).is_file()]
