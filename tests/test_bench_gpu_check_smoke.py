"""The GPU check (bench/gpu_check.py) runs end to end in its CPU smoke mode, and a part that fails, hangs or cannot
run is recorded while the others go on. No timing is checked."""
from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from bench import gpu_check
from bench.gpu_parts import PARTS, SMOKE


def test_smoke_check_runs_every_part_and_writes_the_summary(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    out = tmp_path / "out"
    assert gpu_check.main(["--smoke", "--device", "cpu", "--out", str(out), "--work", str(tmp_path / "work")]) == 0
    assert sorted(p.name for p in out.iterdir()) == ["gpu_check.log", "results.json", "summary.md"]  # few files
    state = json.loads((out / "results.json").read_text())
    assert {name: p["status"] for name, p in state["parts"].items()} == {name: "ok" for name in PARTS}
    res = {name: p["result"] for name, p in state["parts"].items()}
    assert res["env"]["jax_gpu"] is False and res["env"]["jax_devices"]
    for model in SMOKE.feature_models:  # the same model on the same device: identical features
        assert res["features"][model]["ok"] and min(res["features"][model]["min_cosine"].values()) > 0.99999
    assert res["train_check"]["runs"]["device"]["ok"] and res["train_check"]["runs"]["device"]["max_test_diff"] == 0
    assert len(res["extract"]) == 2 * len(SMOKE.extract_models)
    assert all("error" not in r for r in res["extract"].values())
    assert set(res["train"]["cases"]) == set(SMOKE.train_cases)
    assert res["sweep"]["runs"] == len(SMOKE.sweep_seeds) * 2  # 2 learning rates x 1 method
    summary = (out / "summary.md").read_text()
    assert summary.startswith("## GPU check: no GPU") and "| sweep " in summary and "tiny: time of S=2" in summary
    assert capsys.readouterr().out.rstrip().endswith(f"{out / 'gpu_check.log'}")


def test_failing_and_hanging_parts_are_recorded(tmp_path: Path) -> None:
    spec = {"device": "cpu", "work": str(tmp_path / "work"), "sizes": {}}
    log = tmp_path / "log"
    status, _ = gpu_check.run_part("no_such_part", spec, 60, log, tmp_path / "r.json")
    assert status.startswith("failed (exit 1): KeyError")
    status, seconds = gpu_check.run_part("env", spec, 0.5, log, tmp_path / "r.json")
    assert status == "timed out after 0 s" and seconds < 30
    assert log.read_text().count("=====") == 4  # both parts' headers


def test_jax_parts_are_skipped_when_jax_sees_no_gpu(tmp_path: Path) -> None:
    env = {"cuda": True, "gpu": "Some GPU", "jax": "0.0", "jax_devices": ["cpu: cpu"], "jax_gpu": False}
    state = {"device": "cuda", "parts": {"env": {"status": "ok", "seconds": 1.0, "result": env}}}
    assert gpu_check.skip_reason("sweep", state).startswith("skipped: JAX on CPU only")
    assert gpu_check.skip_reason("extract", state) == ""
    state |= {"started": "now", "commit": "abc", "smoke": False, "budget_s": 450, "elapsed_s": 1.0}
    state["parts"]["extract"] = {"status": "timed out after 9 s", "seconds": 9.0,
                                 "result": {"RN50, 0 aug views": {"error": "RuntimeError: out of memory"}}}
    text = gpu_check.summary_markdown(state)
    assert text.startswith("## GPU check: Some GPU") and "(JAX on CPU only)" in text
    assert "| extract | timed out after 9 s |" in text and "RuntimeError: out of memory" in text


def test_summary_marks_each_target_met_or_missed() -> None:
    train = {"peak_gflops": 1000.0, "torch_peak_gflops": 500.0, "cases": {
        "large": {"runs": [1, 30], "gflop_per_run": 10.0, "seconds": {"vmapped_one": 0.1, "vmapped": 0.5,
                                                                       "jax_loop": 2.0, "torch_loop": 5.0}},
        "tiny": {"runs": [1, 100], "gflop_per_run": 0.5, "seconds": {"vmapped_one": 0.1, "vmapped": 0.15,
                                                                      "jax_loop": 3.0, "torch_loop": 9.0}}}}
    check = {"test_images": 200, "runs": {"cpu": {"selected": 4}, "device_highest": {
        "selected": 4, "same_setting": 4, "max_test_diff": 0.5, "ok": True}}}
    extract = {"RN50, 0 aug views": {"batch": 256, "workers": 16, "images": 8192, "extract_img_s": 2000.0,
                                     "bare_img_s": 8000.0, "extract_bare": 0.25}}
    sweep = {"shots": 16, "classes": 1000, "dim": 1024, "seeds": 3, "methods": 4, "runs": 111, "seconds": 75.0}
    parts = {name: {"result": r} for name, r in (("train", train), ("train_check", check), ("extract", extract),
                                                  ("sweep", sweep))}
    rows = gpu_check.summary_rows(parts, "cuda")

    def row(part: str, check: str) -> list:
        return next(r[2:] for r in rows if r[0] == part and r[1].startswith(check))

    assert row("train", "large S=30: vmapped runs/s") == ["60 runs/s, 0.6 TFLOP/s, 60% / 120%", ">= 60% (JAX's)",
                                                         "met"]
    assert row("train", "large S=30: vmapped vs JAX loop") == ["4.00x / 10.00x", "-", "-"]
    assert row("train", "tiny: time of S=100") == ["1.50x", "<= 2x", "met"]
    assert row("train_check", "train_jax cuda ('highest'")[1:] == ["all, <= 0.50 pt (one image)", "met"]
    assert row("extract", "RN50, 0 aug views") == ["2000 / 8000 = 0.25", ">= 0.8", "missed"]
    assert row("sweep", "16-shot, 1000 classes") == ["75.0", "< 60", "missed"]


def test_bad_options_exit_2(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    assert gpu_check.main(["--budget-s", "0", "--out", str(tmp_path)]) == 2
    assert capsys.readouterr().err.startswith("error: --budget-s")
    with pytest.raises(SystemExit) as exit_info:
        gpu_check.main(["--parts", "nope", "--out", str(tmp_path)])
    assert exit_info.value.code == 2


@pytest.mark.skipif(torch.cuda.is_available(), reason="this machine has a GPU")
def test_cuda_check_without_a_gpu_says_so(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    assert gpu_check.main(["--out", str(tmp_path), "--parts", "env", "features"]) == 2
    assert capsys.readouterr().err.startswith("error: --device cuda: PyTorch sees no CUDA GPU")
    assert json.loads((tmp_path / "results.json").read_text())["parts"]["env"]["status"] == "ok"

