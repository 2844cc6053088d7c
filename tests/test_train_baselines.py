"""The baselines as their authors run them: CoOp's L-BFGS logistic-regression probe (equal to a float64 reference
solve), Tip-Adapter-F's keys (upstream formula on the cached views), recipe and (beta, alpha) search on the
validation rows only."""


import jax
import numpy as np
import pytest
from scipy.optimize import minimize

from data.cache import Split, read_cache
from helpers_train import GapWorld, write_gap_cache
from train_jax import baselines, experiment, logreg, report
from train_jax.baselines import search, search_values
from train_jax.config import Settings
from train_jax.logreg import LinearProbeHead, solve_runs
from train_jax.methods import METHODS
from train_jax.trainers import Job


def _reference_logreg(x, y, classes, c):
    """scikit-learn's objective (mean CE + ||W||^2 / (2 C N), intercept free) solved by scipy's L-BFGS-B in
    float64 to a tight tolerance -> W [C,D], b [C], the minimum."""
    x, n, dim = x.astype(np.float64), len(y), x.shape[1]
    onehot = np.eye(classes)[y]

    def fun(theta):
        w, b = theta[: classes * dim].reshape(classes, dim), theta[classes * dim:]
        z = x @ w.T + b
        z -= z.max(axis=1, keepdims=True)
        p = np.exp(z) / np.exp(z).sum(axis=1, keepdims=True)
        loss = -np.mean(np.log(p[np.arange(n), y])) + np.sum(w * w) / (2 * c * n)
        g = (p - onehot) / n
        return loss, np.concatenate([(g.T @ x + w / (c * n)).ravel(), g.sum(axis=0)])

    res = minimize(fun, np.zeros(classes * (dim + 1)), jac=True, method="L-BFGS-B",
                   options={"maxiter": 10000, "gtol": 1e-12, "ftol": 1e-15})
    return res.x[: classes * dim].reshape(classes, dim), res.x[classes * dim:], res.fun


def test_logreg_matches_a_float64_reference_for_every_c():
    world = GapWorld(3, classes=4, dim=8)
    x, y = world.images(6)
    rows = np.stack([np.arange(24)] * 3)
    cs = np.array([0.1, 10.0, 1000.0], np.float32)
    solve = lambda **kw: jax.device_get(solve_runs(x, y.astype(np.int32), rows, cs, classes=4, **kw))  # noqa: E731
    (params, loss, iters), (tight, tight_loss, _) = solve(), solve(tol=1e-6)
    assert np.all(np.isfinite(loss)) and np.all(iters < 1000)
    for i, c in enumerate(cs):
        w, b, best = _reference_logreg(x, y, 4, float(c))
        assert loss[i] == pytest.approx(best, rel=1e-3)  # scikit-learn's stopping rule (every |gradient| <= 1e-4)
        assert tight_loss[i] == pytest.approx(best, rel=1e-6)
        scale = np.abs(w).max()
        np.testing.assert_allclose(tight["W"][i], w, atol=1e-3 * scale)  # solved further: its parameters
        np.testing.assert_allclose(tight["b"][i] - tight["b"][i].mean(), b - b.mean(), atol=1e-3 * scale)
    assert np.abs(params["W"][2]).max() > 10 * np.abs(params["W"][0]).max()  # weaker penalty, larger weights


def _run_tip(tmp_path, aug_views, dataset="EuroSAT"):
    world = GapWorld(6, classes=4, dim=16)
    path = write_gap_cache(tmp_path / "c.h5", world, train=6, val=4, test=10, dataset=dataset, aug_views=aug_views)
    task = experiment.load_task(path)
    return task, experiment.run_shots(task, 2, [1, 2], ["tip_adapter_f"], [Settings()], [])


def test_tip_adapter_keys_are_the_upstream_formula_on_the_cached_views(tmp_path, monkeypatch):
    monkeypatch.setattr(baselines, "recipe", lambda dataset: baselines.Recipe(2, (12, 10), 0))  # keys untrained
    task, result = _run_tip(tmp_path, aug_views=5)
    train = read_cache(task.cache.path).splits["train"]
    views = train.aug_features  # [N, A, D], unit-norm as the cache stores them
    upstream = views.mean(axis=1)
    upstream /= np.linalg.norm(upstream, axis=-1, keepdims=True)  # the mean over the views, normalised once
    for seed in (1, 2):
        keys = result.learned[f"tip_adapter_f/seed{seed}"].params["keys"]
        nearest = np.argmin(np.linalg.norm(keys[:, None] - upstream[None], axis=-1), axis=1)
        np.testing.assert_allclose(keys, upstream[nearest], rtol=1e-5, atol=1e-6)
        assert len(set(nearest.tolist())) == len(keys) == 8  # 2 shots x 4 classes, each its own image
        assert not np.allclose(keys, train.features[nearest], atol=1e-3)  # the plain view is not among them


