"""The vmapped runner: equal to separate runs, deterministic, zero-shot at init, chunking, failed runs, sharding,
and the method itself (CMM beats zero-shot, the triplet term helps) on synthetic modality-gap features."""

import dataclasses
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import jax
import numpy as np
import pytest

from helpers_train import GapWorld
from train_jax.baselines import TipAdapterHead
from train_jax.config import Settings
from train_jax.evaluate import accuracy
from train_jax.methods import CMMHead
from train_jax.runner import Pool, hparam_arrays, predict_runs, train_runs

ROOT = Path(__file__).resolve().parents[1]
SEEDS = (1, 2, 3)


def _problem(shots=2, world_seed=0, dim=32, classes=8, aug_views=0):
    """A gap world, a pool of `shots` images per class for each of 3 seeds, and a test set."""
    world = GapWorld(world_seed, classes=classes, dim=dim)
    split = world.split("train", shots * len(SEEDS), aug_views)
    feats = split["features"][:, None]
    if aug_views:
        feats = np.concatenate([feats, split["aug_features"]], axis=1)
    pool = Pool(feats, split["labels"].astype(np.int32))
    per_class = np.argsort(split["labels"], kind="stable").reshape(classes, -1)
    rows = np.stack([per_class[:, i * shots:(i + 1) * shots].reshape(-1) for i in range(len(SEEDS))])
    test_x, test_y = world.images(20)
    return world, pool, rows, test_x, test_y


def _train(head, settings, pool, rows, text, seeds, **kw):
    hp = hparam_arrays(settings)
    kw = {"batch_size": settings[0].batch_size, "use_aug": settings[0].use_aug, **kw}
    return hp, train_runs(head, hp, rows, np.asarray(seeds), pool, text, **kw)


HEAD = CMMHead(learn_text=True)
SETTINGS = Settings(epochs=6, lr=1e-2, batch_size=5)  # mini-batches: shuffling and padding are exercised


@pytest.fixture(scope="module")
def reference():
    """3 seeds of CMM (learned text, mini-batches) trained in one vmapped program; the other tests reuse its
    compiled program by keeping its shapes (S = 3, N = 16, max 6 epochs) or those of a single run."""
    world, pool, rows, test_x, test_y = _problem()
    hp, trained = _train(HEAD, [SETTINGS] * 3, pool, rows, world.text, SEEDS)
    preds = predict_runs(HEAD, trained, hp, test_x, world.text)
    return world, pool, rows, test_x, test_y, trained, preds


def _assert_trees_close(a, b, **tol):
    for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b)):
        np.testing.assert_allclose(x, y, **tol)


def _run(tree, i):
    return jax.tree.map(lambda x: x[i], tree)


def test_vmapped_equals_separate_runs(reference):
    world, pool, rows, test_x, test_y, together, preds = reference
    assert not np.any(together.failed) and np.all(np.isfinite(together.final_loss))
    acc = accuracy(preds, test_y)
    for i, seed in enumerate(SEEDS):
        hp1, alone = _train(HEAD, [SETTINGS], pool, rows[i:i + 1], world.text, [seed])
        _assert_trees_close(_run(together.params, i), _run(alone.params, 0), rtol=1e-5, atol=1e-6)
        assert accuracy(predict_runs(HEAD, alone, hp1, test_x, world.text), test_y)[0] == acc[i]


def test_vmapped_equals_separate_runs_tip_adapter_with_aug_views():
    world, pool, rows, test_x, test_y = _problem(aug_views=3)
    settings = [Settings(epochs=3, lr=1e-2, batch_size=7, use_aug=True)] * 2
    hp, together = _train(TipAdapterHead(), settings, pool, rows[:2], world.text, SEEDS[:2])
    acc = accuracy(predict_runs(TipAdapterHead(), together, hp, test_x, world.text), test_y)
    hp1, alone = _train(TipAdapterHead(), settings[:1], pool, rows[1:2], world.text, SEEDS[1:2])
    _assert_trees_close(_run(together.params, 1), _run(alone.params, 0), rtol=1e-5, atol=1e-6)
    assert accuracy(predict_runs(TipAdapterHead(), alone, hp1, test_x, world.text), test_y)[0] == acc[1]
    assert not np.allclose(together.params["keys"][1], np.mean(pool.features[rows[1]], axis=1), atol=1e-3)


def test_identical_seeds_identical_results(reference):
    world, pool, rows, _, _, trained, _ = reference
    _, again = _train(HEAD, [SETTINGS] * 3, pool, rows[[0, 0, 1]], world.text, [1, 1, 2])
    for ref, x in zip(jax.tree.leaves(trained.params), jax.tree.leaves(again.params)):
        assert np.array_equal(x[0], x[1]) and np.array_equal(x[0], ref[0]) and np.array_equal(x[2], ref[1])
    _, other_seed = _train(HEAD, [SETTINGS] * 3, pool, rows[[0, 0, 1]], world.text, [1, 2, 2])
    assert not np.array_equal(other_seed.params["dW"][1], again.params["dW"][1])  # other seed, other batch order


