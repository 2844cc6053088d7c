"""Seeded augmented views (RandomResizedCrop + horizontal flip, as Tip-Adapter's cache keys).

Each view draws from its own generator seeded by (aug_seed, global row index, view), so a row's views do not depend
on batching, workers or sharding. Crop size, scale, ratio and interpolation come from open_clip's training
transform, as do the tensor conversion and normalisation that follow.
"""
from __future__ import annotations

import json
import math

import numpy as np
import torch
from open_clip.transform import AugmentationCfg, PreprocessCfg, image_transform_v2
from PIL import Image
from torchvision.transforms import Compose, RandomResizedCrop
from torchvision.transforms import functional as TF

AUG_SCALE = (0.5, 1.0)
FLIP_P = 0.5


class AugmentedViews:
    """PIL image -> [A, 3, H, W] tensor of A seeded views."""

    def __init__(self, preprocess_cfg: dict, views: int, seed: int):
        train = image_transform_v2(PreprocessCfg(**preprocess_cfg), is_train=True,
                                   aug_cfg=AugmentationCfg(scale=AUG_SCALE))
        crop, *tail = train.transforms
        if not isinstance(crop, RandomResizedCrop):
            raise TypeError(f"open_clip's training transform starts with {crop!r}, not RandomResizedCrop")
        self.crop, self.finish, self.views, self.seed = crop, Compose(tail), views, seed

    def describe(self) -> str:
        """JSON description of the augmentation, for the cache's `aug` attribute."""
        return json.dumps({"views": self.views, "crop": "RandomResizedCrop", "size": list(self.crop.size),
                           "scale": list(self.crop.scale), "ratio": list(self.crop.ratio),
                           "interpolation": self.crop.interpolation.value, "hflip_p": FLIP_P,
                           "rng": "numpy default_rng([aug_seed, row index in the full split, view])"},
                          sort_keys=True)

    def __call__(self, image: Image.Image, row: int) -> torch.Tensor:
        out = []
        for view in range(self.views):
            rng = np.random.default_rng([self.seed, row, view])
            top, left, h, w = crop_box(image.height, image.width, rng, self.crop.scale, self.crop.ratio)
            crop = TF.resized_crop(image, top, left, h, w, list(self.crop.size), self.crop.interpolation,
                                   antialias=True)
            if rng.random() < FLIP_P:
                crop = TF.hflip(crop)
            out.append(self.finish(crop))
        if not out:
            return torch.zeros(0, 3, *self.crop.size)
        return torch.stack(out)


def crop_box(height: int, width: int, rng: np.random.Generator, scale: tuple[float, float],
             ratio: tuple[float, float]) -> tuple[int, int, int, int]:
    """(top, left, h, w) of a random crop: torchvision's RandomResizedCrop.get_params drawn from `rng`."""
    area = height * width
    log_ratio = (math.log(ratio[0]), math.log(ratio[1]))
    for _ in range(10):
        target_area = area * rng.uniform(scale[0], scale[1])
        aspect = math.exp(rng.uniform(log_ratio[0], log_ratio[1]))
        w = int(round(math.sqrt(target_area * aspect)))
        h = int(round(math.sqrt(target_area / aspect)))
        if 0 < w <= width and 0 < h <= height:
            return int(rng.integers(0, height - h + 1)), int(rng.integers(0, width - w + 1)), h, w
    in_ratio = width / height
    if in_ratio < min(ratio):
        w, h = width, int(round(width / min(ratio)))
    elif in_ratio > max(ratio):
        h, w = height, int(round(height * max(ratio)))
    else:
        w, h = width, height
    return (height - h) // 2, (width - w) // 2, h, w
