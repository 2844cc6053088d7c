"""Set a dataset up under a data root: torchvision's downloaders where they exist, else the manual steps.

The CoOp split file comes first (a few MB from Google Drive with `gdown`, pinned in requirements.txt), so a
missing piece fails in seconds, before an image archive of up to tens of GB. torchvision is imported only when
downloading; its files go to `DATA/_torchvision/<Name>/` and the folders CoOp's layout expects are symlinked to them.
"""
from __future__ import annotations

import sys
from pathlib import Path

from data.errors import DataError
from data.fashion_mnist import build as build_fashion_mnist
from data.registry import DatasetInfo, check_layout, dataset_dir, required_paths
from data.splits import read_split_json

GDRIVE_URL = "https://drive.google.com/uc?id={id}"  # what gdown fetches a file id from
GDRIVE_VIEW = "https://drive.google.com/file/d/{id}/view"  # the same file in a browser
TIMEOUT_S = 30  # per connection attempt and read: a network that answers nothing fails within this

DEMO_COUNTS = {"train_per_class": 16, "val_per_class": 4, "test_per_class": 50}


def describe(info: DatasetInfo) -> str:
    """Human-readable definition: classes, prompt, expected layout under DATA and the manual steps."""
    root = Path("DATA")
    alternative = {root / info.folder / info.image_dir: "".join(f" (or {(root / info.folder / f).as_posix()}/, as "
                                                                f"its archive unpacks)" for f in info.archive_dirs)}
    tree = "\n".join(f"  {path.as_posix()}{alternative.get(path, '')}" for path in required_paths(info, root)[1:])
    if info.group == "demo":
        auto = "yes (Debian package)"
    elif info.torchvision:
        split = "the CoOp split file (gdown), then " if info.download.get("split_gdrive_id") else ""
        auto = f"yes ({split}torchvision.datasets.{info.torchvision})"
    else:
        auto = "no: follow the steps" + (" (the split file is fetched with gdown)" if
                                         info.download.get("split_gdrive_id") else "")
    lines = [
        f"{info.name} ({info.group}{', test only' if info.eval_only else ''}): {len(info.classnames)} classes, "
        f"layout {info.layout}",
        f"prompt: {info.template!r} (+ the {len(info.ensemble)}-template ImageNet ensemble)",
        *([f"classes map into {info.parent} (same class names)"] if info.parent else []),
        f"folder: DATA/{info.folder}/ must contain",
        tree,
        f"automatic download (`python -m data download {info.name} --root DATA`): {auto}",
        "manual steps:",
        *(f"  {i}. {step}" for i, step in enumerate(info.steps.splitlines(), start=1)),
    ]
    return "\n".join(lines)


def download(info: DatasetInfo, data_root: str | Path) -> Path:
    """Download and lay out `info` under `data_root`; return the dataset folder once `check_layout` passes.

    Raises DataError with the manual steps' pointer when the dataset cannot be fetched automatically.
    """
    data_root = Path(data_root).expanduser()
    if info.group == "demo":
        build_fashion_mnist(dataset_dir(info, data_root), **DEMO_COUNTS)
        return check_layout(info, data_root)
    try:
        return check_layout(info, data_root)
    except DataError:
        if not info.torchvision and not info.download.get("split_gdrive_id"):
            raise DataError(f"{info.name} cannot be downloaded automatically; follow the steps of "
                            f"`python -m data info {info.name}`") from None
    split_id = info.download.get("split_gdrive_id")
    if split_id and not (dataset_dir(info, data_root) / info.split_file).is_file():
        fetch_split_file(split_id, dataset_dir(info, data_root) / info.split_file, info.name)
    if not info.torchvision:
        try:
            return check_layout(info, data_root)
        except DataError:
            raise DataError(f"{info.name}: the split file is in {dataset_dir(info, data_root)}; the images cannot be "
                            f"downloaded automatically: follow the steps of `python -m data info {info.name}`") from None
    _torchvision_fetch(info, data_root)
    return check_layout(info, data_root)


def _torchvision_fetch(info: DatasetInfo, data_root: Path) -> None:
    """Run torchvision's downloader(s) into DATA/_torchvision/<Name>/ and symlink CoOp's folders to them."""
    from torchvision import datasets

    tv_root = data_root / "_torchvision" / info.name
    tv_root.mkdir(parents=True, exist_ok=True)
    for kwargs in info.download.get("calls", [{}]):
        try:
            getattr(datasets, info.torchvision)(root=str(tv_root), download=True, **kwargs)
        except Exception as exc:  # torchvision raises many kinds (URL, checksum, missing scipy/gdown)
            raise DataError(f"torchvision.datasets.{info.torchvision} download into {tv_root} failed "
                            f"({type(exc).__name__}: {exc}); see `python -m data info {info.name}`") from None
    folder = dataset_dir(info, data_root)
    for dest, src in info.download.get("links", {}).items():
        link, target = (folder / dest) if dest != "." else folder, (tv_root / src).resolve()
        if link.exists():
            continue
        if not target.exists():
            raise DataError(f"{target}: not found after the torchvision download; follow "
                            f"`python -m data info {info.name}`")
        link.parent.mkdir(parents=True, exist_ok=True)
        link.symlink_to(target, target_is_directory=target.is_dir())


def fetch_split_file(file_id: str, path: Path, name: str) -> Path:
    """Fetch CoOp's split file `path` of dataset `name` from Google Drive with gdown and check that it reads as a
    split file; written to `path.part` and renamed, so a failure leaves nothing at `path`. Returns `path`."""
    fix = f"download it by hand from {GDRIVE_VIEW.format(id=file_id)} into {path.parent}/ (`python -m data info {name}`)"
    try:
        import gdown
    except ModuleNotFoundError:
        raise DataError(f"{path.name}: gdown is not installed; `pip install -r requirements.txt` (it pins gdown) or "
                        f"{fix}") from None
    path.parent.mkdir(parents=True, exist_ok=True)
    part = path.with_name(path.name + ".part")
    try:
        gdown.download(url=GDRIVE_URL.format(id=file_id), output=str(part), quiet=not sys.stderr.isatty(),
                       timeout=TIMEOUT_S)
        if not part.is_file():
            raise OSError("no file was written")
        read_split_json(part, name=name)
    except Exception as exc:  # network, Google Drive quota (an HTML page instead of JSON), disk
        part.unlink(missing_ok=True)
        why = str(exc).strip().splitlines()[0][:200] if str(exc).strip() else ""
        raise DataError(f"{path}: Google Drive download failed ({type(exc).__name__}: {why}); check the "
                        f"network, or {fix}") from None
    part.replace(path)
    return path
