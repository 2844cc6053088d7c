"""The one dataset interface of the extraction stage: class names, prompt templates and split row lists.

Three sources give the same `DatasetSpec`: an image folder (`from_folder`), a CoOp split JSON over an image root
(`from_split_json`) and a benchmark of the `data/` registry (`from_registry`); `from_unlabelled` gives a folder of
images to classify, for another cache's classes. Torch-free.
"""
from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from data.cache import UNLABELLED, CacheError, read_cache
from data.errors import DataError
from data.registry import prompt_classname
from data.splits import IMAGE_SUFFIXES, SPLIT_NAMES, read_split_json, scan_class_folders
from extract.errors import ExtractError, unreadable

DEFAULT_TEMPLATE = "a photo of a {}."
Rows = list[tuple[str, int]]


@dataclass(frozen=True)
class DatasetSpec:
    """A dataset: images at `image_root / relpath`, labels index `classnames`.

    templates: the dataset's own prompt template(s), the main one first. splits: {split: [(relpath, label)]}.
    """

    name: str
    image_root: Path
    classnames: tuple[str, ...]
    templates: tuple[str, ...]
    splits: dict[str, Rows]


def from_folder(root: str | Path, *, split_ratio: tuple[float, float, float] = (0.5, 0.2, 0.3), seed: int = 1,
                classnames_file: str | Path | None = None, template: str = DEFAULT_TEMPLATE,
                name: str | None = None) -> DatasetSpec:
    """An image folder with one sub-folder per class.

    Either `root/{train,val,test}/<class>/...` (the splits as given) or `root/<class>/...` split per class by
    `split_ratio` (train, val, test fractions) with a permutation seeded by `seed`. Class names are the folder names
    with `_` as spaces unless `classnames_file` gives them (see `read_classnames`). Default template: `template`.
    """
    root = Path(root)
    if not root.is_dir():
        raise ExtractError(f"{root}: image folder not found; pass a folder with one sub-folder per class "
                           "(or train/ val/ test/ sub-folders of those)")
    split_dirs = [s for s in SPLIT_NAMES if (root / s).is_dir()]
    class_root = root / "train" if split_dirs else root
    if split_dirs and "train" not in split_dirs:
        raise ExtractError(f"{root}: has {'/ '.join(split_dirs)}/ but no train/ folder; add train/<class>/ folders")
    folders = sorted(p.name for p in class_root.iterdir() if p.is_dir())
    _check_utf8(class_root, folders)
    if not folders:
        raise ExtractError(f"{class_root}: no class sub-folders; put the images of each class in its own folder")
    folder_to_label, classnames = _class_labels(folders, classnames_file)
    if split_dirs:
        splits = {s: _scan(root / s, root, {f: i for f, i in folder_to_label.items() if (root / s / f).is_dir()})
                  for s in split_dirs}
        for s in split_dirs:
            extra = sorted(p.name for p in (root / s).iterdir() if p.is_dir() and p.name not in folder_to_label)
            if extra:
                raise ExtractError(f"{root / s / extra[0]}: class folder not in train/; add it to train/ or remove it")
    else:
        rows = _scan(root, root, folder_to_label)
        splits = split_by_ratio(rows, split_ratio, seed)
        _check_train_rows(root, folder_to_label, rows, splits.get("train", []), split_ratio)
    return DatasetSpec(name or root.name, root, tuple(classnames), (template,), splits)


def from_split_json(json_path: str | Path, image_root: str | Path, *, template: str = DEFAULT_TEMPLATE,
                    name: str | None = None) -> DatasetSpec:
    """A CoOp split file (`split_zhou_<Name>.json`: train/val/test lists of [relpath, label, classname]).

    Class names get CoOp's `_` -> space, as the benchmarks of `data/` do.
    """
    image_root = Path(image_root)
    if not image_root.is_dir():
        raise ExtractError(f"{image_root}: image root not found; pass the folder the split file's paths start from")
    try:
        classnames, splits = read_split_json(json_path)
    except DataError as e:
        raise ExtractError(str(e)) from None
    default_name = Path(json_path).stem.removeprefix("split_zhou_")
    return DatasetSpec(name or default_name, image_root, tuple(prompt_classname(c) for c in classnames), (template,),
                       splits)


