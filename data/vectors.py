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
