"""Compile once: programs padded to bucket sizes train exactly the runs of unpadded ones, a second shot count
reuses the compiled programs, and the persistent compilation cache makes a rerun compile nothing."""

import json
import os
import subprocess
import sys
from pathlib import Path

import jax
import numpy as np
import pytest

from data.cache import Split
from helpers_train import GapWorld, write_gap_cache
from train_jax import compile_cache, gap, logreg
from train_jax.baselines import TipAdapterHead
from train_jax.logreg import LinearProbeHead
from train_jax.config import Settings
from train_jax.methods import CMMHead
from train_jax.runner import Buckets, Pool, Trained, hparam_arrays, predict_runs, train_runs
from train_jax.step import permutation_prefix
from train_jax.trainers import Job

ROOT = Path(__file__).resolve().parents[1]
CLASSES, SEEDS = 4, (1, 2)


def _problem(shots, aug_views=0):
    """Pool of the seeds' draws (shots per class each, disjoint), rows [S,N] of 2 settings x 2 seeds, test set."""
    world = GapWorld(2, classes=CLASSES, dim=16)
    split = world.split("train", shots * len(SEEDS), aug_views)
    feats = split["features"][:, None]
    if aug_views:
        feats = np.concatenate([feats, split["aug_features"]], axis=1)
    per_class = np.argsort(split["labels"], kind="stable").reshape(CLASSES, -1)
    rows = np.stack([per_class[:, i * shots:(i + 1) * shots].reshape(-1) for i in (0, 1, 0, 1)])
    return world, Pool(feats, split["labels"].astype(np.int32)), rows, world.images(10)[0]


def _train(head, pool, rows, world, settings, buckets=Buckets()):
    hp = hparam_arrays(settings)
    trained = train_runs(head, hp, rows, np.array([1, 2, 1, 2]), pool, world.text, batch_size=settings[0].batch_size,
                         use_aug=settings[0].use_aug, buckets=buckets)
    return hp, trained


@pytest.mark.parametrize("head, batch_size, use_aug", [
    (CMMHead(learn_text=True), 5, False),  # 16 rows: 4 steps, the last of 1 row; padded to 8 steps of 5
    (CMMHead(), 256, True),  # one full batch of 16 rows, padded to one batch of 40
    (LinearProbeHead(), 7, False),
    (TipAdapterHead(), 5, True),  # keys [N,D]: rows are not padded, the pool is
], ids=["cmm_minibatch", "cmm_full_batch_aug", "linear_probe", "tip_adapter_f"])
def test_bucketed_equals_unbucketed(head, batch_size, use_aug):
    world, pool, rows, test_x = _problem(shots=4, aug_views=2 if use_aug else 0)
    settings = [Settings(epochs=4, lr=1e-2, batch_size=batch_size, use_aug=use_aug),
                Settings(epochs=3, lr=3e-2, alpha=2.0, batch_size=batch_size, use_aug=use_aug)]
    settings = [settings[0], settings[0], settings[1], settings[1]]
    hp, exact = _train(head, pool, rows, world, settings)
    _, padded = _train(head, pool, rows, world, settings, Buckets(rows=40, pool=70))
    assert padded.failed.tolist() == exact.failed.tolist() == [False] * 4
    for a, b in zip(jax.tree.leaves((exact.params, exact.consts)), jax.tree.leaves((padded.params, padded.consts))):
        assert a.shape == b.shape
        np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(padded.final_loss, exact.final_loss, rtol=1e-5, atol=1e-6)
    np.testing.assert_array_equal(predict_runs(head, padded, hp, test_x, world.text),
                                  predict_runs(head, exact, hp, test_x, world.text))


def test_failed_run_stops_at_the_same_step_when_bucketed():
    world, pool, rows, _ = _problem(shots=4)
    hp = hparam_arrays([Settings(epochs=3, lr=1e-2, batch_size=5)] * 4)
    hp["lr"][3] = np.inf
    runs = [train_runs(CMMHead(), hp, rows, np.array([1, 2, 1, 2]), pool, world.text, batch_size=5, use_aug=False,
                       buckets=b) for b in (Buckets(), Buckets(rows=40, pool=70))]
    assert [r.failed.tolist() for r in runs] == [[False, False, False, True]] * 2
    assert [r.fail_step.tolist() for r in runs] == [[-1, -1, -1, 0]] * 2


