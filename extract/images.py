"""Image rows for the DataLoader: read an image, preprocess it, make its augmented views; report unreadable ones."""
from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import torch
from PIL import Image

from extract.augment import AugmentedViews


BACKGROUND = (255, 255, 255)  # transparent pixels (RGBA, LA, PA, palette or tRNS transparency) are shown on white


def load_rgb(path: Path) -> Image.Image:
    """Decode an image fully (so truncated files fail here) as RGB; a transparent image is composited on
    BACKGROUND first, so the same visible picture gives the same pixels whatever the file's mode."""
    with Image.open(path) as image:
        if image.mode in ("RGBA", "LA", "PA", "RGBa", "La") or "transparency" in image.info:
            rgba = image.convert("RGBA")
            return Image.alpha_composite(Image.new("RGBA", rgba.size, (*BACKGROUND, 255)), rgba).convert("RGB")
        return image.convert("RGB")


class ImageRows(torch.utils.data.Dataset):
    """Rows `rows` (row ids of the split) whose images are `image_root / paths[row]`; a row's augmented views are
    seeded by its row id.

    Item: dict(row=row id, image=[3, H, W], aug=[A, 3, H, W], error=""), or zero tensors and the error message
    when the image cannot be read (the caller decides to fail or to skip it).
    """

    def __init__(self, image_root: Path, paths: list[str], rows: list[int], preprocess: Callable,
                 augment: AugmentedViews | None, image_size: tuple[int, int]):
        self.image_root, self.paths, self.rows = image_root, paths, rows
        self.preprocess, self.augment, self.image_size = preprocess, augment, image_size

    def __len__(self) -> int:
        return len(self.rows)

    def __getitem__(self, i: int) -> dict:
        row = self.rows[i]
        views = self.augment.views if self.augment else 0
        try:
            image = load_rgb(self.image_root / self.paths[row])
            x = self.preprocess(image)
            aug = self.augment(image, row) if self.augment else torch.zeros(0, 3, *self.image_size)
            error = ""
        except Exception as e:  # any decoder failure is a bad image: reported by path, never a crash in a worker
            x, aug = torch.zeros(3, *self.image_size), torch.zeros(views, 3, *self.image_size)
            error = f"{type(e).__name__}: {str(e).strip().splitlines()[0] if str(e).strip() else 'unreadable'}"
        return {"row": row, "image": x, "aug": aug, "error": error}
