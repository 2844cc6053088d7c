"""The several-GPU extraction of the README run for real on the CPU: `torchrun --nproc_per_node 2 -m extract run
--shard auto ...` (two processes, each its shard from torchrun's RANK/WORLD_SIZE), then `extract merge`."""
from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import numpy as np

from data.cache import read_cache
from extract.__main__ import main as extract_main
from helpers_extract import BATCH_ATOL, TINY, make_class_folder

ROOT = Path(__file__).resolve().parents[1]
ARGS = ["--model", TINY, "--pretrained", "random", "--workers", "0", "--batch-size", "4", "--no-progress"]


def torchrun() -> list[str]:
    """torchrun of this Python (its console script when installed beside it, else the module it runs)."""
    script = Path(sys.executable).with_name("torchrun")
    return [str(script)] if script.is_file() else [sys.executable, "-m", "torch.distributed.run"]


def test_torchrun_two_processes_shard_auto_then_merge(tmp_path: Path) -> None:
    images = make_class_folder(tmp_path / "imgs", per_class=4)
    out = tmp_path / "c.h5"
    env = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1"}
    done = subprocess.run([*torchrun(), "--standalone", "--nproc_per_node", "2", "-m", "extract", "run",
                           "--folder", str(images), "--shard", "auto", "--out", str(out), *ARGS],
                          cwd=tmp_path, env=env, capture_output=True, text=True, timeout=240)
    assert done.returncode == 0, done.stderr[-3000:]
    shards = [tmp_path / f"c.shard-{i}-of-2.h5" for i in range(2)]
    assert all(p.is_file() for p in shards) and not out.exists()
    assert [read_cache(p).attrs["shard"] for p in shards] == ["0/2", "1/2"]
    assert extract_main(["merge", str(out), *map(str, shards), "--no-progress"]) == 0
    assert extract_main(["run", "--folder", str(images), "--out", str(tmp_path / "one.h5"), *ARGS]) == 0
    merged, one = read_cache(out), read_cache(tmp_path / "one.h5")
    assert merged.attrs["shard"] == "" and merged.classnames == one.classnames
    for name, split in one.splits.items():
        assert merged.splits[name].paths.tolist() == split.paths.tolist()
        assert np.array_equal(merged.splits[name].labels, split.labels)
        np.testing.assert_allclose(merged.splits[name].features, split.features, atol=BATCH_ATOL)