def test_search_is_upstreams_grid_argmax():
    assert search_values(7, 200)[[0, 1, 199]] == pytest.approx([0.1, 0.1345, 0.1 + 199 * 6.9 / 200])
    world = GapWorld(5, classes=3, dim=8)
    keys, y = world.images(2)
    val, val_y = world.images(5)
    params, consts = {"keys": keys}, {"values": np.eye(3, dtype=np.float32)[y]}
    betas, alphas = search_values(12, 200), search_values(10, 20)
    cache = lambda b: np.exp(-b * (1 - val @ keys.T)) @ consts["values"]  # noqa: E731
    acc = np.array([[np.mean(np.argmax(2 * val @ world.text.T + a * cache(b), axis=1) == val_y) for a in alphas]
                    for b in betas])  # upstream's double loop (a weak zero-shot term, so that the grid matters)
    best = np.unravel_index(np.argmax(acc), acc.shape)  # its strict ">": the first best in beta-major order
    assert acc.min() < acc.max()
    chosen = search(params, consts, val, val_y, world.text, (12, 10), logit_scale=2.0)
    assert chosen == pytest.approx((betas[best[0]], alphas[best[1]]))
    assert search(params, consts, val[:0], val_y[:0], world.text, (7, 3)) == pytest.approx((0.1, 0.1))  # all tie


def test_tip_adapter_recipe_and_search_on_validation(tmp_path, monkeypatch):
    seen = []
    real = baselines.search
    monkeypatch.setattr(baselines, "search", lambda *a, **k: seen.append(a[2:4]) or real(*a, **k))
    task, result = _run_tip(tmp_path, aug_views=3)
    val = read_cache(task.cache.path).splits["val"]
    val_set = {tuple(np.round(v, 5)) for v in val.features}
    for feats, labels in seen:  # each run searched on 2-shot validation rows (min(K, 4) per class), never test
        assert len(feats) == 8 and {tuple(np.round(v, 5)) for v in feats} <= val_set
    assert len(seen) == 2
    rec = baselines.recipe("eurosat")
    betas, alphas = search_values(rec.scale[0], 200), search_values(rec.scale[1], 20)
    for r in result.records:
        s = r.settings
        assert (s.epochs, s.lr, s.warmup, s.adam_eps, s.use_aug) == (100, 1e-3, 0.0, 1e-4, True)
        assert np.isclose(betas, s.beta).any() and np.isclose(alphas, s.alpha).any()
        assert r.note == "" and r.selected
        assert len(r.loss_curve) == 100 and all(v is not None for v in r.loss_curve)  # its 100 epochs' losses
    learned = result.learned["tip_adapter_f/seed1"]
    assert learned.settings == result.records[0].settings


def test_tip_adapter_without_views_says_so(tmp_path):
    _, result = _run_tip(tmp_path, aug_views=0, dataset="MyFolder")
    assert all(r.note == baselines.NO_VIEWS.format("MyFolder") for r in result.records)
    assert "Note: " + baselines.NO_VIEWS.format("MyFolder") in report.run_markdown("MyFolder",
                                                                                  report.summarize(result.records))
    assert all(r.settings.epochs == baselines.OTHER.epochs and not r.settings.use_aug
               for r in result.records)


def test_methods_follow_their_recipes():
    grid = [Settings(lr=1e-2, c=0.1), Settings(lr=1e-3, c=10.0)]
    assert [s.c for s in METHODS["linear_probe"].settings(grid)] == [0.1, 10.0]
    assert len({s.lr for s in METHODS["linear_probe"].settings(grid)}) == 1  # L-BFGS: no learning rate
    assert METHODS["tip_adapter_f"].settings(grid) == [Settings(**{**Settings().to_dict(), **baselines.FORCED})]


def test_linear_probe_chunks_equal_one_program():
    world = GapWorld(7, classes=3, dim=8)
    x, y = world.images(4)
    split = Split(x, y, np.array([f"img{i}.png" for i in range(12)]))
    rows = np.stack([np.arange(0, 12, 2), np.arange(1, 12, 2), np.arange(0, 12, 2)])
    settings = [Settings(c=0.1), Settings(c=1.0), Settings(c=100.0)]
    job = lambda budget: Job(LinearProbeHead(), settings, split, np.arange(12), rows, np.array([1, 2, 1]),  # noqa: E731
                             world.text, "Synth", x[:0], y[:0], np.zeros((3, 0), bool), budget)
    whole, chunked = logreg.fit(job(1 << 30)), logreg.fit(job(2 * logreg.run_bytes(6, 8, 3)))  # 2 chunks of 2
    assert chunked.settings == settings and not chunked.failed.any()
    for a, b in zip(jax.tree.leaves(whole.params), jax.tree.leaves(chunked.params)):
        assert a.shape[0] == 3
        np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-6)
