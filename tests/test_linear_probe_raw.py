"""The linear probe on raw features (norm * unit feature, as CoOp's lpclip fits scikit-learn on them): the solver
against scikit-learn at the optimum, ``logreg.fit`` reading the cache's norms, and a whole experiment whose test
accuracy is scikit-learn's on the raw test features."""

import warnings

import jax
import numpy as np
import pytest
from sklearn.linear_model import LogisticRegression

from data.cache import Split
from data.cache_writer import write_cache
from helpers_train import GapWorld
from train_jax import experiment, logreg
from train_jax.config import Settings
from train_jax.lbfgs_path import solve_paths
from train_jax.logreg import LinearProbeHead
from train_jax.trainers import Job


def _world(seed=0, classes=3, dim=8, per_class=8):
    """Unit features, and norms that differ by class and row (so raw and unit features give other models)."""
    world = GapWorld(seed, classes=classes, dim=dim)
    x, y = world.images(per_class)
    norms = (1.0 + 2.0 * y + np.random.default_rng(seed).uniform(0.0, 1.0, len(y))).astype(np.float32)
    return world, x, y, norms


def _sklearn(x, y, c, tol=1e-4):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # ConvergenceWarning at tight tolerances
        return LogisticRegression(C=c, tol=tol, max_iter=100000).fit(x.astype(np.float64), y)


@pytest.mark.parametrize("c", [0.1, 10.0])
def test_raw_feature_solution_is_scikit_learns(c):
    _, x, y, norms = _world()
    raw = x * norms[:, None]
    params, _, _ = jax.device_get(solve_paths(raw, y.astype(np.int32), np.arange(len(y))[None],
                                              np.array([[c]], np.float32), len(y), classes=3, tol=1e-6))
    ref = _sklearn(raw, y, c, tol=1e-10)
    scale = np.abs(ref.coef_).max()
    np.testing.assert_allclose(params["W"][0, 0], ref.coef_, atol=2e-3 * scale)  # float32 stopped at |g| <= 1e-6
    b = params["b"][0, 0]
    np.testing.assert_allclose(b - b.mean(), ref.intercept_ - ref.intercept_.mean(), atol=2e-3 * scale)


def test_fit_trains_on_the_raw_features_of_the_split():
    world, x, y, norms = _world(1)
    split = Split(x, y, np.array([f"img{i}.png" for i in range(len(y))]), norms=norms)
    rows = np.stack([np.arange(len(y))] * 2)
    settings = [Settings(c=1.0), Settings(c=100.0)]
    fitted = logreg.fit(Job(LinearProbeHead(), settings, split, np.arange(len(y)), rows, np.array([1, 1]),
                            world.text, "Synth", x[:0], y[:0], np.zeros((2, 0), bool)))
    for i, st in enumerate(settings):
        raw, unit = _sklearn(x * norms[:, None], y, st.c), _sklearn(x, y, st.c)
        gap = np.abs(fitted.params["W"][i] - raw.coef_).max()
        assert gap < 0.05 * np.abs(raw.coef_).max()  # both stopped at |gradient| <= 1e-4
        assert gap < 0.2 * np.abs(fitted.params["W"][i] - unit.coef_).max()  # not the unit features' model


def test_experiment_scores_the_probe_on_raw_features(tmp_path):
    world = GapWorld(2, classes=4, dim=16)
    rng = np.random.default_rng(2)
    splits = {}
    for name, per_class in (("train", 6), ("val", 4), ("test", 30)):
        feats, labels = world.images(per_class)
        splits[name] = {"features": feats, "labels": labels, "paths": [f"{name}/{i}.png" for i in range(len(labels))],
                        "norms": (1.0 + labels + rng.uniform(0.0, 2.0, len(labels))).astype(np.float32)}
    path = write_cache(tmp_path / "c.h5", attrs={"dataset": "Synth", "model": "synthetic", "embed_dim": 16},
                       classnames=[f"c{i}" for i in range(4)], templates=["a photo of a {}."],
                       text_features=world.text[:, None], splits=splits)
    task = experiment.load_task(path)
    result = experiment.run_shots(task, 4, [1], ["linear_probe"], [Settings(c=1.0)], [])
    (record,) = result.records
    picks = experiment._draw(task, 4, [1])[0][1]
    train, test = splits["train"], splits["test"]
    model = _sklearn(train["features"][picks] * train["norms"][picks, None], train["labels"][picks], 1.0)
    want = 100 * np.mean(model.predict(test["features"] * test["norms"][:, None]) == test["labels"])
    assert record.test_acc == pytest.approx(want, abs=100 / len(test["labels"]) + 1e-9)  # at most one image apart
