"""Vector helpers both stages share (numpy only)."""
from __future__ import annotations

import numpy as np


def l2_normalize(x: np.ndarray, axis: int = -1) -> np.ndarray:
    """x / ||x|| along `axis`, in float32 (a zero vector stays zero).

    Args:
      x: an array of any shape, e.g. features [N, D].
      axis: the axis to normalise along.

    Returns:
      float32 array of x's shape.
    """
    x = np.asarray(x, dtype=np.float32)
    return x / np.maximum(np.linalg.norm(x, axis=axis, keepdims=True), 1e-12)


def l2_normalize_rows_inplace(x: np.ndarray, block: int = 4096) -> np.ndarray:
    """``l2_normalize(x)`` along the last axis written into x itself (float32 [N, ..., D]), ``block`` rows of the
    first axis at a time, so no temporary of x's size is made; the same values as ``l2_normalize``. Returns x."""
    for start in range(0, len(x), block):
        part = x[start : start + block]
        part /= np.maximum(np.linalg.norm(part, axis=-1, keepdims=True), 1e-12)
    return x