def from_registry(name: str, data_root: str | Path) -> DatasetSpec:
    """A benchmark defined in `data/` (its own template, then its ensemble), laid out under `data_root`."""
    from data.registry import get_dataset, load_benchmark

    try:
        info = get_dataset(name)
        image_root, classnames, splits = load_benchmark(name, data_root)
    except DataError as e:
        raise ExtractError(str(e)) from None
    return DatasetSpec(info.name, Path(image_root), tuple(classnames), (info.template, *info.ensemble), splits)


def from_unlabelled(root: str | Path, *, classes_from: str | Path | None = None,
                    classnames_file: str | Path | None = None, template: str = DEFAULT_TEMPLATE,
                    split: str = "test", name: str | None = None) -> DatasetSpec:
    """Every image under `root` (recursively, sorted) as one split `split` with label `UNLABELLED` (-1).

    The classes come from exactly one of: `classes_from`, a cache (its class names and its full template list, so
    the prototypes equal that cache's), or `classnames_file`, one class name per line in label order (with
    `template` as the dataset's own template).
    """
    root = Path(root)
    if not root.is_dir():
        raise ExtractError(f"{root}: image folder not found; pass the folder of images to classify")
    if not split or "/" in split:
        raise ExtractError(f"split name {split!r}: give a name without '/', e.g. test")
    if (classes_from is None) == (classnames_file is None):
        raise ExtractError("--unlabelled needs exactly one of --classes-from TRAIN.h5 (the training cache) or "
                           "--classnames FILE (one class name per line) to know the classes")
    if classes_from is not None:
        try:
            cache = read_cache(classes_from, splits=[], with_aug=False)
        except CacheError as e:
            raise ExtractError(str(e)) from None
        classnames, templates = tuple(cache.classnames), tuple(cache.templates)
    else:
        path = Path(classnames_file)
        try:
            classnames = tuple(ln.strip() for ln in path.read_text(encoding="utf-8").splitlines() if ln.strip())
        except (OSError, UnicodeDecodeError) as e:
            raise ExtractError(f"{path}: cannot read the class-name file ({unreadable(e)}); check --classnames") \
                from None
        if not classnames:
            raise ExtractError(f"{path}: no class names; write one class name per line")
        templates = (template,)
    images = sorted(p.relative_to(root).as_posix() for p in root.rglob("*")
                    if p.suffix.lower() in IMAGE_SUFFIXES and p.is_file())
    if not images:
        raise ExtractError(f"{root}: holds no image ({', '.join(IMAGE_SUFFIXES)}); put the images to classify in it")
    _check_utf8(root, images)
    return DatasetSpec(name or root.name, root, classnames, templates, {split: [(p, UNLABELLED) for p in images]})


def read_classnames(path: str | Path, folders: list[str]) -> tuple[dict[str, int], list[str]]:
    """Read a class-name list: labels follow the file's line order.

    Each line is `folder<TAB>class name`, or `folder class name` (as CoOp's ImageNet `classnames.txt`), or just a
    class name (then lines match the sorted folder names one to one). Blank lines are ignored.
    """
    path = Path(path)
    try:
        lines = [ln.strip() for ln in path.read_text(encoding="utf-8").splitlines() if ln.strip()]
    except (OSError, UnicodeDecodeError) as e:
        raise ExtractError(f"{path}: cannot read the class-name file ({unreadable(e)}); check --classnames") \
            from None
    known = set(folders)
    if all("\t" in ln for ln in lines):
        pairs = [tuple(part.strip() for part in ln.split("\t", 1)) for ln in lines]
    elif all(ln.split(maxsplit=1)[0] in known and " " in ln for ln in lines):
        pairs = [tuple(ln.split(maxsplit=1)) for ln in lines]
    else:
        if len(lines) != len(folders):
            raise ExtractError(f"{path}: {len(lines)} class names for {len(folders)} class folders; write one name "
                               "per folder (sorted folder order) or 'folder<TAB>name' lines")
        pairs = list(zip(folders, lines))
    mapping = {folder: label for label, (folder, _) in enumerate(pairs)}
    missing = sorted(known - set(mapping))
    unknown = sorted(set(mapping) - known)
    if missing or unknown or len(mapping) != len(pairs):
        what = (f"folder {missing[0]!r} has no name" if missing else f"folder {unknown[0]!r} does not exist"
                if unknown else "a folder is named twice")
        raise ExtractError(f"{path}: {what}; give exactly one line per class folder")
    return mapping, [name for _, name in pairs]


