"""How much an image's features depend on the batch it is encoded in: the float-rounding bound of "equal" caches.

An extraction encodes images in batches; another batch size, a resumed run, a shard or a pool that grows puts an
image in another batch at another position, and the forward pass's kernels (BLAS blocking, fp16 autocast on CUDA)
round differently. This script encodes the same images (already preprocessed, so only the forward differs) in one
batch, one at a time, in reversed order and in batches of 3 and 7, and prints per model the largest difference of
the L2-normalised features to the one-batch run: max |a - b| over every element (max abs diff) and max
(1 - cos(a, b)) over the images. Prints the machine, a table and one summary line last.

    python -m bench.bench_batch_rounding                              # ViT-B-32 and RN50 (random weights), CPU
    python -m bench.bench_batch_rounding --models cmm-tiny-vit --images 8  # seconds
    python -m bench.bench_batch_rounding --device cuda --images 64    # fp16 autocast on a GPU
"""
from __future__ import annotations

import argparse
import sys

import numpy as np
import torch

from bench.common import format_table, machine_lines
from extract.encode import encode_images
from extract.models import load_model, resolve_device

PACKAGES = ["torch", "open_clip_torch", "numpy"]


def batchings(n: int) -> dict[str, list[np.ndarray]]:
    """Ways to cut rows 0..n-1 into batches (each a list of row-id arrays, covering every row once)."""
    rows = np.arange(n)
    return {"one at a time": [rows[i:i + 1] for i in range(n)],
            "reversed, one batch": [rows[::-1]],
            "batches of 3": [rows[i:i + 3] for i in range(0, n, 3)],
            "batches of 7, from row 2": [rows[:2], *[rows[i:i + 7] for i in range(2, n, 7)]]}


def encode_in(model: torch.nn.Module, images: torch.Tensor, batches: list[np.ndarray],
              device: torch.device) -> np.ndarray:
    """L2-normalised features [N, D] of images [N, 3, H, W], encoded batch by batch as `batches` cuts them."""
    out = np.zeros((len(images), 0), np.float32)
    for rows in batches:
        feats = encode_images(model, images[torch.as_tensor(rows.copy())], torch.zeros(len(rows), 0), device).features
        if out.shape[1] == 0:
            out = np.zeros((len(images), feats.shape[1]), np.float32)
        out[rows] = feats
    return out


def measure(name: str, n: int, device: str, seed: int = 0) -> list[list[str]]:
    """Table rows (model, batching, max |diff|, max 1 - cos) of one model against its one-batch features."""
    loaded = load_model(name, "random", device=device)
    size = loaded.image_size
    generator = torch.Generator().manual_seed(seed)
    images = torch.rand((n, 3, *size), generator=generator)  # preprocessed-like inputs in [0, 1)
    dev = torch.device(device)
    reference = encode_in(loaded.model, images, [np.arange(n)], dev)
    rows = []
    for what, batches in batchings(n).items():
        got = encode_in(loaded.model, images, batches, dev)
        a, b = got.astype(np.float64), reference.astype(np.float64)
        cos = np.sum(a * b, axis=1) / (np.linalg.norm(a, axis=1) * np.linalg.norm(b, axis=1))
        rows.append([name, what, f"{np.max(np.abs(got - reference)):.2e}", f"{np.max(1 - cos):.2e}"])
    return rows


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m bench.bench_batch_rounding", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--models", nargs="+", default=["ViT-B-32", "RN50"], help="open_clip names (random weights)")
    parser.add_argument("--images", type=int, default=16, help="images per model")
    parser.add_argument("--device", default="cpu", help="cpu, cuda or auto (CUDA runs under fp16 autocast)")
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    device = resolve_device(args.device)
    print("\n".join(machine_lines(PACKAGES)))
    rows = [row for name in args.models for row in measure(name, args.images, device)]
    print(format_table(["model", "batching", "max abs diff", "max 1 - cos"], rows))
    worst = max(float(r[2]) for r in rows)
    print(f"batch rounding on {device}: features differ by at most {worst:.2e} per element across batchings")
    return 0


if __name__ == "__main__":
    sys.exit(main())
