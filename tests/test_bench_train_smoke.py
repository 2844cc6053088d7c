"""The training bench: its PyTorch baseline trains the same model as the runner, and the script runs end to end
(tiny sizes, no timing checked)."""
from __future__ import annotations

import numpy as np
import pytest

from bench import bench_train
from bench.train_problems import GRID, Case, make_pool, normalize, run_table
from bench.train_torch import train_loop
from train_jax.methods import CMMHead
from train_jax.runner import Pool, train_runs

CASE = Case("check", shots=3, classes=4, dim=16, epochs=6, runs=(3,), batch_size=64)  # full batch: order-free


def test_torch_baseline_trains_the_same_model_as_the_runner() -> None:
    _, y, text = make_pool(CASE, 3)
    x = normalize(np.random.default_rng(0).standard_normal((len(y), CASE.dim), dtype=np.float32))  # hard to fit
    rows, seeds, hp = run_table(CASE, 3)
    assert [hp["lr"][i] for i in range(3)] == [GRID[i]["lr"] for i in range(3)]
    jax_params = train_runs(CMMHead(), hp, rows, seeds, Pool(x[:, None], y), text, batch_size=CASE.batch_size,
                            use_aug=False).params
    torch_params = train_loop(x, y, text, rows, seeds, hp, batch=CASE.batch, epochs=CASE.epochs)
    for i, (dw, b) in enumerate(torch_params):
        np.testing.assert_allclose(dw, jax_params["dW"][i], rtol=1e-3, atol=2e-5)
        np.testing.assert_allclose(b, jax_params["b"][i], rtol=1e-3, atol=2e-5)
        assert np.abs(dw).max() > 1e-3  # it trained


def test_bench_train_runs(capsys: pytest.CaptureFixture) -> None:
    argv = ["--case", "tiny", "--runs", "1,2", "--epochs", "2", "--dim", "8", "--repeats", "1", "--rounds", "2",
            "--peak-size", "64", "--no-torch"]
    assert bench_train.main(argv) == 0
    out = capsys.readouterr().out.strip().splitlines()
    assert out[-1].startswith("train throughput (peak ") and "tiny S=2 takes" in out[-1]
    assert sum(line.startswith("| ") for line in out) == 3  # header and S = 1, 2


@pytest.mark.parametrize("argv", [["--epochs", "0"], ["--dim", "0"], ["--rounds", "0"]])
def test_bad_options_exit_2(argv: list[str], capsys: pytest.CaptureFixture) -> None:
    assert bench_train.main(argv) == 2
    assert capsys.readouterr().err.startswith("error: ")
