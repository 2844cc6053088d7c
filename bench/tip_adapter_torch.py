"""Tip-Adapter-F's upstream loop, transcribed in PyTorch for the side-by-side bench (``bench.bench_upstream``).

Source: gaopengcuhk/Tip-Adapter at d0e2d6f8c5feb8b6ce937b757810761f7155d4d5: ``utils.py`` ``build_cache_model``
(keys = the mean over the augmentation epochs of the raw image features, normalised once; values = one-hot labels)
and ``search_hp`` (a Python double loop over 200 x 20 (beta, alpha), recomputing the adapter's affinities for each,
the first best kept), ``main.py`` ``run_tip_adapter_F`` (the keys as an ``nn.Linear``, AdamW with eps 1e-4,
CosineAnnealingLR over all steps, batches of 256 shuffled each epoch, CE on ``100 f W + alpha exp(-beta (1 - f K^T))
L``). On cached features: an epoch's augmented image is one of the cached views, drawn per image and epoch
(upstream crops afresh), and the keys average the cached views' raw features (view x its norm). Left out: the
per-epoch evaluation on the test split that upstream uses to keep the best epoch (it selects on test; this
project never does); the model after the last epoch is searched and tested.
"""

from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn


def cls_acc(output: torch.Tensor, target: torch.Tensor) -> float:
    """Upstream's top-1 accuracy in percent."""
    return float((output.argmax(dim=1) == target).float().sum()) * 100 / target.shape[0]


def search_hp(scale: tuple[float, float], steps: tuple[int, int], values: torch.Tensor, features: torch.Tensor,
              labels: torch.Tensor, clip_weights: torch.Tensor, adapter: nn.Module) -> tuple[float, float]:
    """Upstream's ``search_hp`` with an adapter: the (beta, alpha) of the best accuracy on ``features``."""
    beta_list = [i * (scale[0] - 0.1) / steps[0] + 0.1 for i in range(steps[0])]
    alpha_list = [i * (scale[1] - 0.1) / steps[1] + 0.1 for i in range(steps[1])]
    best_acc, best_beta, best_alpha = 0.0, 0.0, 0.0
    for beta in beta_list:
        for alpha in alpha_list:
            affinity = adapter(features)
            cache_logits = ((-1) * (beta - beta * affinity)).exp() @ values
            clip_logits = 100.0 * features @ clip_weights
            acc = cls_acc(clip_logits + cache_logits * alpha, labels)
            if acc > best_acc:
                best_acc, best_beta, best_alpha = acc, beta, alpha
    return best_beta, best_alpha


@torch.no_grad()
def build_cache(raw_views: np.ndarray, labels: np.ndarray, classes: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Upstream's ``build_cache_model``: raw views [N, A, D] -> keys [D, N] (the normalised mean over the views),
    values [N, C] one-hot."""
    keys = torch.from_numpy(raw_views).float().mean(dim=1)
    keys = keys / keys.norm(dim=-1, keepdim=True)
    return keys.t().contiguous(), F.one_hot(torch.from_numpy(labels).long(), classes).float()


def run(raw_views: np.ndarray, unit_views: np.ndarray, labels: np.ndarray, val_x: np.ndarray, val_y: np.ndarray,
        test_x: np.ndarray, test_y: np.ndarray, clip_weights: np.ndarray, *, init_alpha: float,
        scale: tuple[float, float], epochs: int, seed: int, init_beta: float = 1.0, lr: float = 1e-3,
        batch: int = 256, steps: tuple[int, int] = (200, 20)) -> tuple[float, float, float]:
    """One seed: training views raw [N,A,D] and unit [N,A,D], labels [N]; unit val/test features and labels;
    clip_weights [D,C] (class prototypes as columns) -> (test accuracy %, beta, alpha)."""
    gen = torch.Generator().manual_seed(seed)
    classes = clip_weights.shape[1]
    cache_keys, cache_values = build_cache(raw_views, labels, classes)
    w = torch.from_numpy(clip_weights).float()
    views, y = torch.from_numpy(unit_views).float(), torch.from_numpy(labels).long()
    val_f, val_l = torch.from_numpy(val_x).float(), torch.from_numpy(val_y).long()
    test_f, test_l = torch.from_numpy(test_x).float(), torch.from_numpy(test_y).long()
    adapter = nn.Linear(cache_keys.shape[0], cache_keys.shape[1], bias=False)
    adapter.weight = nn.Parameter(cache_keys.t().clone())
    n = len(labels)
    per_epoch = -(-n // batch)
    optimizer = torch.optim.AdamW(adapter.parameters(), lr=lr, eps=1e-4)
    scheduler = torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, epochs * per_epoch)
    beta, alpha = init_beta, init_alpha
    for _ in range(epochs):
        adapter.train()
        order = torch.randperm(n, generator=gen)
        pick = torch.randint(views.shape[1], (n,), generator=gen)  # this epoch's augmentation of each image
        for start in range(0, n, batch):
            idx = order[start:start + batch]
            image_features = views[idx, pick[idx]]
            affinity = adapter(image_features)
            cache_logits = ((-1) * (beta - beta * affinity)).exp() @ cache_values
            clip_logits = 100.0 * image_features @ w
            loss = F.cross_entropy(clip_logits + cache_logits * alpha, y[idx])
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
            scheduler.step()
    adapter.eval()
    with torch.no_grad():
        best_beta, best_alpha = search_hp(scale, steps, cache_values, val_f, val_l, w, adapter)
        affinity = adapter(test_f)
        cache_logits = ((-1) * (best_beta - best_beta * affinity)).exp() @ cache_values
        acc = cls_acc(100.0 * test_f @ w + cache_logits * best_alpha, test_l)
    return acc, best_beta, best_alpha
