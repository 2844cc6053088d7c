"""Shared pieces of the extract/ tests: generated images, the tiny random model, a local-dir: model folder,
plain-loop reference features."""
from __future__ import annotations

import functools
import hashlib
import json
from pathlib import Path

import numpy as np
import open_clip
import torch
from PIL import Image

from extract.datasets import DatasetSpec
from extract.models import BUNDLED_CONFIGS, LoadedModel, load_model, register_config
from extract.prompts import cache_templates

TINY = "cmm-tiny-vit"  # extract/model_configs/cmm-tiny-vit.json: ViT width 64, 1 layer, 32 px, embed_dim 32
CLASSES = ("cat", "dog", "red_fox")
# An image's features depend, in their last bits, on the batch it was encoded in (its size and the image's position:
# the kernels block and round differently). Tests that compare features of other batchings (batch sizes, shards,
# a grown pool) allow this much per element of the L2-normalised features: 8x the largest difference measured on
# CPU for the tiny model (1.2e-7, `python -m bench.bench_batch_rounding --models cmm-tiny-vit`).
BATCH_ATOL = 1e-6


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


def seeded_tiny(seed: int, **kwargs) -> torch.nn.Module:
    """The tiny architecture with seeded random weights (other than load_model's random init)."""
    register_config(BUNDLED_CONFIGS / f"{TINY}.json")
    torch.manual_seed(seed)
    return open_clip.create_model(TINY, **kwargs).eval()


def make_local_dir(folder: Path, source: torch.nn.Module) -> dict:
    """An open_clip model folder (open_clip_config.json + weights) of the tiny architecture; returns the config."""
    folder.mkdir(parents=True)
    config = {"model_cfg": json.loads((BUNDLED_CONFIGS / f"{TINY}.json").read_text()),
              "preprocess_cfg": {"mean": [0.5, 0.5, 0.5], "std": [0.25, 0.25, 0.25]}}
    (folder / "open_clip_config.json").write_text(json.dumps(config))
    torch.save(source.state_dict(), folder / "open_clip_pytorch_model.bin")
    return config


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
