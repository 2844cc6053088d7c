"""The PyTorch baseline of the training bench: CMM trained the straightforward way, one run after another.

Same model, loss, optimiser and schedule as ``train_jax`` (CMMHead with frozen text, optax.adamw with linear
warm-up + cosine decay): ``v' = normalise(v + v dW^T + b)``, logits ``s (alpha v' T^T + v T^T)``, CE + lam *
hardest-negative triplet, ``torch.optim.AdamW`` (decoupled decay, eps 1e-8) with a ``LambdaLR`` schedule; the
zero-shot cosines v T^T are computed once for the pool, as the runner does. A fresh permutation per epoch; the
last mini-batch is smaller instead of padded (the same mean loss). On a GPU everything but the permutations (drawn
on the CPU, so that both devices see the same batches) stays on the device.
"""
from __future__ import annotations

import math
from typing import Mapping

import numpy as np
import torch
import torch.nn.functional as F


def lr_multiplier(count: int, total_steps: int, warmup: float) -> float:
    """As ``train_jax.step.lr_multiplier``: linear warm-up over floor(warmup * total) steps, cosine to 0."""
    warm = math.floor(warmup * total_steps)
    if count < warm:
        return (count + 1) / max(warm, 1)
    progress = min((count - warm) / max(total_steps - warm, 1), 1.0)
    return 0.5 * (1.0 + math.cos(math.pi * progress))


def cmm_loss(x: torch.Tensor, zs: torch.Tensor, y: torch.Tensor, dw: torch.Tensor, b: torch.Tensor,
             text: torch.Tensor, hp: Mapping[str, float]) -> torch.Tensor:
    """x [B,D] features, zs [B,C] zero-shot cosines, y [B] labels, dw [D,D], b [D], text [C,D] -> scalar."""
    mapped = F.normalize(x + x @ dw.T + b, dim=-1)
    sims = mapped @ text.T
    ce = F.cross_entropy(hp["logit_scale"] * (hp["alpha"] * sims + zs), y)
    is_pos = F.one_hot(y, sims.shape[1]).bool()
    pos = sims.gather(1, y[:, None])[:, 0]
    neg = sims.masked_fill(is_pos, -math.inf).amax(dim=1)
    return ce + hp["lam"] * F.relu(neg - pos + hp["margin"]).mean()


def train_run(pool_x: torch.Tensor, pool_y: torch.Tensor, zs_pool: torch.Tensor, text: torch.Tensor,
              rows: torch.Tensor, seed: int, hp: Mapping[str, float], *, batch: int, epochs: int
              ) -> tuple[np.ndarray, np.ndarray]:
    """Train one run on pool rows ``rows`` [N] (on the CPU); pool_x [M,D], pool_y [M], zs_pool [M,C], text [C,D]
    (on the training device) -> (dW [D,D], b [D])."""
    dim, n, device = pool_x.shape[1], len(rows), pool_x.device
    dw = torch.zeros(dim, dim, device=device, requires_grad=True)
    b = torch.zeros(dim, device=device, requires_grad=True)
    steps = math.ceil(n / batch)
    opt = torch.optim.AdamW([dw, b], lr=hp["lr"], weight_decay=hp["weight_decay"], eps=1e-8)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda c: lr_multiplier(c, epochs * steps, hp["warmup"]))
    gen = torch.Generator().manual_seed(seed)
    for _ in range(epochs):
        order = rows[torch.randperm(n, generator=gen)].to(device)
        for start in range(0, n, batch):
            r = order[start:start + batch]
            loss = cmm_loss(pool_x[r], zs_pool[r], pool_y[r], dw, b, text, hp)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            sched.step()
    return dw.detach().cpu().numpy(), b.detach().cpu().numpy()


def train_loop(pool_x: np.ndarray, pool_y: np.ndarray, text: np.ndarray, rows: np.ndarray, seeds: np.ndarray,
               hp: Mapping[str, np.ndarray], *, batch: int, epochs: int, on_run=lambda i: None,
               device: str = "cpu") -> list:
    """All runs, one after another on ``device``: rows [S,N], seeds [S], hp field -> [S]; ``on_run(i)`` after run i
    (its parameters are back on the host by then). Returns the (dW, b) of every run."""
    pool_x, text = torch.from_numpy(pool_x).to(device), torch.from_numpy(text).to(device)
    pool_y = torch.from_numpy(pool_y.astype(np.int64)).to(device)
    zs_pool = pool_x @ text.T
    out = []
    for i in range(len(seeds)):
        run_hp = {k: float(v[i]) for k, v in hp.items()}
        out.append(train_run(pool_x, pool_y, zs_pool, text, torch.from_numpy(rows[i].astype(np.int64)),
                             int(seeds[i]), run_hp, batch=batch, epochs=epochs))
        on_run(i)
    return out
