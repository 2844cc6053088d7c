"""Shared pieces of the extract/ tests: generated images, the tiny random model, plain-loop reference features."""
from __future__ import annotations

import functools
import hashlib
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from extract.datasets import DatasetSpec
from extract.models import LoadedModel, load_model
from extract.prompts import cache_templates

TINY = "cmm-tiny-vit"  # extract/model_configs/cmm-tiny-vit.json: ViT width 64, 1 layer, 32 px, embed_dim 32
CLASSES = ("cat", "dog", "red_fox")


def make_images(folder: Path, n: int, seed: int) -> None:
    """`n` random RGB PNGs of varying size in `folder`."""
    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    for i in range(n):
        pixels = rng.integers(0, 256, size=(36 + 3 * i, 44 + 2 * i, 3), dtype=np.uint8)
        Image.fromarray(pixels).save(folder / f"img{i:02d}.png")


def make_class_folder(root: Path, per_class: int = 5, classes: tuple[str, ...] = CLASSES) -> Path:
    """root/<class>/imgNN.png for every class; returns root."""
    for label, name in enumerate(classes):
        make_images(root / name, per_class, seed=label)
    return root


@functools.cache
def tiny_model() -> LoadedModel:
    """The tiny open_clip model with its (seeded) random init, loaded once per test session."""
    return load_model(TINY, "random")


def templates(spec: DatasetSpec) -> list[str]:
    return cache_templates(spec.templates)


def digest(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


@torch.inference_mode()
def plain_image_features(model: torch.nn.Module, preprocess, paths: list[Path]) -> np.ndarray:
    """Reference features [N, D]: one image at a time, no DataLoader, normalised by hand."""
    out = []
    for path in paths:
        with Image.open(path) as image:
            z = model.encode_image(preprocess(image.convert("RGB"))[None])[0]
        out.append((z / z.norm()).numpy())
    return np.stack(out)


@torch.inference_mode()
def plain_text_features(loaded: LoadedModel, classnames: list[str], prompts: list[str]) -> np.ndarray:
    """Reference text features [C, P, D]: one prompt at a time."""
    out = np.zeros((len(classnames), len(prompts), int(loaded.attrs["embed_dim"])), dtype=np.float32)
    for c, name in enumerate(classnames):
        for p, template in enumerate(prompts):
            z = loaded.model.encode_text(loaded.tokenizer([template.format(name)]))[0]
            out[c, p] = (z / z.norm()).numpy()
    return out
