"""The bench scripts still run end to end (smallest options, tiny model); no timing is checked."""
from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from bench import bench_batch_rounding, bench_cache_io, bench_extract, bench_pooled
from data.cache import read_cache
from extract.models import BUNDLED_CONFIGS


def test_bench_extract_runs_and_extracts_every_image(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    argv = ["--model", "cmm-tiny-vit", "--model-config", str(BUNDLED_CONFIGS / "cmm-tiny-vit.json"),
            "--images", "6", "--size", "40x30", "--classes", "2", "--batch-size", "4", "--workers", "0",
            "--aug-views", "1", "--rounds", "1", "--device", "cpu", "--dir", str(tmp_path)]
    assert bench_extract.main(argv) == 0
    lines = capsys.readouterr().out.strip().splitlines()
    assert lines[-1].startswith("extract/bare = ") and lines[-1].endswith("(target >= 0.8)")
    cache = read_cache(tmp_path / "cache.h5")
    assert len(cache.splits["train"].labels) == 6 and cache.classnames == ["class 0", "class 1"]
    assert cache.splits["train"].aug_features.shape == (6, 1, cache.text_features.shape[-1])
    assert len(list((tmp_path / "jpegs" / "train").rglob("*.jpg"))) == 6


def test_bench_cache_io_runs_and_writes_both_dtypes(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    argv = ["--train", "40", "--test", "30", "--classes", "5", "--templates", "2", "--dim", "16", "--batch", "16",
            "--repeats", "1", "--dir", str(tmp_path)]
    assert bench_cache_io.main(argv) == 0
    out = capsys.readouterr().out.strip().splitlines()
    assert out[-1].startswith("cache I/O: float32") and "float16" in out[-1]
    for dtype in ("float32", "float16"):
        cache = read_cache(tmp_path / f"whole-{dtype}.h5")
        assert cache.attrs["feature_dtype"] == dtype and cache.text_features.shape == (5, 2, 16)
        assert cache.splits["train"].features.shape == (40, 16) and len(cache.splits["test"].labels) == 30
        np.testing.assert_allclose(np.linalg.norm(cache.splits["test"].features, axis=1), 1, atol=2e-3)


def test_bench_pooled_counts_and_rss_run(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    assert bench_pooled.main(["counts", "--views", "0"]) == 0
    last = capsys.readouterr().out.strip().splitlines()[-1]
    assert last.startswith("pooled (seeds 1 2 3, 16 shots): ") and "on ImageNet" in last
    argv = ["rss", "--train-rows", "1500", "--classes", "10", "--views", "1", "--test", "40", "--dim", "16",
            "--dir", str(tmp_path)]
    assert bench_pooled.main(argv) == 0
    assert capsys.readouterr().out.strip().splitlines()[-1].startswith("train_jax peak RSS ")


@pytest.mark.parametrize("main, argv", [(bench_extract.main, ["--images", "0"]),
                                        (bench_cache_io.main, ["--dtypes", "float64"]),
                                        (bench_cache_io.main, ["--batch", "0"])])
def test_bad_options_exit_2(main, argv: list[str], tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    assert main([*argv, "--dir", str(tmp_path)]) == 2
    assert capsys.readouterr().err.startswith("error: ")


def test_bench_batch_rounding_runs(capsys: pytest.CaptureFixture) -> None:
    assert bench_batch_rounding.main(["--models", "cmm-tiny-vit", "--images", "5"]) == 0
    last = capsys.readouterr().out.strip().splitlines()[-1]
    assert last.startswith("batch rounding on cpu: features differ by at most ") and float(last.split()[-5]) < 1e-6
