"""The user-facing pipeline: run_all.sh end to end on tiny generated data, and the torch/jax separation."""
from __future__ import annotations

import csv
import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
from PIL import Image

ROOT = Path(__file__).resolve().parents[1]


def _make_folder(root: Path, classes=("red", "green", "blue"), per_split=None) -> Path:
    per_split = per_split or {"train": 4, "val": 2, "test": 3}
    rng = np.random.default_rng(0)
    for split, n in per_split.items():
        for c, name in enumerate(classes):
            (root / split / name).mkdir(parents=True)
            for i in range(n):
                pixels = rng.integers(0, 80, size=(40, 40, 3), dtype=np.uint8)
                pixels[..., c] += 150  # a colour per class
                Image.fromarray(pixels).save(root / split / name / f"{i}.png")
    return root


def _run_all(*args: str) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHON": sys.executable, "JAX_PLATFORMS": "cpu"}
    return subprocess.run(["bash", str(ROOT / "run_all.sh"), *args], capture_output=True, text=True, env=env,
                          timeout=600)


def test_run_all_end_to_end_then_reuses_cache(tmp_path: Path) -> None:
    folder = _make_folder(tmp_path / "colours")
    out = tmp_path / "out"
    args = ["--folder", str(folder), "--model", "cmm-tiny-vit", "--pretrained", "random", "--shots", "1 2",
            "--seeds", "1 2", "--out", str(out), "--train-args", "--grid lr=1e-2 alpha=1 lambda=0,1"]
    first = _run_all(*args)
    assert first.returncode == 0, first.stderr[-3000:]
    cache = out / "cache" / "cmm-tiny-vit-random" / "colours.h5"
    assert cache.is_file() and "extracting features" in first.stdout
    summary = (out / "results" / "summary.md").read_text()
    assert "colours" in summary and "cmm" in summary
    assert (out / "results" / "accuracy_vs_shots.png").stat().st_size > 1000
    rows = json.loads((out / "results" / "summary.json").read_text())
    assert rows  # the combined results hold entries
    from data.cache import read_attrs

    # a real run's defaults: Tip-Adapter's 10 views extracted, so train_jax adds Tip-Adapter-F to its methods
    assert read_attrs(cache)["aug_views"] == 10
    assert {"zeroshot", "linear_probe", "tip_adapter_f", "cmm_ce", "cmm"} <= {r["method"] for r in rows["summary"]}
    before = cache.stat().st_mtime_ns

    second = _run_all(*args)
    assert second.returncode == 0, second.stderr[-3000:]
    assert "features cached" in second.stdout and cache.stat().st_mtime_ns == before
    assert "Modality gap on test" in summary and (out / "runs" / "colours" / "gap.png").is_file()

    predicted = _run_all("--predict", str(folder / "test"), "--name", "new", "--run", str(out / "runs" / "colours"),
                         "--model", "cmm-tiny-vit", "--pretrained", "random", "--out", str(out),
                         "--predict-args", "--shots 1")
    assert predicted.returncode == 0, predicted.stderr[-3000:]
    with open(out / "predict" / "new.csv") as f:
        rows = list(csv.DictReader(f))
    assert len(rows) == 9 and {r["class_1"] for r in rows} <= {"red", "green", "blue"}
    assert "cmm 1-shot (ensemble of seeds 1, 2)" in predicted.stdout
    untrained = _run_all("--predict", str(folder / "test"), "--run", str(out / "runs" / "colours"), "--model",
                         "cmm-tiny-vit", "--pretrained", "random", "--out", str(out), "--predict-args", "--shots 3")
    assert untrained.returncode == 2 and "no 3-shot models (trained: 1, 2)" in untrained.stderr


def test_run_all_model_config_alone_and_shots_that_do_not_fit(tmp_path: Path) -> None:
    folder = _make_folder(tmp_path / "colours")  # 4 train images per class
    config = tmp_path / "mytiny.json"
    config.write_text((ROOT / "extract" / "model_configs" / "cmm-tiny-vit.json").read_text())
    out = tmp_path / "out"
    run = _run_all("--folder", str(folder), "--model-config", str(config), "--pretrained", "random",
                   "--shots", "1 8", "--seeds", "1", "--out", str(out),
                   "--train-args", "--methods zeroshot cmm --grid lr=1e-2 alpha=1 lambda=1 epochs=2")
    assert run.returncode == 0, run.stderr[-3000:]
    assert "warning: colours: 8 shots skipped: class 'blue' has only 4 train images" in run.stderr
    cache = out / "cache" / "mytiny-random" / "colours.h5"
    from data.cache import read_attrs

    assert read_attrs(cache)["model"] == "mytiny"
    rows = json.loads((out / "results" / "summary.json").read_text())["summary"]
    assert {(r["method"], r["shots"]) for r in rows} == {("zeroshot", 1), ("cmm", 1)}


