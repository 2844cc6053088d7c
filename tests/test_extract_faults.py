"""Fault suite: `extract run` killed with SIGKILL at random points (its DataLoader workers outliving it) and rerun
at once, or stopped by a file-size limit, ends with a cache equal to an uninterrupted run's.

Runs are forked from a forkserver that imported torch once, so each start costs milliseconds, not an import.
"""
from __future__ import annotations

import multiprocessing
import os
import resource
import signal
import sys
import time
from pathlib import Path

import numpy as np
import pytest

from data.cache import partial_path, read_cache
from helpers_extract import TINY, make_class_folder

ARGS = ["--model", TINY, "--pretrained", "random", "--workers", "2", "--batch-size", "2", "--aug-views", "2",
        "--no-progress"]
KILLS = 4


def _extract(argv: list[str], log: str, file_limit: int | None = None) -> None:
    """Child process: `python -m extract run ...` with stderr to `log`, optionally under a file-size limit (writes
    then fail with EFBIG)."""
    with open(log, "a") as f:
        os.dup2(f.fileno(), 2)
    multiprocessing.set_start_method("fork", force=True)  # workers are this process's children, as in a real run
    if file_limit is not None:
        signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
        resource.setrlimit(resource.RLIMIT_FSIZE, (file_limit, file_limit))
    from extract.__main__ import main

    sys.exit(main(["run", *argv]))


@pytest.fixture(scope="module")
def ctx() -> multiprocessing.context.BaseContext:
    ctx = multiprocessing.get_context("forkserver")
    ctx.set_forkserver_preload(["torch", "open_clip", "extract.__main__", "extract.run"])
    warm = ctx.Process(target=os.getpid)  # starts the forkserver: the imports happen once, here
    warm.start()
    warm.join()
    return ctx


def _run(ctx, argv: list[str], log: Path, **kw) -> tuple[int, float]:
    start = time.monotonic()
    proc = ctx.Process(target=_extract, args=(argv, str(log)), kwargs=kw)
    proc.start()
    proc.join()
    return proc.exitcode, time.monotonic() - start


def _assert_same(path: Path, reference: Path) -> None:
    a, b = read_cache(path), read_cache(reference)
    assert a.classnames == b.classnames and a.templates == b.templates and a.bad_paths == b.bad_paths == []
    np.testing.assert_array_equal(a.text_features, b.text_features)
    for name, split in b.splits.items():
        got = a.splits[name]
        np.testing.assert_array_equal(got.features, split.features, err_msg=name)
        np.testing.assert_array_equal(got.labels, split.labels)
        assert got.paths.tolist() == split.paths.tolist()
        if split.aug_features is not None:
            np.testing.assert_array_equal(got.aug_features, split.aug_features)


def test_sigkill_at_random_points_then_rerun_at_once_equals_an_uninterrupted_run(tmp_path: Path, ctx) -> None:
    root = make_class_folder(tmp_path / "imgs", per_class=12)
    source = ["--folder", str(root)]
    reference = tmp_path / "ref.h5"
    log = tmp_path / "stderr.txt"
    code, took = _run(ctx, [*source, *ARGS, "--out", str(reference)], log)
    assert code == 0
    out = tmp_path / "c.h5"
    rng = np.random.default_rng(0)
    kills = 0
    for _ in range(KILLS):
        proc = ctx.Process(target=_extract, args=([*source, *ARGS, "--out", str(out)], str(log)))
        proc.start()
        time.sleep(rng.uniform(0.1, took))
        if proc.exitcode is None:
            proc.kill()  # SIGKILL to the main process only: its DataLoader workers live on for a few seconds
            kills += 1
        proc.join()
    assert kills >= KILLS // 2, "the runs finished before the kills: raise per_class"
    code, took = _run(ctx, [*source, *ARGS, "--out", str(out)], log)
    assert code == 0, log.read_text()
    _assert_same(out, reference)
    assert not partial_path(out).exists() and not Path(f"{partial_path(out)}.new").exists()


def test_file_size_limit_is_one_line_then_rerun_completes(tmp_path: Path, ctx) -> None:
    root = make_class_folder(tmp_path / "imgs", per_class=3)
    source = ["--folder", str(root)]
    reference, out, log = tmp_path / "ref.h5", tmp_path / "c.h5", tmp_path / "stderr.txt"
    assert _run(ctx, [*source, *ARGS, "--out", str(reference)], log)[0] == 0
    log.unlink()
    assert _run(ctx, [*source, *ARGS, "--out", str(out)], log, file_limit=20_000)[0] == 2
    err = log.read_text()
    lines = [ln for ln in err.splitlines() if ln.startswith("error: ")]
    assert len(lines) == 1 and "Traceback" not in err, err
    assert f"{partial_path(out)}: needs " in lines[0] and "MiB of free space, its disk has 0.0 MiB" in lines[0]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["imgs", "ref.h5", "stderr.txt"]
    assert _run(ctx, [*source, *ARGS, "--out", str(out)], log)[0] == 0
    _assert_same(out, reference)
