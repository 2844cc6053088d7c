"""data.progress: tqdm on a terminal, a few plain lines (never a carriage return) in files, pipes and CI logs."""
from __future__ import annotations

import io
import os
import re
import subprocess
import sys
from pathlib import Path

from tqdm import tqdm

from data.progress import LineProgress, progress
from helpers_extract import TINY, make_class_folder

REPO = Path(__file__).resolve().parents[1]


class Terminal(io.StringIO):
    def isatty(self) -> bool:
        return True


def test_a_terminal_gets_tqdm_and_a_pipe_gets_lines() -> None:
    bar = progress(range(3), desc="x", stream=Terminal())
    assert isinstance(bar, tqdm)
    list(bar)
    assert isinstance(progress(range(3), stream=io.StringIO()), LineProgress)


def test_lines_per_stage_and_at_close_never_carriage_returns() -> None:
    log = io.StringIO()
    with progress(total=7, desc="c.h5", unit="img", stream=log, smoothing=0.1) as bar:
        bar.set_postfix_str("train")
        bar.update(4)
        bar.set_postfix_str("test")
        bar.update(3)
    lines = log.getvalue().splitlines()
    assert [re.sub(r" in .*", "", line) for line in lines] == ["c.h5 train: 4 img", "c.h5 test: 3 img", "c.h5: 7 img"]
    assert "\r" not in log.getvalue()


def test_iteration_counts_each_item_and_transient_or_disabled_bars_print_nothing() -> None:
    log = io.StringIO()
    assert list(progress(["a", "b"], desc="merge", unit="row", stream=log)) == ["a", "b"]
    assert log.getvalue().startswith("merge: 2 row in ")
    quiet = io.StringIO()
    assert list(progress(range(5), leave=False, stream=quiet)) == list(range(5))
    with progress(total=3, disable=True, stream=quiet) as bar:
        bar.update(3)
    assert quiet.getvalue() == ""


def test_a_running_bar_prints_a_line_per_interval() -> None:
    log = io.StringIO()
    bar = progress(total=3, desc="encode", unit="img", stream=log, interval=0.0)
    bar.update()
    bar.update(2)
    bar.close()
    bar.close()  # once
    lines = log.getvalue().splitlines()
    assert [line.split(" after ")[0] for line in lines[:2]] == ["encode: 1/3 img", "encode: 3/3 img"]
    assert len(lines) == 3 and lines[2].startswith("encode: 3 img in ")


def test_cli_output_to_a_pipe_has_no_carriage_return_frames(tmp_path: Path) -> None:
    """`python -m extract run` (two shards) and `extract merge` with stdout and stderr to pipes, as in a CI log."""
    root = make_class_folder(tmp_path / "imgs", per_class=4)
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    logs = []
    for shard in ("0/2", "1/2"):
        run = subprocess.run([sys.executable, "-m", "extract", "run", "--folder", str(root), "--out",
                              str(tmp_path / "c.h5"), "--model", TINY, "--pretrained", "random", "--shard", shard],
                             cwd=tmp_path, env=env, capture_output=True, text=True, timeout=300)
        assert run.returncode == 0, run.stderr
        logs.append(run.stdout + run.stderr)
    shards = sorted(str(p) for p in tmp_path.glob("c.shard-*-of-2.h5"))
    merged = subprocess.run([sys.executable, "-m", "extract", "merge", str(tmp_path / "c.h5"), *shards],
                            cwd=tmp_path, env=env, capture_output=True, text=True, timeout=300)
    assert merged.returncode == 0, merged.stderr
    logs.append(merged.stdout + merged.stderr)
    assert not any("\r" in log for log in logs)
    assert re.search(r"c\.shard-0-of-2\.h5 train: \d+ img in [0-9.]+ s", logs[0])
    assert re.search(r"merge c\.h5: \d+ row in [0-9.]+ s", logs[2])
