"""Modality-gap diagnostics on synthetic features whose gap, cosines and accuracy are known analytically."""

import numpy as np
import pytest

from train_jax import gap
from train_jax.config import Settings
from train_jax.records import GapFile, Learned
from train_jax.report import gap_line

C, D = 4, 8


def _world(offset: float):
    """Orthonormal prototypes T = e_0..e_{C-1}; images of class y = normalise(T_y + g), g = offset * e_{D-1}
    (orthogonal to every prototype); two images per class."""
    text = np.eye(D, dtype=np.float32)[:C]
    g = offset * np.eye(D, dtype=np.float32)[D - 1]
    labels = np.repeat(np.arange(C), 2)
    images = text[labels] + g
    return text, g, labels, images / np.linalg.norm(images, axis=1, keepdims=True)


def test_unnormalised_offset_is_the_gap():
    text, g, labels, _ = _world(0.7)
    assert gap.modality_gap(text[labels] + g, text) == pytest.approx(0.7, abs=1e-6)


@pytest.mark.parametrize("offset", [0.0, 0.5, 2.0])
def test_before_stats_match_the_closed_form(offset):
    text, _, labels, images = _world(offset)
    s = np.sqrt(1 + offset**2)
    # mean image - mean prototype = mean(T) (1/s - 1) + g/s, with |mean(T)|^2 = 1/C and g orthogonal to T
    expected_gap = np.sqrt((1 / s - 1) ** 2 / C + offset**2 / s**2)
    st = gap.stats(images, labels, text)
    assert st["gap"] == pytest.approx(expected_gap, abs=1e-6)
    assert st["cos_own"] == pytest.approx(1 / s, abs=1e-6)
    assert st["cos_other"] == pytest.approx(0.0, abs=1e-6)
    assert st["margin"] == pytest.approx(1 / s, abs=1e-6)
    assert st["nearest_acc"] == 100.0


def test_wrong_nearest_prototypes_count():
    text = np.eye(D, dtype=np.float32)[:C]
    labels = np.arange(C)
    images = text[[0, 1, 3, 2]]  # classes 2 and 3 sit exactly on each other's prototype
    st = gap.stats(images, labels, text)
    assert st["nearest_acc"] == 50.0
    assert st["cos_own"] == pytest.approx(0.5) and st["cos_other"] == pytest.approx(0.5)
    assert st["margin"] == pytest.approx(0.0)


def test_a_map_that_removes_the_offset_closes_the_gap():
    """dW = -g g^T / |g|^2 (b = 0) sends normalise(T_y + g) to T_y: gap 0, own cosine 1, margin 1."""
    text, g, labels, images = _world(1.5)
    params = {"dW": -np.outer(g, g) / (g @ g), "b": np.zeros(D, np.float32)}
    learned = {"cmm/seed3": Learned(Settings(), params, {}), "zeroshot/seed3": Learned(Settings(epochs=0), params, {}),
               "linear_probe/seed3": Learned(Settings(), {}, {})}
    rows = gap.shot_rows(learned, 4, images, labels, text)
    assert [(r.method, r.shots, r.seeds) for r in rows] == [("cmm", 4, (3,))]  # only trained maps
    after = rows[0].mean
    assert after["gap"] == pytest.approx(0.0, abs=1e-6)
    assert after["cos_own"] == pytest.approx(1.0, abs=1e-6) and after["margin"] == pytest.approx(1.0, abs=1e-6)
    assert rows[0].std["gap"] == 0.0
    before = gap.stats(images, labels, text)
    md = gap.markdown("Toy", before, rows)
    assert "| CLIP (before) |" in md and "| cmm 4-shot (after) | 0.000 ± 0.000 |" in md
    line = gap_line([GapFile("Toy", before, tuple(rows))])
    assert f"{before['gap']:.3f} → 0.000" in line and "cmm 4-shot" in line
    assert gap_line([GapFile("Toy", before, ())]) == ""


def test_mean_over_seeds():
    text, g, labels, images = _world(1.0)
    full = {"dW": -np.outer(g, g) / (g @ g), "b": np.zeros(D, np.float32)}
    none = {"dW": np.zeros((D, D), np.float32), "b": np.zeros(D, np.float32)}
    learned = {f"cmm/seed{s}": Learned(Settings(), p, {}) for s, p in ((1, full), (2, none))}
    (row,) = gap.shot_rows(learned, 1, images, labels, text)
    before = gap.stats(images, labels, text)
    assert row.seeds == (1, 2)
    assert row.per_seed[1]["gap"] == pytest.approx(before["gap"], abs=1e-6)  # the identity map changes nothing
    assert row.mean["gap"] == pytest.approx(before["gap"] / 2, abs=1e-6)


def test_pca_keeps_a_plane_and_is_deterministic():
    rng = np.random.default_rng(0)
    plane = rng.normal(size=(30, 2)) * [3.0, 1.0]
    basis = np.linalg.qr(rng.normal(size=(D, 2)))[0]
    xy = gap.pca_2d(plane @ basis.T + 5.0)
    dist = lambda p: np.linalg.norm(p[:, None] - p[None], axis=-1)  # noqa: E731
    np.testing.assert_allclose(dist(xy), dist(plane), atol=1e-9)
    np.testing.assert_array_equal(xy, gap.pca_2d(plane @ basis.T + 5.0))


def test_plot_writes_a_png(tmp_path):
    text, g, labels, images = _world(1.0)
    gap.plot(tmp_path / "g.png", images, labels, text, text[labels], text, [f"c{i}" for i in range(C)], "Toy")
    assert (tmp_path / "g.png").read_bytes()[:4] == b"\x89PNG"
