"""Paired comparisons (train_jax.compare) on synthetic predictions with a known difference and with none: the
intervals cover the truth at their stated 95% over many simulated draws; the arithmetic against scipy oracles
(t.interval, bootstrap) and plain loops; seeds_to_settle against simulated t tests.

The simulation: a test set of N images drawn from a population. Image i has the reference's chance p_i and the
method's extra chance delta_i (both kept across seeds: a hard image stays hard); a seed (a few-shot draw) shifts
the method's chance by b_s ~ N(0, seed_sd). Per seed and image one uniform u decides both methods (they err on
the same images): reference correct iff u < p_i, method iff u < p_i + delta_i + b_s. So the expected per-seed
difference on this test set is 100 mean_i(delta_i) (what the interval over seeds estimates) and, for these
seeds' models on new images, 100 (E delta + mean_s b_s) (what the interval over test images estimates).

Coverage tolerances: with M simulations the Monte-Carlo standard error of a 95% coverage is sqrt(.95 .05 / M)
(0.005 at M = 2000); the tests allow 0.02 (4 standard errors), and the generator is seeded, so they are
deterministic. A normal instead of a t quantile at 3 seeds would cover 0.81, pooling the seeds' images as
independent pairs (McNemar-style) about 0.77 at 8 seeds: both would fail.
"""

from __future__ import annotations

import numpy as np
import pytest
from scipy import stats

from train_jax.compare import (LEVEL, SETTLE_CAP, ShotInputs, compare_average, compare_shot, image_differences,
                               image_stats, pooled_interval, seeds_to_settle, t_interval)

SIMS = 2000
TOL = 0.02