def test_second_shot_count_compiles_nothing():
    """Shots 1 and 3 (N = 4 and 12 rows; 1 and 3 steps per epoch) in the buckets of 3 shots: one program each for
    training and prediction, compiled for the first shot count only."""
    settings = [Settings(epochs=2, lr=1e-2, batch_size=5)] * 4
    compiled = []
    for shots in (1, 3):
        world, pool, rows, test_x = _problem(shots)
        before = compile_cache.stats()
        hp, trained = _train(CMMHead(), pool, rows, world, settings, Buckets(rows=3 * CLASSES, pool=6 * CLASSES))
        predict_runs(CMMHead(), trained, hp, test_x, world.text)
        predict_runs(CMMHead(), trained, hp, test_x[:3], world.text)  # a smaller set: the same program
        compiled.append((compile_cache.stats() - before).programs)
    assert compiled[0] > 0 and compiled[1] == 0, compiled


def _fit_probe(shots, buckets=Buckets()):
    """``logreg.fit`` on the pool of ``_problem(shots)`` (2 C values x 2 seeds) -> (params, val predictions)."""
    world, pool, rows, test_x = _problem(shots)
    split = Split(pool.features[:, 0], pool.labels, np.array([f"img{i}.png" for i in range(len(pool.labels))]))
    settings = [Settings(c=0.1), Settings(c=0.1), Settings(c=10.0), Settings(c=10.0)]
    fitted = logreg.fit(Job(LinearProbeHead(), settings, split, np.arange(len(pool.labels)), rows,
                            np.array([1, 2, 1, 2]), world.text, "Synth", test_x, np.zeros(len(test_x), np.int32),
                            np.ones((4, len(test_x)), bool), buckets=buckets))
    assert not fitted.failed.any()
    trained = Trained(fitted.params, fitted.consts, fitted.failed, fitted.fail_step, fitted.final_loss,
                      np.zeros((4, 0), np.float32))
    return fitted, predict_runs(LinearProbeHead(), trained, hparam_arrays(settings), test_x, world.text)


def test_linear_probe_padded_equals_unpadded():
    """The L-BFGS probe padded to 3 shots' rows and pool solves the 2-shot problem: same params, loss and
    predictions."""
    (exact, exact_pred), (padded, padded_pred) = _fit_probe(2), _fit_probe(2, Buckets(3 * CLASSES, 6 * CLASSES))
    for a, b in zip(jax.tree.leaves(exact.params), jax.tree.leaves(padded.params)):
        assert a.shape == b.shape
        np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-5)
    np.testing.assert_allclose(padded.final_loss, exact.final_loss, rtol=1e-5, atol=1e-6)
    np.testing.assert_array_equal(padded_pred, exact_pred)


def test_linear_probe_second_shot_count_compiles_nothing():
    """Shots 1 and 3 in the buckets of 3 shots: the solve and prediction programs are built for the first only."""
    jax.clear_caches()  # the programs of an earlier test with these shapes
    buckets = Buckets(3 * CLASSES, 6 * CLASSES)
    compiled = []
    for shots in (1, 3):
        before = compile_cache.stats()
        _fit_probe(shots, buckets)
        compiled.append((compile_cache.stats() - before).programs)
    assert compiled[0] > 0 and compiled[1] == 0, compiled