def test_run_all_refuses_a_cache_with_other_views(tmp_path: Path) -> None:
    """A cache extracted without views is not silently reused by a default run (10 views), nor the reverse."""
    folder = _make_folder(tmp_path / "colours", per_split={"train": 2, "val": 1, "test": 1})
    common = ["--folder", str(folder), "--model", "cmm-tiny-vit", "--pretrained", "random", "--shots", "1",
              "--seeds", "1", "--out", str(tmp_path / "out"), "--train-args", "--methods zeroshot --grid epochs=1"]
    assert _run_all(*common, "--aug-views", "0").returncode == 0
    again = _run_all(*common)
    assert again.returncode == 2 and "holds 0 augmented views per train image, not 10" in again.stderr
    assert "pass --aug-views 0 to use it" in again.stderr and len(again.stderr.strip().splitlines()) == 1
    assert _run_all(*common, "--aug-views", "0").returncode == 0  # as extracted: reused


def test_run_all_rejects_bad_options(tmp_path: Path) -> None:
    bad = _run_all("--bogus")
    assert bad.returncode == 2 and "unknown option '--bogus'" in bad.stderr
    no_root = _run_all("--datasets", "DTD", "--pretrained", "x.pt")
    assert no_root.returncode == 2 and "--data-root" in no_root.stderr
    both = _run_all("--datasets", "DTD", "--folder", str(tmp_path))
    assert both.returncode == 2 and "not both" in both.stderr
    lone_run = _run_all("--run", str(tmp_path))
    assert lone_run.returncode == 2 and "go with --predict DIR" in lone_run.stderr
    no_run = _run_all("--predict", str(tmp_path), "--out", str(tmp_path / "o"))
    assert no_run.returncode == 2 and "holds no trained run" in no_run.stderr
    hub = _run_all("--folder", str(tmp_path), "--model", "hf-hub:timm/ViT-B-16-SigLIP2", "--pretrained", "x.pt")
    assert hub.returncode == 2 and "brings its own weights; drop --pretrained" in hub.stderr
    assert "default RN50-quickgelu" in _run_all("--help").stdout  # OpenAI's RN50 weights need QuickGELU


def _imported(code: str) -> set[str]:
    out = subprocess.run([sys.executable, "-c", f"{code}\nimport sys; print(' '.join(sys.modules))"],
                         capture_output=True, text=True, cwd=ROOT, check=True)
    return set(out.stdout.split())


def test_train_jax_never_imports_torch() -> None:
    modules = _imported("import train_jax.__main__, train_jax.report, train_jax.runner")
    assert "jax" in modules and "torch" not in modules


def test_extract_never_imports_jax() -> None:
    modules = _imported("import extract.__main__, extract.run, extract.encode")
    assert "torch" in modules and "jax" not in modules


def test_stages_import_only_data_not_each_other() -> None:
    """train_jax and extract stand on data/ (the cache contract and the few-shot draw), never on each other."""
    trained = _imported("import train_jax.__main__, train_jax.report, train_jax.runner, train_jax.experiment")
    assert "data.cache" in trained and not any(m == "extract" or m.startswith("extract.") for m in trained)
    extracted = _imported("import extract.__main__, extract.run, extract.shards")
    assert "data.cache" in extracted and not any(m == "train_jax" or m.startswith("train_jax.") for m in extracted)


def test_run_all_validation_free(tmp_path: Path) -> None:
    bad = _run_all("--select", "best")
    assert bad.returncode == 2 and "--select must be seed, mean or none, not 'best'" in bad.stderr
    folder = _make_folder(tmp_path / "colours")
    out = tmp_path / "out"
    run = _run_all("--folder", str(folder), "--model", "cmm-tiny-vit", "--pretrained", "random", "--shots", "1",
                   "--seeds", "1", "--out", str(out), "--select", "none",
                   "--train-args", "--methods zeroshot linear_probe cmm --grid epochs=2")
    assert run.returncode == 0, run.stderr[-3000:]
    summary = (out / "results" / "summary.md").read_text()
    assert "VALIDATION-FREE" in summary.splitlines()[0] and "no validation rows were read" in summary
    rows = json.loads((out / "results" / "summary.json").read_text())["summary"]
    assert {r["select"] for r in rows} == {"none"} and {r["method"] for r in rows} == {"zeroshot", "linear_probe",
                                                                                      "cmm"}
