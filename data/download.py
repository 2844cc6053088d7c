"""Set a dataset up under a data root: torchvision's downloaders where they exist, else the manual steps.

torchvision is imported only when downloading. Its files go to `DATA/_torchvision/<Name>/` and the folders CoOp's
layout expects are symlinked to them; CoOp split files are fetched from Google Drive with torchvision's helper
(needs `gdown`).
"""
from __future__ import annotations

from pathlib import Path

from data.errors import DataError
from data.fashion_mnist import build as build_fashion_mnist
from data.registry import DatasetInfo, check_layout, dataset_dir, required_paths

DEMO_COUNTS = {"train_per_class": 16, "val_per_class": 4, "test_per_class": 50}


def describe(info: DatasetInfo) -> str:
    """Human-readable definition: classes, prompt, expected layout under DATA and the manual steps."""
    root = Path("DATA")
    tree = "\n".join(f"  {path.as_posix()}" for path in required_paths(info, root)[1:])
    if info.group == "demo":
        auto = "yes (Debian package)"
    elif info.torchvision:
        split = " + the CoOp split file via gdown" if info.download.get("split_gdrive_id") else ""
        auto = f"yes (torchvision.datasets.{info.torchvision}{split})"
    else:
        auto = "no: follow the steps" + (" (the split file is fetched via gdown)" if
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
    if info.torchvision:
        _torchvision_fetch(info, data_root)
    split_id = info.download.get("split_gdrive_id")
    if split_id and not (dataset_dir(info, data_root) / info.split_file).is_file():
        _gdrive_fetch(split_id, dataset_dir(info, data_root), info.split_file, info.name)
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


def _gdrive_fetch(file_id: str, folder: Path, filename: str, name: str) -> None:
    """Fetch a CoOp split file from Google Drive with torchvision's helper."""
    from torchvision.datasets.utils import download_file_from_google_drive

    try:
        download_file_from_google_drive(file_id, str(folder), filename)
    except Exception as exc:  # gdown missing, quota, network
        raise DataError(f"{folder / filename}: Google Drive download failed ({type(exc).__name__}: {exc}); "
                        f"`pip install gdown` or download it by hand (`python -m data info {name}`)") from None
