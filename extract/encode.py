"""Run a frozen open_clip model: L2-normalised image features of batches (and their norms before normalisation)
and text features of prompts.

On CUDA the forward passes run under fp16 autocast; features always come back as float32 numpy arrays.
"""
from __future__ import annotations

import contextlib
import ctypes
import functools
import os
import signal
import sys
from collections.abc import Callable
from contextlib import AbstractContextManager
from typing import NamedTuple

import numpy as np
import torch
import torch.nn.functional as F

from extract.images import ImageRows


def autocast(device: torch.device) -> AbstractContextManager:
    """fp16 autocast on CUDA, nothing elsewhere."""
    if device.type == "cuda":
        return torch.autocast("cuda", dtype=torch.float16)
    return contextlib.nullcontext()


PR_SET_PDEATHSIG = 1  # linux/prctl.h


def _die_with(parent: int, _worker_id: int) -> None:
    """DataLoader worker init (Linux): be killed when `parent` dies, so the workers of a killed extraction never
    outlive it holding the cache's lock (a rerun then starts at once instead of waiting for them)."""
    if sys.platform.startswith("linux"):
        ctypes.CDLL(None).prctl(PR_SET_PDEATHSIG, signal.SIGKILL)
        if os.getppid() != parent:  # it died before the call
            os._exit(1)


def make_loader(rows: ImageRows, batch_size: int, workers: int, device: torch.device) -> torch.utils.data.DataLoader:
    """In-order batches of `rows` loaded by `workers` processes (0 = in this process)."""
    return torch.utils.data.DataLoader(rows, batch_size=batch_size, shuffle=False, num_workers=workers,
                                       pin_memory=device.type == "cuda", persistent_workers=False,
                                       worker_init_fn=functools.partial(_die_with, os.getpid()) if workers else None)


class Encoded(NamedTuple):
    """A batch's L2-normalised features [B, D] and views [B, A, D] (None if A == 0), and the norms of the model's
    outputs before normalisation, [B] and [B, A] (None if A == 0): raw feature = norm * feature."""

    features: np.ndarray
    aug: np.ndarray | None
    norms: np.ndarray
    aug_norms: np.ndarray | None


@torch.inference_mode()
def encode_images(model: torch.nn.Module, images: torch.Tensor, aug: torch.Tensor, device: torch.device) -> Encoded:
    """Images [B, 3, H, W] and views [B, A, 3, H, W] -> their features and norms (``Encoded``)."""
    b, a = aug.shape[:2]
    x = torch.cat([images, aug.flatten(0, 1)]) if a else images
    with autocast(device):
        z = model.encode_image(x.to(device, non_blocking=True)).float()
    norms = torch.linalg.vector_norm(z, dim=-1).cpu().numpy()
    z = F.normalize(z, dim=-1).cpu().numpy()
    return Encoded(z[:b], z[b:].reshape(b, a, -1) if a else None, norms[:b], norms[b:].reshape(b, a) if a else None)


@torch.inference_mode()
def encode_texts(model: torch.nn.Module, tokenizer: Callable[[list[str]], torch.Tensor], classnames: list[str],
                 templates: list[str], device: torch.device, batch_size: int = 256) -> np.ndarray:
    """Text features [C, P, D] of `template.format(classname)` for every class and template, L2-normalised."""
    prompts = [t.format(c) for c in classnames for t in templates]
    out = []
    for start in range(0, len(prompts), batch_size):
        tokens = tokenizer(prompts[start:start + batch_size]).to(device)
        with autocast(device):
            z = model.encode_text(tokens)
        out.append(F.normalize(z.float(), dim=-1).cpu().numpy())
    return np.concatenate(out).reshape(len(classnames), len(templates), -1)