def simulate(rng: np.random.Generator, sims: int, seeds: int, n: int, delta: float, seed_sd: float,
             spread: float = 0.25, mirrored: bool = False):
    """-> correct_m, correct_ref bool [sims,S,N]; the seed-level target [sims] (100 mean_i delta_i) and the
    image-level target [sims] (100 (delta + mean_s b_s)). ``mirrored``: the images' offsets come in +- pairs, so
    every test set's mean delta is exactly ``delta``."""
    p = rng.uniform(0.4, 0.6, (sims, 1, n))
    if mirrored:
        half = rng.uniform(-spread, spread, (sims, 1, n // 2))
        offsets = np.concatenate([half, -half], axis=-1)
    else:
        offsets = rng.uniform(-spread, spread, (sims, 1, n))
    d = delta + offsets
    b = rng.normal(0, seed_sd, (sims, seeds, 1))
    u = rng.uniform(size=(sims, seeds, n))
    correct_ref = u < p
    correct_m = u < p + d + b
    return correct_m, correct_ref, 100 * d.mean(axis=(1, 2)), 100 * (delta + b.mean(axis=(1, 2)))


def _inputs(correct_m: np.ndarray, correct_ref: np.ndarray, seeds=None) -> ShotInputs:
    """ShotInputs of one simulated comparison ("m" vs "ref"), accuracies from the correctness [S,N]."""
    seeds = seeds or list(range(1, len(correct_m) + 1))
    acc = {name: {s: 100 * float(c[j].mean()) for j, s in enumerate(seeds)}
           for name, c in (("m", correct_m), ("ref", correct_ref))}
    correct = {(name, s): c[j] for name, c in (("m", correct_m), ("ref", correct_ref)) for j, s in enumerate(seeds)}
    return ShotInputs(acc, correct)


def _covers(interval, target: float) -> bool:
    return interval.low <= target <= interval.high


def _run(correct_m, correct_ref):
    return [compare_shot("Toy", 4, _inputs(m, r), "ref")[0] for m, r in zip(correct_m, correct_ref)]


def test_known_difference_is_covered_at_the_stated_rate():
    rng = np.random.default_rng(0)
    correct_m, correct_ref, seed_target, image_target = simulate(rng, SIMS, 3, 400, 0.03, 0.02)
    rows = _run(correct_m, correct_ref)
    seed_cover = np.mean([_covers(c.over_seeds, t) for c, t in zip(rows, seed_target)])
    image_cover = np.mean([_covers(c.over_images, t) for c, t in zip(rows, image_target)])
    assert abs(seed_cover - LEVEL) < TOL and abs(image_cover - LEVEL) < TOL, (seed_cover, image_cover)
    assert np.mean([c.over_images.excludes_zero for c in rows]) > 0.5  # a 3-point difference is often found


def test_no_difference_includes_zero_at_the_stated_rate():
    rng = np.random.default_rng(1)
    # over seeds: every test set's mean difference is 0, the draws scatter around it
    correct_m, correct_ref, seed_target, _ = simulate(rng, SIMS, 3, 400, 0.0, 0.02, mirrored=True)
    assert np.all(np.abs(seed_target) < 1e-9)
    rows = _run(correct_m, correct_ref)
    assert abs(np.mean([not c.over_seeds.excludes_zero for c in rows]) - LEVEL) < TOL
    # over test images: no draw effect either
    correct_m, correct_ref, _, image_target = simulate(rng, SIMS, 3, 400, 0.0, 0.0)
    assert np.all(image_target == 0)
    rows = _run(correct_m, correct_ref)
    assert abs(np.mean([not c.over_images.excludes_zero for c in rows]) - LEVEL) < TOL


def test_the_image_interval_is_about_these_draws_models():
    """With no difference on average but seeds that shift the method a lot, the interval over test images excludes
    0 often (it is conditional on the draws), the interval over seeds keeps its 95% coverage of 0."""
    rng = np.random.default_rng(2)
    correct_m, correct_ref, seed_target, _ = simulate(rng, 500, 3, 400, 0.0, 0.05, mirrored=True)
    rows = _run(correct_m, correct_ref)
    assert np.mean([c.over_images.excludes_zero for c in rows]) > 0.3
    assert abs(np.mean([not c.over_seeds.excludes_zero for c in rows]) - LEVEL) < 0.03  # 500 sims: 3 SE


def test_pooling_seeds_as_independent_pairs_would_under_cover():
    """Why images (with all their seeds) are the unit: an image's outcomes are correlated across seeds, so treating
    the S x N (seed, image) pairs as independent, as McNemar on pooled predictions does, is too narrow."""
    rng = np.random.default_rng(3)
    correct_m, correct_ref, _, image_target = simulate(rng, SIMS, 8, 400, 0.03, 0.0, spread=0.35)
    e = 100 * (correct_m.astype(float) - correct_ref)
    _, low, high = t_interval(e.reshape(SIMS, -1))  # pooled pairs
    pooled = np.mean((low <= image_target) & (image_target <= high))
    ours = np.mean([_covers(c.over_images, t) for c, t in zip(_run(correct_m, correct_ref), image_target)])
    assert pooled < 0.85 and abs(ours - LEVEL) < TOL, (pooled, ours)


def test_average_over_datasets_is_covered_at_the_stated_rate():
    rng = np.random.default_rng(4)
    sims, datasets = 600, 11
    sizes = rng.integers(100, 400, datasets)
    deltas = rng.uniform(-0.03, 0.05, datasets)
    sims_of = [simulate(rng, sims, 3, int(n), float(d), 0.02) for n, d in zip(sizes, deltas)]
    seed_target = np.mean([s[2] for s in sims_of], axis=0)
    image_target = np.mean([s[3] for s in sims_of], axis=0)
    seed_cover = image_cover = 0
    for j in range(sims):
        inputs = {f"D{k}": _inputs(s[0][j], s[1][j]) for k, s in enumerate(sims_of)}
        (row,) = compare_average("Average", 4, inputs, "ref", ["m", "ref"])
        seed_cover += _covers(row.over_seeds, seed_target[j])
        image_cover += _covers(row.over_images, image_target[j])
        if j == 0:  # the average of the per-seed differences, over seeds: the mean of the datasets' means
            per = [compare_shot(d, 4, i, "ref")[0] for d, i in inputs.items()]
            assert row.mean == pytest.approx(np.mean([c.mean for c in per]), abs=1e-9)
            assert row.n_test == sizes.sum() and row.datasets == tuple(inputs)
    se = np.sqrt(LEVEL * (1 - LEVEL) / sims)
    assert abs(seed_cover / sims - LEVEL) < 4 * se and abs(image_cover / sims - LEVEL) < 4 * se, (
        seed_cover / sims, image_cover / sims)


def test_t_interval_matches_scipy_and_a_loop():
    rng = np.random.default_rng(5)
    values = rng.normal(1.0, 2.0, (7, 4))
    mean, low, high = t_interval(values)
    for j, row in enumerate(values):
        lo, hi = stats.t.interval(LEVEL, len(row) - 1, loc=row.mean(), scale=stats.sem(row))
        assert (low[j], high[j]) == pytest.approx((lo, hi), rel=1e-12)  # same formula, float64
        ci = stats.ttest_1samp(row, 0).confidence_interval(LEVEL)
        assert (low[j], high[j]) == pytest.approx((ci.low, ci.high), rel=1e-12)
    assert np.all(np.isnan(t_interval(values[:, :1])[1]))  # one seed: no interval
    assert t_interval(np.full(3, 2.0))[1:] == (2.0, 2.0)  # equal differences: zero width


def test_image_interval_matches_a_paired_bootstrap_over_images():
    """The t interval over images equals, up to Monte-Carlo error, the percentile bootstrap that resamples test
    images (the same ones in every seed) -- the bootstrap it stands in for."""
    rng = np.random.default_rng(6)
    correct_m, correct_ref, _, _ = simulate(rng, 1, 3, 300, 0.03, 0.02)
    cm, cr = correct_m[0], correct_ref[0]
    row = compare_shot("Toy", 4, _inputs(cm, cr), "ref")[0]

    def statistic(idx: np.ndarray, axis: int = -1) -> np.ndarray:
        """Mean difference over the resampled images idx [..., N], each with all its seeds."""
        idx = np.asarray(idx, int)
        return 100 * (cm[:, idx].astype(float) - cr[:, idx]).mean(axis=0).mean(axis=axis)

    boot = stats.bootstrap((np.arange(cm.shape[1]),), statistic, n_resamples=4000, confidence_level=LEVEL,
                           method="percentile", random_state=0, vectorized=True)
    width = row.over_images.high - row.over_images.low
    assert abs(boot.confidence_interval.low - row.over_images.low) < 0.05 * width
    assert abs(boot.confidence_interval.high - row.over_images.high) < 0.05 * width


def test_image_differences_and_stats_against_loops():
    rng = np.random.default_rng(7)
    cm, cr = rng.random((3, 50)) < 0.6, rng.random((3, 50)) < 0.5
    per = image_differences(cm, cr)
    loop = [100 * sum(int(cm[s, i]) - int(cr[s, i]) for s in range(3)) / 3 for i in range(50)]
    assert per == pytest.approx(loop, abs=1e-12)
    mean, se, df = image_stats(per)
    assert (mean, se, df) == pytest.approx((np.mean(loop), np.std(loop, ddof=1) / np.sqrt(50), 49), rel=1e-12)
    # one estimate: the pooled interval is its own t interval
    _, interval = pooled_interval([mean], [se], [df])
    assert (interval.low, interval.high) == pytest.approx(stats.t.interval(LEVEL, df, mean, se), rel=1e-12)
    # the seed-level mean equals the image-level mean when both come from the same predictions
    row = compare_shot("Toy", 4, _inputs(cm, cr), "ref")[0]
    assert row.mean == pytest.approx(mean, abs=1e-9) and row.n_test == 50


@pytest.mark.parametrize("mean, sd", [(1.0, 2.0), (-0.5, 0.6), (3.0, 1.0)])
def test_seeds_to_settle_reaches_the_power_in_simulated_sweeps(mean, sd):
    n = seeds_to_settle(mean, sd)
    assert n is not None and n >= 2
    rng = np.random.default_rng(8)
    rate = lambda k: np.mean([iv_excl for iv_excl in _excludes(rng.normal(mean, sd, (20000, k)))])  # noqa: E731
    assert rate(n) > 0.8 - 0.01  # Monte-Carlo SE 0.003
    if n > 2:
        assert rate(n - 1) < 0.8 + 0.01


def _excludes(values: np.ndarray) -> np.ndarray:
    _, low, high = t_interval(values)
    return (low > 0) | (high < 0)


def test_seeds_to_settle_edges():
    assert seeds_to_settle(0.0, 1.0) is None  # no difference seen: no seed count settles it
    assert seeds_to_settle(1.0, 0.0) == 2
    assert seeds_to_settle(0.01, 10.0) is None  # beyond SETTLE_CAP
    assert seeds_to_settle(1.0, 3.0) == seeds_to_settle(-1.0, 3.0) <= SETTLE_CAP


def test_open_comparisons_say_how_many_seeds_and_settled_ones_do_not():
    inputs = ShotInputs({"ref": {1: 50.0, 2: 52.0, 3: 51.0}, "a": {1: 51.0, 2: 55.0, 3: 51.5},
                         "b": {1: 60.0, 2: 62.0, 3: 61.5}})
    a, b = compare_shot("Toy", 2, inputs, "ref", ["ref", "a", "b"])
    assert a.method == "a" and not a.over_seeds.excludes_zero
    assert a.seeds_to_settle == seeds_to_settle(a.mean, a.sd) > 3 and a.settle == f"≈ {a.seeds_to_settle}"
    assert b.over_seeds.excludes_zero and b.seeds_to_settle is None and b.settle == "settled"
    assert a.over_images is None and "seeds only" in a.note  # no per-image results: degrades with a note


def test_bookkeeping_of_seeds_and_missing_inputs():
    rng = np.random.default_rng(9)
    cm, cr = rng.random((3, 20)) < 0.6, rng.random((3, 20)) < 0.5
    full = _inputs(cm, cr)
    assert compare_shot("Toy", 1, full, "other") == []  # no reference: nothing to compare
    # the method failed at seed 3: paired over seeds 1 and 2
    acc = {"m": {s: v for s, v in full.accuracy["m"].items() if s != 3}, "ref": full.accuracy["ref"]}
    (row,) = compare_shot("Toy", 1, ShotInputs(acc, full.correct), "ref")
    assert row.seeds == (1, 2) and row.mean == pytest.approx(100 * (cm[:2].mean() - cr[:2].mean()), abs=1e-9)
    # one seed: an interval over images, none over seeds
    (one,) = compare_shot("Toy", 1, _inputs(cm[:1], cr[:1]), "ref")
    assert one.over_seeds is None and one.over_images is not None and one.settle == "needs 2 seeds"
    # a selected run without its per-image results
    partial = ShotInputs(full.accuracy, {k: v for k, v in full.correct.items() if k != ("m", 2)})
    (row,) = compare_shot("Toy", 1, partial, "ref")
    assert row.over_images is None and row.over_seeds is not None and "missing" in row.note
    # the average needs the method in every dataset
    assert compare_average("Avg", 1, {"A": full, "B": ShotInputs({"ref": full.accuracy["ref"]})}, "ref",
                           ["m"]) == []
