"""The L-BFGS path solver of the linear probe (``train_jax.lbfgs_path``): its objective by row blocks against a
numpy transcription, each C's solution along a warm-started path against a float64 scipy solve at the optimum,
warm starts that cost fewer iterations than cold solves, and groups that do not change a path's result."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from scipy.optimize import minimize

from helpers_train import GapWorld
from train_jax import lbfgs_path
from train_jax.lbfgs_path import solve_paths, value_and_grad


def _numpy_objective(theta, x, y, c):
    """mean CE + ||W||^2 / (2 C n) and its gradient in float64 (x [n,D], theta [C, D+1] = W | b)."""
    theta, x = theta.astype(np.float64), x.astype(np.float64)
    n, dim = x.shape
    w, b = theta[:, :dim], theta[:, dim]
    z = x @ w.T + b
    z -= z.max(axis=1, keepdims=True)
    p = np.exp(z) / np.exp(z).sum(axis=1, keepdims=True)
    value = -np.mean(np.log(p[np.arange(n), y])) + np.sum(w * w) / (2 * c * n)
    g = (p - np.eye(theta.shape[0])[y]) / n
    return value, np.concatenate([g.T @ x + w / (c * n), g.sum(axis=0)[:, None]], axis=1)


def _reference(x, y, classes, c):
    """The float64 optimum by scipy's L-BFGS-B to a tight tolerance -> (theta [C, D+1], minimum)."""
    dim = x.shape[1]
    fun = lambda v: tuple(a.ravel() if i else a for i, a in  # noqa: E731
                          enumerate(_numpy_objective(v.reshape(classes, dim + 1), x, y, c)))
    res = minimize(fun, np.zeros(classes * (dim + 1)), jac=True, method="L-BFGS-B",
                   options={"maxiter": 20000, "gtol": 1e-12, "ftol": 1e-15})
    return res.x.reshape(classes, dim + 1), res.fun


@pytest.mark.parametrize("n,block", [(24, 24), (24, 8), (13, 8), (1, 8)])
def test_blockwise_objective_is_the_formula_on_the_real_rows(n, block):
    """Rows past n pad (garbage here, so that reading one would show); only ceil(n / block) blocks are read."""
    rng = np.random.default_rng(0)
    x, y = rng.normal(size=(24, 5)).astype(np.float32), rng.integers(0, 3, 24).astype(np.int32)
    x[n:], y[n:] = 1e3, 2
    theta = rng.normal(size=(3, 6)).astype(np.float32)
    value, grad = value_and_grad(jnp.asarray(theta), jnp.asarray(x), jnp.asarray(y), jnp.int32(n),
                                 jnp.float32(1 / (0.5 * n)), block)
    want_value, want_grad = _numpy_objective(theta, x[:n], y[:n], 0.5)
    assert float(value) == pytest.approx(want_value, rel=1e-5)  # float32 sums of <= 24 terms
    np.testing.assert_allclose(grad, want_grad, rtol=1e-4, atol=1e-6)


def test_each_c_of_a_warm_started_path_is_the_optimum():
    world = GapWorld(3, classes=4, dim=8)
    x, y = world.images(6)
    cs = np.array([[1e-3, 0.1, 1.0, 10.0, 1000.0]], np.float32)
    rows = np.arange(24)[None]
    solve = lambda **kw: jax.device_get(solve_paths(x, y.astype(np.int32), rows, cs, 24, classes=4, **kw))  # noqa: E731
    (params, loss, iters), (tight, tight_loss, _) = solve(), solve(tol=1e-6)
    for i, c in enumerate(cs[0]):
        theta, best = _reference(x, y, 4, float(c))
        # scikit-learn's stopping rule holds at the returned point (float64 gradient; float32 evaluation slack 20%)
        found = np.concatenate([params["W"][0, i], params["b"][0, i][:, None]], axis=1)
        assert np.abs(_numpy_objective(found, x, y, float(c))[1]).max() <= 1.2e-4
        assert loss[0, i] >= best - 1e-6
        assert tight_loss[0, i] == pytest.approx(best, rel=1e-6)
        scale = np.abs(theta[:, :8]).max()
        np.testing.assert_allclose(tight["W"][0, i], theta[:, :8], atol=1e-3 * scale)
        b = tight["b"][0, i]
        np.testing.assert_allclose(b - b.mean(), theta[:, 8] - theta[:, 8].mean(), atol=1e-3 * scale)
    assert np.all(iters < lbfgs_path.MAX_ITER)


def test_warm_starts_cost_fewer_iterations_than_cold_solves():
    world = GapWorld(4, classes=5, dim=16)
    x, y = world.images(8)
    cs = np.array([10 ** (k / 2) for k in range(-4, 9)], np.float32)
    rows = np.arange(40)
    _, path_loss, path_iters = jax.device_get(solve_paths(x, y.astype(np.int32), rows[None], cs[None], 40,
                                                          classes=5))
    _, cold_loss, cold_iters = jax.device_get(solve_paths(x, y.astype(np.int32), np.stack([rows] * len(cs)),
                                                          cs[:, None], 40, classes=5))
    # the same solutions where the objective is well conditioned (C <= 10); at larger C (separable rows) the
    # tolerance 1e-4 on the gradient leaves the loss free within a few 1e-4, as scikit-learn's cold and warm fits
    np.testing.assert_allclose(path_loss[0, :7], cold_loss[:7, 0], rtol=1e-3)
    assert path_iters.sum() < 0.6 * cold_iters.sum(), (path_iters, cold_iters)
    repeat = np.array([[1.0, 1.0]], np.float32)  # a warm start that meets the tolerance takes no iteration
    assert jax.device_get(solve_paths(x, y.astype(np.int32), rows[None], repeat, 40, classes=5))[2][0, 1] == 0


def test_a_path_result_does_not_depend_on_its_group():
    """Paths solved one at a time, or vmapped together: the same results up to float rounding."""
    world = GapWorld(5, classes=3, dim=8)
    x, y = world.images(10)
    rows = np.stack([np.arange(0, 30, 2), np.arange(1, 30, 2), np.r_[0:5, 10:15, 20:25]])  # every class in each
    cs = np.array([[0.01, 1.0, 100.0], [0.1, 10.0, 10.0], [1.0, 2.0, 3.0]], np.float32)
    one, together = (jax.device_get(solve_paths(x, y.astype(np.int32), rows, cs, 15, classes=3, group=g, tol=1e-6))
                     for g in (1, 3))
    np.testing.assert_allclose(one[1], together[1], rtol=1e-5)
    # the same weights (|gradient| <= 1e-6 and a penalty of 1 / (C n) >= 6.7e-4 on W bound their error by ~1.5e-3)
    # and predictions; the intercepts are left out: at C = 100 the rows are separated and the loss is nearly flat
    # in them (they move by ~0.1 between stops at |gradient| <= 1e-6)
    np.testing.assert_allclose(one[0]["W"], together[0]["W"], atol=1e-3 * np.abs(together[0]["W"]).max())
    logits = lambda p: np.einsum("nd,plcd->plnc", x, p["W"]) + p["b"][:, :, None]  # noqa: E731
    np.testing.assert_array_equal(logits(one[0]).argmax(-1), logits(together[0]).argmax(-1))
