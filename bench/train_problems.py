"""The synthetic training problems of the training-throughput bench: cases, runs (seeds x settings), features,
and the FLOP count of the useful work. numpy only, so the JAX and the PyTorch workers share it.

A case is K shots x C classes of dim-D unit features. Each seed trains on its own K-shot sample: the pool holds
one block of C*K rows per seed (as ``train_jax.experiment`` pools the union of the seeds' picks), a run's rows
are its seed's block. Run i has seed ``i // len(GRID) + 1`` and setting ``GRID[i % len(GRID)]``.
"""
from __future__ import annotations

import dataclasses
import json
import math
from dataclasses import dataclass

import numpy as np

# 12 settings, train_jax.config.DEFAULT_GRID's lr x alpha x lambda (its learn_text axis left out: frozen prototypes,
# the throughput figures' setting); the other fields keep their defaults.
GRID = [{"lr": lr, "alpha": alpha, "lam": lam}
        for lr in (1e-2, 1e-3) for alpha in (0.5, 1.0, 2.0) for lam in (1.0, 10.0)]
DEFAULTS = {"weight_decay": 1e-2, "margin": 0.2, "warmup": 0.05, "logit_scale": 100.0, "beta": 5.5, "adam_eps": 1e-8}


@dataclass(frozen=True)
class Case:
    """One problem size: ``shots`` x ``classes`` training features of dim ``dim``, trained ``epochs`` epochs in
    mini-batches of ``batch_size``, measured at S = each of ``runs``."""

    name: str
    shots: int
    classes: int
    dim: int
    epochs: int
    runs: tuple[int, ...]
    batch_size: int = 256

    @property
    def n_train(self) -> int:
        return self.shots * self.classes

    @property
    def batch(self) -> int:
        """The batch size in effect (capped at the training-set size, as the runner does)."""
        return min(self.batch_size, self.n_train)

    @property
    def steps(self) -> int:
        """Optimiser steps of one run."""
        return self.epochs * math.ceil(self.n_train / self.batch)

    def to_json(self) -> str:
        return json.dumps(dataclasses.asdict(self))

    @classmethod
    def from_json(cls, text: str) -> "Case":
        data = json.loads(text)
        return cls(**{**data, "runs": tuple(data["runs"])})

    def describe(self) -> str:
        return (f"{self.shots} shots x {self.classes} classes = {self.n_train} features, dim {self.dim}, "
                f"batch {self.batch}, {self.epochs} epochs = {self.steps} steps per run")


CASES = {
    "large": Case("large", 16, 1000, 1024, epochs=1, runs=(1, 3, 10, 30)),  # ImageNet 16-shot, RN50 features
    "small": Case("small", 16, 100, 512, epochs=10, runs=(1, 3, 10, 30)),
    "tiny": Case("tiny", 1, 10, 512, epochs=50, runs=(1, 3, 10, 30, 100)),
}


def useful_flops(case: Case) -> float:
    """FLOPs of the matmuls one CMM run (frozen text) needs, over all its steps, counted per real sample
    (batch padding is not useful work): forward v dW^T (2 D^2) and v' T^T (2 D C), backward dL/ddW = g^T v
    (2 D^2) and dL/dv' = g T (2 D C). Not counted: the gradient of v (input data, not needed), the zero-shot
    cosines v T^T (computed once for the pool, not per step), elementwise work (normalisation, softmax,
    triplet, AdamW), all O(D + C) or O(D^2) per step instead of O(B D (D + C))."""
    return float(case.epochs * case.n_train * 4 * case.dim * (case.dim + case.classes))


def state_bytes(case: Case) -> float:
    """Bytes one CMM step must move through memory per run at the least, when the runs' states do not fit in the
    caches: AdamW reads the gradient, both moments and dW and writes back moments and dW (7 x D^2 floats), the
    forward matmul reads dW and the backward one writes its gradient (2 x D^2)."""
    return 9 * 4 * case.dim**2


def normalize(x: np.ndarray) -> np.ndarray:
    return (x / np.linalg.norm(x, axis=-1, keepdims=True)).astype(np.float32)


def make_pool(case: Case, runs: int, seed: int = 0) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """The pool of the first ``runs`` runs: (features [M,D] unit float32, labels [M] int32, text prototypes [C,D]
    unit float32); M = seeds x C x K (seeds = ceil(runs / 12)), class-major within each seed's block."""
    rng = np.random.default_rng(seed)
    text = normalize(rng.standard_normal((case.classes, case.dim), dtype=np.float32))
    labels = np.tile(np.repeat(np.arange(case.classes, dtype=np.int32), case.shots), math.ceil(runs / len(GRID)))
    noise = rng.standard_normal((len(labels), case.dim), dtype=np.float32)
    return normalize(text[labels] + noise / 4), labels, text


def run_table(case: Case, runs: int) -> tuple[np.ndarray, np.ndarray, dict[str, np.ndarray]]:
    """The first ``runs`` runs: (rows [S,N] int32 into the pool, seeds [S] int32, hyperparameters field -> [S]
    float32, plus epochs [S] int32)."""
    seeds = np.arange(runs, dtype=np.int32) // len(GRID) + 1
    rows = (seeds[:, None] - 1) * case.n_train + np.arange(case.n_train, dtype=np.int32)[None]
    settings = [{**DEFAULTS, **GRID[i % len(GRID)]} for i in range(runs)]
    hp = {k: np.array([s[k] for s in settings], np.float32) for k in settings[0]}
    hp["epochs"] = np.full(runs, case.epochs, np.int32)
    return rows.astype(np.int32), seeds, hp
