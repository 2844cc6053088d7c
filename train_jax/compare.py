"""Paired comparisons of methods trained on the same few-shot draws and scored on the same test images.

For a method m and a reference r at one dataset and shot count, with S seeds both have a selected run:

- the per-seed difference d_s = acc_m,s - acc_r,s (percentage points) and its mean over seeds;
- the interval *over seeds*: a t interval (S - 1 degrees of freedom) of the mean of d_s. It says whether the
  difference would hold for other few-shot draws, on this test set;
- the interval *over test images*: a t interval (N - 1 degrees of freedom) of the mean over the N test images of
  e_i = mean over seeds of (correct_m,s,i - correct_r,s,i). Images are the independent unit, each with all its
  seeds, because an image's outcomes are correlated across seeds (a hard image stays hard). It says whether, with
  these draws' models, the difference is more than test-image noise; it needs the per-image correctness
  (``train_jax.records.read_correct``) and works from one seed;
- the 11-dataset average the same way: d_s averaged over the datasets per seed, then the t interval over seeds;
  over test images, the datasets' image-level estimates (independent test sets) averaged, with a Welch-Satterthwaite
  t interval;
- when the interval over seeds includes 0: the seeds at which a two-sided t test would exclude 0 with probability
  ``POWER`` if the observed mean and seed spread were the true ones (noncentral t, ``seeds_to_settle``).

Distributions come from ``scipy.stats``; everything here is pure numpy on arrays.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Mapping, Sequence

import numpy as np
from scipy import stats

LEVEL = 0.95  # confidence level of every interval
POWER = 0.8  # "likely": the probability a sweep of seeds_to_settle seeds excludes 0, if the observation were true
SETTLE_CAP = 200  # seeds_to_settle searches up to this many seeds


@dataclass(frozen=True)
class Interval:
    """A two-sided interval [low, high] of a mean difference (percentage points)."""

    low: float
    high: float

    @property
    def excludes_zero(self) -> bool:
        """Whether 0 lies outside [low, high]."""
        return bool(self.low > 0 or self.high < 0)


@dataclass(frozen=True)
class ShotInputs:
    """One dataset at one shot count. ``accuracy``: method -> {seed: test accuracy (%) of its selected run};
    ``correct``: (method, seed) -> bool [N_test], whether each test image was classified correctly by that
    selected run (None: the run folder does not store them)."""

    accuracy: Mapping[str, Mapping[int, float]]
    correct: Mapping[tuple[str, int], np.ndarray] | None = None


@dataclass(frozen=True)
class Comparison:
    """``method`` minus ``reference`` at one dataset (or the average over ``datasets``) and shot count. ``seeds``:
    those both have a selected run (in every dataset, for the average); ``diffs``: the per-seed differences (pp);
    ``mean``/``sd``: their mean and sample standard deviation (None without seeds / with one); ``over_seeds``,
    ``over_images``: the 95% intervals (None where they cannot be formed, ``note`` says why); ``n_test``: test
    images paired (summed over datasets for the average); ``seeds_to_settle``: see ``seeds_to_settle`` (None when
    settled, not estimable or above ``SETTLE_CAP``), ``settle``: the same in words."""

    dataset: str
    shots: int
    method: str
    reference: str
    seeds: tuple[int, ...]
    diffs: tuple[float, ...]
    mean: float | None
    sd: float | None
    over_seeds: Interval | None
    over_images: Interval | None
    n_test: int | None
    seeds_to_settle: int | None
    settle: str
    note: str = ""
    datasets: tuple[str, ...] = field(default=())


def t_interval(values: np.ndarray, level: float = LEVEL) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """t interval of the mean of ``values`` [..., n] along the last axis -> (mean, low, high), each [...]. NaN
    bounds where n < 2; a zero-width interval at the mean where the values are all equal."""
    values = np.asarray(values, np.float64)
    n = values.shape[-1]
    mean = values.mean(axis=-1)
    if n < 2:
        return mean, np.full_like(mean, np.nan), np.full_like(mean, np.nan)
    se = values.std(axis=-1, ddof=1) / np.sqrt(n)
    half = stats.t.ppf(0.5 + level / 2, n - 1) * se
    return mean, mean - half, mean + half


def image_differences(correct: np.ndarray, reference: np.ndarray) -> np.ndarray:
    """Per test image, the difference in correctness averaged over seeds, in percentage points. correct,
    reference: bool [S,N] (the same seeds and test images, in the same order) -> [N] in [-100, 100]."""
    return 100.0 * (np.asarray(correct, np.float64) - np.asarray(reference, np.float64)).mean(axis=0)


def image_stats(per_image: np.ndarray) -> tuple[float, float, int]:
    """(mean, standard error, degrees of freedom) of the mean of per-image differences [N] (N >= 2)."""
    per_image = np.asarray(per_image, np.float64)
    return float(per_image.mean()), float(per_image.std(ddof=1) / np.sqrt(len(per_image))), len(per_image) - 1


def pooled_interval(means: Sequence[float], ses: Sequence[float], dfs: Sequence[int],
                    level: float = LEVEL) -> tuple[float, Interval]:
    """The average of independent estimates (mean, standard error, degrees of freedom each) with its t interval;
    degrees of freedom by Welch-Satterthwaite. -> (mean, interval)."""
    means, ses, dfs = (np.asarray(x, np.float64) for x in (means, ses, dfs))
    k = len(means)
    mean = float(means.mean())
    var = float(np.sum(ses**2)) / k**2
    if var == 0:
        return mean, Interval(mean, mean)
    df = np.sum(ses**2) ** 2 / np.sum(ses**4 / dfs)
    half = float(stats.t.ppf(0.5 + level / 2, df) * np.sqrt(var))
    return mean, Interval(mean - half, mean + half)


def seeds_to_settle(mean: float, sd: float, level: float = LEVEL, power: float = POWER,
                    cap: int = SETTLE_CAP) -> int | None:
    """The fewest seeds n (2..cap) at which a two-sided one-sample t test at level ``level`` rejects a zero mean
    with probability >= ``power`` when the per-seed differences have mean ``mean`` and standard deviation ``sd``
    (power from the noncentral t distribution). None when ``mean`` is 0 or no n <= cap reaches the power."""
    if mean == 0:
        return None
    if sd == 0:
        return 2
    n = np.arange(2, cap + 1)
    crit = stats.t.ppf(0.5 + level / 2, n - 1)
    nc = np.sqrt(n) * abs(mean) / sd
    reach = stats.nct.sf(crit, n - 1, nc) + stats.nct.cdf(-crit, n - 1, nc)
    hits = np.flatnonzero(reach >= power)
    return int(n[hits[0]]) if hits.size else None


def _interval(low: float, high: float) -> Interval | None:
    return None if np.isnan(low) else Interval(float(low), float(high))


def _settle(over_seeds: Interval | None, mean: float | None, sd: float | None) -> tuple[int | None, str]:
    """(seeds_to_settle, in words) for one comparison."""
    if over_seeds is not None and over_seeds.excludes_zero:
        return None, "settled"
    if mean is None or sd is None:
        return None, "needs 2 seeds"
    if mean == 0:
        return None, "no difference seen"
    need = seeds_to_settle(mean, sd)
    return (need, f"≈ {need}") if need is not None else (None, f"> {SETTLE_CAP}")


def _compare(dataset: str, shots: int, method: str, reference: str, seeds: Sequence[int],
             diffs: np.ndarray, images: tuple[float, Interval] | None, n_test: int | None, notes: list[str],
             datasets: tuple[str, ...] = ()) -> Comparison:
    """A Comparison from the per-seed differences [S] and, if any, the image-level (mean, interval)."""
    if not len(seeds):
        return Comparison(dataset, shots, method, reference, (), (), None, None, None, None, None, None,
                          "no common seed", "; ".join(notes + [f"no seed where both {method} and {reference} have a "
                                                               "selected run"]), datasets)
    mean, low, high = t_interval(diffs)
    over_seeds = _interval(low, high)
    sd = float(np.std(diffs, ddof=1)) if len(diffs) > 1 else None
    if over_seeds is None:
        notes = notes + ["one seed: no interval over seeds"]
    need, settle = _settle(over_seeds, float(mean), sd)
    return Comparison(dataset, shots, method, reference, tuple(int(s) for s in seeds),
                      tuple(float(d) for d in diffs), float(mean), sd, over_seeds,
                      None if images is None else images[1], n_test, need, settle, "; ".join(notes), datasets)


def _common_seeds(inputs: ShotInputs, method: str, reference: str) -> list[int]:
    return sorted(set(inputs.accuracy.get(method, {})) & set(inputs.accuracy.get(reference, {})))


def _per_image(inputs: ShotInputs, method: str, reference: str, seeds: Sequence[int]) -> tuple[np.ndarray | None, str]:
    """Per-image differences [N] over ``seeds`` (``image_differences``), or None and why not."""
    if inputs.correct is None:
        return None, "no per-image results (shots/<K>shot_test_correct.npz): interval over seeds only"
    keys = [(m, s) for s in seeds for m in (method, reference)]
    if any(k not in inputs.correct for k in keys):
        return None, "per-image results missing for some selected runs: interval over seeds only"
    return image_differences(np.stack([inputs.correct[(method, s)] for s in seeds]),
                             np.stack([inputs.correct[(reference, s)] for s in seeds])), ""


def compare_shot(dataset: str, shots: int, inputs: ShotInputs, reference: str,
                 methods: Sequence[str] | None = None) -> list[Comparison]:
    """Every method of ``inputs`` (in ``methods`` order, default theirs) but the reference, minus the reference;
    empty when the reference has no selected run."""
    if reference not in inputs.accuracy:
        return []
    out = []
    for method in methods or list(inputs.accuracy):
        if method == reference or method not in inputs.accuracy:
            continue
        seeds = _common_seeds(inputs, method, reference)
        diffs = np.array([inputs.accuracy[method][s] - inputs.accuracy[reference][s] for s in seeds])
        per_image, why = _per_image(inputs, method, reference, seeds) if seeds else (None, "")
        images = None
        if per_image is not None and len(per_image) >= 2:
            mean, se, df = image_stats(per_image)
            images = pooled_interval([mean], [se], [df])
        out.append(_compare(dataset, shots, method, reference, seeds, diffs, images,
                            None if per_image is None else len(per_image), [why] if why else []))
    return out


def compare_average(label: str, shots: int, inputs: Mapping[str, ShotInputs], reference: str,
                    methods: Sequence[str]) -> list[Comparison]:
    """The average over the datasets of ``inputs`` (dataset -> its ShotInputs at ``shots``) of every method in
    ``methods`` but the reference, minus the reference: per seed the mean over the datasets of the differences,
    then the interval over seeds; over test images the datasets' image-level estimates averaged. Only methods that
    both have selected runs in every dataset get a row."""
    if not inputs:
        return []
    out = []
    for method in methods:
        if method == reference or not all(method in i.accuracy and reference in i.accuracy for i in inputs.values()):
            continue
        seeds = sorted(set.intersection(*(set(_common_seeds(i, method, reference)) for i in inputs.values())))
        diffs = np.array([np.mean([i.accuracy[method][s] - i.accuracy[reference][s] for i in inputs.values()])
                          for s in seeds])
        parts, why = [], ""
        for name, one in inputs.items():
            per_image, reason = _per_image(one, method, reference, seeds) if seeds else (None, "")
            if per_image is None or len(per_image) < 2:
                why = reason or f"{name}: fewer than 2 test images"
                break
            parts.append((*image_stats(per_image), len(per_image)))
        images = None
        if seeds and not why:
            images = pooled_interval(*zip(*[p[:3] for p in parts]))
        out.append(_compare(label, shots, method, reference, seeds, diffs, images,
                            sum(p[3] for p in parts) if images else None, [why] if why else [], tuple(inputs)))
    return out