def test_untrained_mapper_is_zero_shot(reference):
    world, pool, rows, test_x, test_y, _, _ = reference
    hp, trained = _train(CMMHead(), [Settings(epochs=0, alpha=1.7)], pool, rows[:1], world.text, [1])
    assert np.all(trained.params["dW"] == 0) and np.all(trained.params["b"] == 0)
    preds = predict_runs(CMMHead(), trained, hp, test_x, world.text)
    zero_shot = np.argmax(test_x @ world.text.T, axis=1)
    assert np.array_equal(preds[0], zero_shot)
    assert accuracy(preds, test_y)[0] == accuracy(zero_shot[None], test_y)[0]


def test_runs_with_fewer_epochs_stop_early(reference):
    world, pool, rows, _, _, trained, _ = reference
    short = dataclasses.replace(SETTINGS, epochs=2)
    _, mixed = _train(HEAD, [short, SETTINGS, SETTINGS], pool, rows, world.text, SEEDS)
    _assert_trees_close(_run(mixed.params, 1), _run(trained.params, 1), rtol=1e-5, atol=1e-6)
    _, alone = _train(HEAD, [short], pool, rows[:1], world.text, SEEDS[:1])
    _assert_trees_close(_run(mixed.params, 0), _run(alone.params, 0), rtol=1e-5, atol=1e-6)
    assert not np.allclose(mixed.params["dW"][0], trained.params["dW"][0])


def test_non_finite_run_is_stopped_and_others_go_on(reference):
    world, pool, rows, _, _, trained, _ = reference
    hp = hparam_arrays([SETTINGS] * 3)
    hp["margin"][1] = np.nan  # the triplet loss of run 1 is NaN from its first step
    hp["lr"][2] = np.inf  # run 2's first update is infinite
    bad = train_runs(HEAD, hp, rows, np.asarray(SEEDS), pool, world.text, batch_size=SETTINGS.batch_size,
                     use_aug=False)
    assert bad.failed.tolist() == [False, True, True]
    assert bad.fail_step.tolist() == [-1, 0, 0]
    assert np.all(bad.params["dW"][1:] == 0) and np.all(bad.params["dT"][1:] == 0)  # frozen before the bad step
    _assert_trees_close(_run(bad.params, 0), _run(trained.params, 0), rtol=1e-5, atol=1e-6)


def test_chunked_equals_unchunked(reference):
    world, pool, rows, test_x, _, trained, preds = reference
    hp, chunked = _train(HEAD, [SETTINGS] * 3, pool, rows, world.text, SEEDS, budget=1)  # one run per chunk
    _assert_trees_close(trained.params, chunked.params, rtol=1e-5, atol=1e-6)
    np.testing.assert_array_equal(predict_runs(HEAD, chunked, hp, test_x, world.text, budget=1), preds)


def test_cmm_beats_zero_shot_and_triplet_helps():
    """image = rotated prototype + shared offset + noise: the mapping must undo the gap; the triplet loss pulls v'
    onto its prototype, which CE alone (saturated by the logit scale 100) does not."""
    world, pool, rows, test_x, test_y = _problem(shots=2, dim=64, classes=10, world_seed=3)
    base = Settings(epochs=50, lr=1e-2, margin=0.5)
    settings = [dataclasses.replace(base, lam=lam) for lam in (0.0, 10.0) for _ in SEEDS]
    hp, trained = _train(CMMHead(), settings, pool, np.concatenate([rows, rows]), world.text, SEEDS * 2)
    acc = accuracy(predict_runs(CMMHead(), trained, hp, test_x, world.text), test_y)
    ce_only, cmm = acc[:3], acc[3:]
    zero_shot = accuracy(np.argmax(test_x @ world.text.T, axis=1)[None], test_y)[0]
    assert ce_only.mean() > zero_shot + 10
    assert cmm.mean() > ce_only.mean() + 8 and np.all(cmm > ce_only)


SHARDING_SCRIPT = textwrap.dedent("""
    import jax, numpy as np
    from test_train_runner import _problem, _train, SEEDS
    from train_jax.config import Settings
    from train_jax.methods import CMMHead
    from train_jax.runner import predict_runs
    assert len(jax.devices()) == 2, jax.devices()
    world, pool, rows, test_x, _ = _problem()
    settings = [Settings(epochs=4, lr=1e-2, batch_size=5)] * 3  # S = 3 is padded to 4 on 2 devices
    results = []
    for devices in (jax.devices()[:1], jax.devices()):
        hp, trained = _train(CMMHead(), settings, pool, rows, world.text, SEEDS, devices=devices)
        results.append((trained.params, predict_runs(CMMHead(), trained, hp, test_x, world.text, devices=devices)))
    (p1, y1), (p2, y2) = results
    for a, b in zip(jax.tree.leaves(p1), jax.tree.leaves(p2)):
        np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-6)
    assert np.array_equal(y1, y2)
    print("SHARDED-OK")
""")


def test_sharding_over_two_cpu_devices_equals_one():
    env = {**os.environ, "XLA_FLAGS": "--xla_force_host_platform_device_count=2", "JAX_PLATFORMS": "cpu",
           "PYTHONPATH": os.pathsep.join([str(ROOT), str(ROOT / "tests")])}
    proc = subprocess.run([sys.executable, "-c", SHARDING_SCRIPT], cwd=ROOT, env=env, capture_output=True,
                          text=True, timeout=300)
    assert proc.returncode == 0 and "SHARDED-OK" in proc.stdout, proc.stderr[-3000:]