def split_by_ratio(rows: Rows, ratio: tuple[float, float, float], seed: int) -> dict[str, Rows]:
    """Split rows per class into train/val/test by `ratio`, with a permutation seeded by `seed`.

    Each class's sorted rows are permuted; the first round(r_train * n) go to train, the next round(r_val * n) to
    val, the rest to test. Splits keep the input order; empty splits are left out.
    """
    if len(ratio) != 3 or min(ratio) < 0 or abs(sum(ratio) - 1) > 1e-6:
        raise ExtractError(f"split ratio {ratio} must be three non-negative fractions summing to 1, e.g. 0.5,0.2,0.3")
    rng = np.random.default_rng(seed)
    labels = np.array([label for _, label in rows], dtype=np.int64)
    which = np.empty(len(rows), dtype=np.int64)
    for label in np.unique(labels):
        idx = np.flatnonzero(labels == label)
        idx = idx[rng.permutation(len(idx))]
        n_train, n_val = round(ratio[0] * len(idx)), round(ratio[1] * len(idx))
        which[idx[:n_train]], which[idx[n_train:n_train + n_val]], which[idx[n_train + n_val:]] = 0, 1, 2
    splits = {s: [row for row, w in zip(rows, which) if w == k] for k, s in enumerate(SPLIT_NAMES)}
    return {s: r for s, r in splits.items() if r}


def _class_labels(folders: list[str], classnames_file: str | Path | None) -> tuple[dict[str, int], list[str]]:
    """Folder -> label and class names by label, from the folders or a class-name file."""
    if classnames_file is not None:
        return read_classnames(classnames_file, folders)
    return {f: i for i, f in enumerate(folders)}, [prompt_classname(f) for f in folders]


def _check_utf8(folder: Path, names: list[str]) -> None:
    """Refuse file or folder names that are not valid UTF-8 (the cache stores paths as UTF-8)."""
    for name in names:
        try:
            name.encode("utf-8")
        except UnicodeEncodeError:
            raise ExtractError(f"{os.fsencode(folder / name)!r}: file name is not valid UTF-8; rename it (e.g. "
                               "`convmv -f latin1 -t utf8 -r --notest DIR`) or move it out of the folder") from None


def _check_train_rows(root: Path, folder_to_label: dict[str, int], rows: Rows, train: Rows,
                      ratio: tuple[float, float, float]) -> None:
    """Refuse a split that leaves a class without train images (e.g. a class of one image)."""
    have = {label for _, label in train}
    for folder, label in folder_to_label.items():
        if label not in have:
            n = sum(lab == label for _, lab in rows)
            raise ExtractError(f"{root / folder}: {n} image{'s' if n != 1 else ''}, too few to split by "
                               f"{','.join(f'{r:g}' for r in ratio)} (train,val,test): the class gets no train image; "
                               "add images, remove the folder, or give train/ val/ test/ folders")


def _scan(folder: Path, root: Path, folder_to_label: dict[str, int]) -> Rows:
    """Images of `folder/<class>/` as (path relative to `root`, label); an empty class folder is an error."""
    try:
        rows = scan_class_folders(folder, folder_to_label)
    except DataError as e:
        raise ExtractError(str(e)) from None
    _check_utf8(folder, [rel for rel, _ in rows])
    prefix = folder.relative_to(root).as_posix()
    return rows if prefix == "." else [(f"{prefix}/{rel}", label) for rel, label in rows]
