"""bench.bench_learn_text still runs end to end (tiny sizes); no figure is checked."""
from __future__ import annotations

import pytest

from bench import bench_learn_text


def test_bench_learn_text_runs(capsys: pytest.CaptureFixture) -> None:
    argv = ["--shots", "1", "--seeds", "1", "2", "--epochs", "2", "--train", "3", "--classes", "3", "--dim", "8"]
    assert bench_learn_text.main(argv) == 0
    lines = capsys.readouterr().out.strip().splitlines()
    assert lines[-1].startswith("learn_text searched on validation vs frozen prototypes only: mean change ")
    assert "over 4 (world, method, shots) cells" in lines[-1]  # 2 worlds x 2 methods x 1 shot count
    assert sum(line.startswith(("| exact |", "| noisy |")) for line in lines) == 4
