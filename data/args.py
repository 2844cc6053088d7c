"""Argparse value types the command lines share: a bad value is argparse's one `error:` line (exit 2).

Seeds are drawn with numpy (`default_rng([seed, ...])`) and JAX (`PRNGKey(seed)`, int32 without x64), so a seed is
an integer in [0, MAX_SEED]; counts and sizes are integers or finite floats in their range.
"""
from __future__ import annotations

import argparse
import math

MAX_SEED = 2**31 - 1
MAX_GB = 1e9  # memory sizes (a billion GB: any machine's)


def _int(text: str) -> int:
    try:
        return int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not an integer") from None


def seed(text: str) -> int:
    """A seed: an integer in [0, MAX_SEED]."""
    value = _int(text)
    if not 0 <= value <= MAX_SEED:
        raise argparse.ArgumentTypeError(f"{value} is not a seed: use an integer from 0 to {MAX_SEED}")
    return value


def positive_int(text: str) -> int:
    """An integer >= 1."""
    value = _int(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"{value}: use an integer >= 1")
    return value


def count(text: str) -> int:
    """An integer >= 0."""
    value = _int(text)
    if value < 0:
        raise argparse.ArgumentTypeError(f"{value}: use an integer >= 0")
    return value


def gigabytes(text: str) -> float:
    """A memory size in GB: a finite number in (0, MAX_GB]."""
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a number") from None
    if not (math.isfinite(value) and 0 < value <= MAX_GB):
        raise argparse.ArgumentTypeError(f"{text}: use a number of GB > 0 and <= {MAX_GB:g}")
    return value
