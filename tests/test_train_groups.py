"""How the runner lays out runs: streams (runs sharing a seed and rows, folded into one wider step) and CPU groups of
streams; every layout gives the same results as training the runs all at once."""

import jax
import numpy as np
import pytest

from helpers_train import GapWorld
from train_jax.config import Settings
from train_jax.baselines import TipAdapterHead
from train_jax.logreg import LinearProbeHead
from train_jax.methods import CMMHead
from train_jax.layout import LayoutPolicy, estimate_run_bytes, group_size, plan_streams, stream_limit
from train_jax.runner import Pool, hparam_arrays, train_runs

SETTINGS = Settings(epochs=3, lr=1e-2, batch_size=6)  # 2 mini-batches per epoch, the last one padded


def _train(group_bytes, max_stream=1):
    world = GapWorld(0, classes=4, dim=16)
    split = world.split("train", 6)
    per_class = np.argsort(split["labels"], kind="stable").reshape(4, -1)
    rows = np.stack([per_class[:, i:i + 3].reshape(-1) for i in (0, 3, 0, 3)])  # S = 4 runs of 12 rows
    hp = hparam_arrays([SETTINGS] * 4)
    hp["margin"][1] = np.nan  # run 1 fails at its first step
    hp["lr"][2] = 3e-2
    return train_runs(CMMHead(learn_text=True), hp, rows, np.array([1, 2, 1, 2]),
                      Pool(split["features"][:, None], split["labels"].astype(np.int32)), world.text,
                      batch_size=SETTINGS.batch_size, use_aug=False, max_stream=max_stream,
                      policy=LayoutPolicy(cpu_group_bytes=group_bytes))


@pytest.mark.parametrize("group_bytes, max_stream", [(1, 1), ("two", 1), (1, 2), (1 << 40, 2)],
                         ids=["one_by_one", "groups_of_two", "streams_one_by_one", "streams_all_at_once"])
def test_layouts_equal_all_at_once(group_bytes, max_stream):
    """Runs 0 and 2 (seed 1, the same rows) and runs 1 and 3 form streams of two; run 1 fails, its stream mate
    3 does not."""
    together = _train(1 << 40)
    per_run = estimate_run_bytes(16 * 16 + 16 + 4 * 16, 0, 6, 16, 4, 12)
    grouped = _train(2 * per_run if group_bytes == "two" else group_bytes, max_stream)
    assert together.failed.tolist() == grouped.failed.tolist() == [False, True, False, False]
    assert grouped.fail_step.tolist() == together.fail_step.tolist()
    for a, b in zip(jax.tree.leaves(together.params), jax.tree.leaves(grouped.params)):
        np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(grouped.final_loss, together.final_loss, rtol=1e-5)
    np.testing.assert_allclose(grouped.loss_curve, together.loss_curve, rtol=1e-5)
    assert grouped.loss_curve.shape == (4, 3) and np.isnan(grouped.loss_curve[1]).all()  # run 1 took no step
    assert not np.allclose(grouped.params["dW"][0], grouped.params["dW"][2])  # other lr, other result


def test_group_size():
    policy = LayoutPolicy(cpu_group_bytes=400)
    assert group_size(10, 100, "cpu", policy) == 4  # 4 fit: groups of 4, 4, 2 -> evened out to 4, 4, 4 (2 padded)
    assert group_size(10, 120, "cpu", policy) == 3  # 3 fit: 4 groups of 3 (2 padded)
    assert group_size(10, 1000, "cpu", policy) == 1
    assert group_size(3, 1, "cpu", policy) == 3
    assert group_size(10, 1000, "gpu", policy) == 10


