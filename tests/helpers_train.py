"""Synthetic CLIP-like features with a modality gap, and caches made of them, for the train_jax tests.

Text prototypes share a common direction (CLIP's prompts are mutually similar). Image features of class y are
``normalise(Q T_y + g + sigma * noise / sqrt(D))``: a rotation Q (theta sets how far it is from the identity)
plus a shared offset g (the modality gap) separate the image cone from the text cone, so zero-shot CLIP is
mediocre and a learned linear map can undo the gap.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

from data.cache_writer import write_cache


def _normalize(x: np.ndarray) -> np.ndarray:
    return (x / np.linalg.norm(x, axis=-1, keepdims=True)).astype(np.float32)


class GapWorld:
    """One synthetic world: prototypes [C,D] and a sampler of image features with a modality gap."""

    def __init__(self, seed: int = 0, classes: int = 10, dim: int = 64, theta: float = 1.5, gap: float = 1.0,
                 sigma: float = 1.0, shared: float = 1.0):
        rng = np.random.default_rng(seed)
        self.rng, self.dim, self.sigma = rng, dim, sigma
        common = _normalize(rng.normal(size=dim))
        self.text = _normalize(shared * common + _normalize(rng.normal(size=(classes, dim))))
        q, r = np.linalg.qr(np.eye(dim) + theta * rng.normal(size=(dim, dim)) / np.sqrt(dim))
        self.rotation = q * np.sign(np.diag(r))
        self.gap = gap * _normalize(rng.normal(size=dim))

    @property
    def classes(self) -> int:
        return self.text.shape[0]

    def images(self, per_class: int) -> tuple[np.ndarray, np.ndarray]:
        """per_class images of every class -> features [C*per_class, D], labels [C*per_class]."""
        labels = np.repeat(np.arange(self.classes), per_class)
        noise = self.sigma * self.rng.normal(size=(len(labels), self.dim)) / np.sqrt(self.dim)
        return _normalize(self.text[labels] @ self.rotation.T + self.gap + noise), labels

    def split(self, name: str, per_class: int, aug_views: int = 0) -> dict:
        """A cache split dict (features, labels, paths[, aug_features]) with per_class images of each class."""
        feats, labels = self.images(per_class)
        out = {"features": feats, "labels": labels,
               "paths": np.array([f"{name}/c{y:03d}/img{i:04d}.png" for i, y in enumerate(labels)])}
        if aug_views:
            jitter = 0.05 * self.rng.normal(size=(len(labels), aug_views, self.dim))
            out["aug_features"] = _normalize(feats[:, None, :] + jitter)
        return out


def write_gap_cache(path: Path, world: GapWorld, *, train: int = 8, val: int | None = 4, test: int = 20,
                    dataset: str = "Synth", aug_views: int = 0, templates: int = 2, attrs: dict | None = None) -> Path:
    """Write a cache of ``world`` with the given images per class (val=None: no val split, like ImageNet).
    Template 0 holds the exact prototypes; the others are perturbed copies. ``attrs``: more root attributes
    (e.g. the model's name and weights)."""
    splits = {"train": world.split("train", train, aug_views), "test": world.split("test", test)}
    if val is not None:
        splits["val"] = world.split("val", val)
    extra = [_normalize(world.text + 0.1 * world.rng.normal(size=world.text.shape)) for _ in range(templates - 1)]
    text = np.stack([world.text, *extra], axis=1)
    return write_cache(
        path,
        attrs={"dataset": dataset, "model": "synthetic", "embed_dim": world.dim, **(attrs or {})},
        classnames=[f"class {c}" for c in range(world.classes)],
        templates=["a photo of a {}."] + [f"template {i} of a {{}}." for i in range(1, templates)],
        text_features=text,
        splits=splits,
    )



def write_shift_cache(path: Path, world: GapWorld, classes: list[int], *, test: int = 10,
                      dataset: str = "SynthShift") -> Path:
    """A test-only cache of a subset of ``world``'s classes (in the given order, so its label i is the
    training class classes[i]), like ImageNet-A/-R."""
    feats, labels = world.images(test)
    keep = np.isin(labels, classes)
    relabel = {c: i for i, c in enumerate(classes)}
    local = np.array([relabel[c] for c in labels[keep]], dtype=np.int64)
    split = {"features": feats[keep], "labels": local,
             "paths": np.array([f"shift/img{i:04d}.png" for i in range(len(local))])}
    text = world.text[classes][:, None, :]
    return write_cache(
        path,
        attrs={"dataset": dataset, "model": "synthetic", "embed_dim": world.dim},
        classnames=[f"class {c}" for c in classes],
        templates=["a photo of a {}."],
        text_features=text,
        splits={"test": split},
    )
