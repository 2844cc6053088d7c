"""CPU run groups of the runner: training the runs one by one or in vmapped groups equals training them all at once."""

import jax
import numpy as np
import pytest

from helpers_train import GapWorld
from train_jax import runner
from train_jax.config import Settings
from train_jax.methods import CMMHead
from train_jax.runner import Pool, group_size, hparam_arrays, train_runs

SETTINGS = Settings(epochs=3, lr=1e-2, batch_size=6)  # 2 mini-batches per epoch, the last one padded


def _train(monkeypatch, group_bytes):
    monkeypatch.setattr(runner, "CPU_GROUP_BYTES", group_bytes)
    world = GapWorld(0, classes=4, dim=16)
    split = world.split("train", 6)
    per_class = np.argsort(split["labels"], kind="stable").reshape(4, -1)
    rows = np.stack([per_class[:, i:i + 3].reshape(-1) for i in (0, 3, 0, 3)])  # S = 4 runs of 12 rows
    hp = hparam_arrays([SETTINGS] * 4)
    hp["margin"][1] = np.nan  # run 1 fails at its first step
    hp["lr"][2] = 3e-2
    return train_runs(CMMHead(learn_text=True), hp, rows, np.array([1, 2, 1, 2]),
                      Pool(split["features"][:, None], split["labels"].astype(np.int32)), world.text,
                      batch_size=SETTINGS.batch_size, use_aug=False)


@pytest.mark.parametrize("group_bytes", [1, "two"], ids=["one_by_one", "groups_of_two"])
def test_groups_equal_all_at_once(monkeypatch, group_bytes):
    together = _train(monkeypatch, 1 << 40)
    per_run = runner.estimate_run_bytes(16 * 16 + 16 + 4 * 16, 0, 6, 16, 4, 12)
    grouped = _train(monkeypatch, 1 if group_bytes == 1 else 2 * per_run)
    assert together.failed.tolist() == grouped.failed.tolist() == [False, True, False, False]
    assert grouped.fail_step.tolist() == together.fail_step.tolist()
    for a, b in zip(jax.tree.leaves(together.params), jax.tree.leaves(grouped.params)):
        np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(grouped.final_loss, together.final_loss, rtol=1e-5)
    assert not np.allclose(grouped.params["dW"][0], grouped.params["dW"][2])  # other lr, other result


def test_group_size(monkeypatch):
    monkeypatch.setattr(runner, "CPU_GROUP_BYTES", 400)
    assert group_size(10, 100, "cpu") == 4  # 4 fit: groups of 4, 4, 2 -> evened out to 4, 4, 4 (2 padded)
    assert group_size(10, 120, "cpu") == 3  # 3 fit: 4 groups of 3 (2 padded)
    assert group_size(10, 1000, "cpu") == 1
    assert group_size(3, 1, "cpu") == 3
    assert group_size(10, 1000, "gpu") == 10