def test_plan_streams():
    rows = np.array([[0, 1], [2, 3], [0, 1], [0, 1], [2, 3], [0, 1], [0, 1], [0, 1]])
    seeds = np.array([1, 1, 1, 2, 1, 2, 1, 2])
    plan = plan_streams(rows, seeds)  # (seed 1, rows 01): runs 0 2 6; (1, 23): 1 4; (2, 01): 3 5 7
    assert plan.index.tolist() == [[0, 2, 6], [1, 4, 1], [3, 5, 7]]  # k = 3 pads 8 -> 9 runs (k = 2: 8 -> 10)
    assert plan.rows.tolist() == [[0, 1], [2, 3], [0, 1]] and plan.seeds.tolist() == [1, 1, 2]
    assert plan.index.reshape(-1)[plan.slot].tolist() == list(range(8))  # each run at its own (unpadded) slot
    assert sorted(plan.slot.tolist()) == [0, 1, 2, 3, 4, 6, 7, 8]  # slot 5 is the padding copy of run 1
    assert plan_streams(rows[:7], seeds[:7]).index.shape == (7, 1)  # any k > 1 pads 7 runs by more than 1/8
    assert plan_streams(rows, seeds, max_size=1).index.tolist() == [[i] for i in (0, 2, 6, 1, 4, 3, 5, 7)]
    grid = plan_streams(np.zeros((30, 4), int), np.arange(30) // 12)  # 12 + 12 + 6 settings: k = 6, no padding
    assert grid.index.shape == (5, 6) and sorted(grid.index.reshape(-1).tolist()) == list(range(30))


def test_stream_limit():
    policy = LayoutPolicy(cpu_stream_bytes=1600)
    assert stream_limit(10, 256, "cpu", policy) == 10  # 16 bytes of state per parameter and run
    assert stream_limit(200, 256, "cpu", policy) == 1
    assert stream_limit(10, 16, "cpu", policy) == 1  # a small batch: no folding on a CPU
    assert stream_limit(10**9, 16, "gpu", policy) is None


@pytest.mark.parametrize("head, use_aug", [(CMMHead(), False), (LinearProbeHead(), False),
                                           (TipAdapterHead(), True)], ids=["cmm", "linear_probe", "tip_adapter_f"])
def test_folded_stream_equals_each_setting_alone(head, use_aug):
    """One seed's grid of settings (other lr, alpha, lambda, fewer epochs) trained as one stream of 4 folded runs
    equals each setting trained alone, for every head, with and without augmented views. (Not with learned
    prototypes: a prototype whose gradient is nearly cancelled by the normalisation gets rounding-level gradients
    that Adam scales up to lr-sized steps, so there two layouts' rounding differences grow to ~lr.)"""
    world = GapWorld(1, classes=4, dim=16)
    split = world.split("train", 5, 2)
    feats = np.concatenate([split["features"][:, None], split["aug_features"]], axis=1)
    pool = Pool(feats, split["labels"].astype(np.int32))
    grid = [Settings(epochs=3, lr=1e-2, batch_size=6, use_aug=use_aug),
            Settings(epochs=3, lr=3e-2, alpha=2.0, batch_size=6, use_aug=use_aug),
            Settings(epochs=2, lr=1e-2, lam=0.0, batch_size=6, use_aug=use_aug),
            Settings(epochs=3, lr=1e-3, beta=2.0, batch_size=6, use_aug=use_aug)]
    hp = hparam_arrays(grid)
    rows = np.tile(np.arange(20), (4, 1))
    train = lambda h, r, k: train_runs(head, h, r, np.full(len(r), 7), pool, world.text, batch_size=6,  # noqa: E731
                                       use_aug=use_aug, max_stream=k)
    folded = train(hp, rows, 4)
    for i in range(4):
        alone = train({f: v[i:i + 1] for f, v in hp.items()}, rows[:1], 1)
        for a, b in zip(jax.tree.leaves((folded.params, folded.consts)), jax.tree.leaves((alone.params, alone.consts))):
            np.testing.assert_allclose(a[i], b[0], rtol=1e-5, atol=1e-6)
        # the loss of a near-perfect fit is ~1e-3: its float32 rounding is absolute (~1 ulp of the logits'
        # log-sum-exp), so it gets the params' absolute tolerance too
        np.testing.assert_allclose(folded.final_loss[i], alone.final_loss[0], rtol=1e-5, atol=1e-6)
        np.testing.assert_allclose(folded.loss_curve[i, :grid[i].epochs], alone.loss_curve[0], rtol=1e-5, atol=1e-6)
    assert np.isnan(folded.loss_curve[2, 2])  # the 2-epoch setting has no third epoch
    assert not np.allclose(jax.tree.leaves(folded.params)[0][0], jax.tree.leaves(folded.params)[0][1])


def test_loss_curve_is_the_epoch_mean_of_the_step_losses():
    """With one step per epoch (the batch holds every row) each epoch's mean is that step's loss: the last one is
    the final loss, and a run that fits its rows lowers it."""
    world = GapWorld(2, classes=4, dim=16)
    split = world.split("train", 3)
    hp = hparam_arrays([Settings(epochs=4, lr=1e-2, batch_size=12)])
    trained = train_runs(CMMHead(), hp, np.arange(12)[None], np.array([0]),
                         Pool(split["features"][:, None], split["labels"].astype(np.int32)), world.text,
                         batch_size=12, use_aug=False)
    assert trained.loss_curve.shape == (1, 4) and np.isfinite(trained.loss_curve).all()
    assert trained.loss_curve[0, -1] == trained.final_loss[0]
    assert trained.loss_curve[0, -1] < trained.loss_curve[0, 0]
