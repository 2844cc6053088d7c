"""The GPU check (bench/gpu_check.py) runs end to end in its CPU smoke mode, and a part that fails, hangs or cannot
run is recorded while the others go on. No timing is checked."""
from __future__ import annotations

import json
from pathlib import Path

import pytest

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


def test_bad_options_exit_2(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    assert gpu_check.main(["--budget-s", "0", "--out", str(tmp_path)]) == 2
    assert capsys.readouterr().err.startswith("error: --budget-s")
    with pytest.raises(SystemExit) as exit_info:
        gpu_check.main(["--parts", "nope", "--out", str(tmp_path)])
    assert exit_info.value.code == 2