def test_gap_map_compiles_once_for_any_test_set_size():
    """The mapper of the modality-gap diagnostics on test sets of 5, 1,500 and 40 rows (1 and 2 blocks): one
    program, compiled for the first, giving the eager map's rows."""
    jax.clear_caches()
    world = GapWorld(3, classes=CLASSES, dim=16)
    settings = Settings(learn_text=True)
    rng = np.random.default_rng(0)
    params = {"dW": rng.normal(0, 0.1, (16, 16)).astype(np.float32), "b": rng.normal(0, 0.1, 16).astype(np.float32),
              "dT": rng.normal(0, 0.1, (CLASSES, 16)).astype(np.float32)}
    compiled = []
    for n in (5, 1500, 40):
        images = world.images(-(-n // CLASSES))[0][:n]
        before = compile_cache.stats()
        v, t = gap.mapped(settings, params, images, world.text)
        compiled.append((compile_cache.stats() - before).programs)
        eager = gap.CrossModalMapper(True).apply({"params": params}, images, world.text)
        np.testing.assert_allclose(v, eager[0], rtol=1e-5, atol=1e-6)
        np.testing.assert_allclose(t, eager[1], rtol=1e-5, atol=1e-6)
    assert compiled[0] > 0 and compiled[1:] == [0, 0], compiled


def test_cache_dir_choice(monkeypatch, tmp_path):
    monkeypatch.delenv(compile_cache.ENV, raising=False)
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path))
    assert compile_cache.cache_dir() == tmp_path / "cmm" / "jax"
    monkeypatch.delenv("XDG_CACHE_HOME")
    assert compile_cache.cache_dir() == Path.home() / ".cache" / "cmm" / "jax"
    monkeypatch.setenv(compile_cache.ENV, str(tmp_path / "env"))
    assert compile_cache.cache_dir() == tmp_path / "env"
    assert compile_cache.cache_dir(str(tmp_path / "opt")) == tmp_path / "opt"
    assert compile_cache.cache_dir(str(tmp_path / "opt"), disabled=True) is None
    monkeypatch.setenv(compile_cache.ENV, "off")
    assert compile_cache.cache_dir() is None


def test_rerun_compiles_nothing_with_the_persistent_cache(tmp_path):
    """Two fresh processes train the same sweep into two folders: the second loads every program from the cache;
    with the cache off, it compiles them again."""
    cache = write_gap_cache(tmp_path / "synth.h5", GapWorld(1, classes=5, dim=16), train=4, val=2, test=6)
    env = {**os.environ, compile_cache.ENV: str(tmp_path / "jax_cache"), "JAX_PLATFORMS": "cpu",
           "PYTHONPATH": str(ROOT)}

    def train(out, *extra):
        argv = ["--cache", str(cache), "--out", str(tmp_path / out), "--shots", "1", "2", "--seeds", "1",
                "--methods", "zeroshot", "cmm", "--grid", "lr=1e-2", "epochs=3", *extra]
        proc = subprocess.run([sys.executable, "-m", "train_jax", *argv], cwd=ROOT, env=env, capture_output=True,
                              text=True, timeout=300)
        assert proc.returncode == 0, proc.stderr[-3000:]
        assert "compiled" in proc.stdout
        return json.loads((tmp_path / out / "compile.json").read_text())

    cold, warm, off = train("cold"), train("warm"), train("off", "--no-compile-cache")
    assert cold["compiled"] > 0 and cold["programs"] == warm["programs"] == off["programs"]
    assert warm["compiled"] == 0 and warm["cache_hits"] == warm["programs"]
    assert off["compiled"] == off["programs"] and off["cache_hits"] == 0
    assert any((tmp_path / "jax_cache").iterdir())


@pytest.mark.parametrize("n, size", [(1, 4), (2, 2), (10, 160), (1625, 1700), (1626, 1700), (3000, 3000)])
def test_permutation_prefix_is_jax_permutation(n, size):
    """Padded to any size, the first n entries are jax.random.permutation(key, n) (1 sort round up to 1,625
    elements, 2 from 1,626), the rest stay in place."""
    key = jax.random.PRNGKey(n)
    got = np.asarray(jax.jit(permutation_prefix, static_argnums=2)(key, np.int32(n), size))
    expected = np.asarray(jax.random.permutation(key, n)) if n > 1 else np.arange(1)
    np.testing.assert_array_equal(got[:n], expected)
    np.testing.assert_array_equal(got[n:], np.arange(n, size))
