"""What a hostile user found (issue 20), each case reproduced: the add-rows hint of a moved pooled cache, an
unusable --out, a lock path that is a folder, --dry-run checking what a run checks, seeds and sizes out of range,
Ctrl-C in train_jax, damaged saved models, a report into a read-only folder, a compilation cache that cannot be
written. Every failure is one `error:` line (exit 2) and leaves the files as they were."""
from __future__ import annotations

import json
import os
import re
import shlex
import subprocess
import sys
from pathlib import Path

import h5py
import pytest

from data.cache import partial_path, read_cache
from extract.__main__ import main as extract_main
from helpers_extract import TINY, digest, make_class_folder
from helpers_train import GapWorld, write_gap_cache
from train_jax import experiment
from train_jax.__main__ import main as train_main
from train_jax.report import main as report_main

ROOT = Path(__file__).resolve().parents[1]
TINY_ARGS = ["--model", TINY, "--pretrained", "random", "--workers", "0", "--batch-size", "4", "--no-progress"]
TRAIN_ARGS = ["--shots", "1", "2", "--seeds", "1", "--methods", "zeroshot", "cmm", "--grid", "lr=1e-2", "epochs=2",
              "--prompt", "single"]


def run_cli(main, argv: list[str], capsys: pytest.CaptureFixture) -> tuple[int, str]:
    """(exit status, stderr) of a CLI's main(argv), argparse's exits included."""
    capsys.readouterr()
    try:
        code = main(argv)
    except SystemExit as e:
        code = e.code
    return code, capsys.readouterr().err


def one_error(code: int, err: str) -> str:
    """The one `error:` line of a failed command (exit 2, no traceback)."""
    lines = [ln for ln in err.splitlines() if "error: " in ln]
    assert code == 2 and len(lines) == 1 and "Traceback" not in err, (code, err)
    return lines[0]


@pytest.fixture(scope="module")
def images(tmp_path_factory) -> Path:
    return make_class_folder(tmp_path_factory.mktemp("imgs") / "imgs", per_class=6)


@pytest.fixture(scope="module")
def trained(tmp_path_factory) -> tuple[Path, Path]:
    """A synthetic cache and a run trained on it at 1 and 2 shots."""
    tmp = tmp_path_factory.mktemp("run")
    cache = write_gap_cache(tmp / "synth.h5", GapWorld(3, classes=4, dim=16), train=4, val=2, test=5)
    assert train_main(["--cache", str(cache), "--out", str(tmp / "run"), *TRAIN_ARGS]) == 0
    return cache, tmp / "run"


def test_add_rows_hint_of_a_renamed_pooled_cache_grows_that_cache(images, tmp_path, capsys):
    made = tmp_path / "made.h5"
    assert extract_main(["run", "--folder", str(images), "--pool-seeds", "1", "--pool-shots", "1",
                         "--out", str(made), *TINY_ARGS]) == 0
    moved = made.rename(tmp_path / "moved.h5")
    argv = ["--cache", str(moved), "--out", str(tmp_path / "run"), "--shots", "2", "--seeds", "1", "--methods",
            "zeroshot"]
    hint = re.search(r"add them with `([^`]+)`", one_error(*run_cli(train_main, argv, capsys)))[1]
    words = shlex.split(hint)
    assert words[:3] == ["python", "-m", "extract"] and words[words.index("--out") + 1] == str(moved)
    assert extract_main(words[3:]) == 0  # following the hint ...
    assert not made.exists() and sorted(p.name for p in tmp_path.iterdir()) == ["moved.h5"]  # ... grows that cache
    assert train_main(argv) == 0


@pytest.mark.parametrize("spoil", ["truncated", "not a cache", "not hdf5"])
def test_an_unusable_out_names_overwrite(images, tmp_path, capsys, spoil):
    out = tmp_path / "c.h5"
    argv = ["run", "--folder", str(images), "--out", str(out), *TINY_ARGS]
    if spoil == "truncated":
        assert extract_main(argv) == 0
        with open(out, "r+b") as f:
            f.truncate(3000)
    elif spoil == "not a cache":
        with h5py.File(out, "w") as f:
            f.attrs["x"] = 1
    else:
        out.write_text("notes\n")
    before = digest(out)
    for extra in (["--dry-run"], []):
        line = one_error(*run_cli(extract_main, [*argv, *extra], capsys))
        assert f"{out}: exists and is not a usable cache" in line and "pass --overwrite" in line, line
        assert "extract it again" not in line and "delete it" not in line
    assert digest(out) == before
    assert extract_main([*argv, "--overwrite"]) == 0
    assert read_cache(out).classnames == ["cat", "dog", "red fox"]


def test_a_lock_path_that_is_a_folder_is_named(images, tmp_path, capsys):
    out = tmp_path / "c.h5"
    Path(f"{partial_path(out)}.lock").mkdir()
    line = one_error(*run_cli(extract_main, ["run", "--folder", str(images), "--out", str(out), *TINY_ARGS], capsys))
    assert f"{partial_path(out)}.lock: is a folder" in line and "cannot write there" not in line


def test_dry_run_checks_what_the_run_checks(images, tmp_path, capsys):
    out = tmp_path / "c.h5"
    argv = ["run", "--folder", str(images), "--out", str(out), *TINY_ARGS]
    assert extract_main(argv) == 0
    before = digest(out)
    config = json.loads((ROOT / "extract/model_configs/cmm-tiny-vit.json").read_text())
    config["vision_cfg"]["layers"] = 2
    (tmp_path / "deeper.json").write_text(json.dumps(config))
    cases = {
        "another model": (["--model-config", str(tmp_path / "deeper.json"), "--model", ""], "refusing to mix"),
        "other views": (["--aug-views", "1"], "holds 0 augmented views per train image, not 1"),
        "other views of another model": (["--aug-views", "1", "--model-config", str(tmp_path / "deeper.json"),
                                          "--model", ""], "augmented views"),
        "batch size 0": (["--batch-size", "0"], "--batch-size"),
        "workers -1": (["--workers", "-1"], "--workers"),
        "aug views -1": (["--aug-views", "-1"], "--aug-views"),
        "bogus device": (["--device", "bogus"], "--device 'bogus'"),
        "nan split": (["--split-ratio", "nan,0.5,0.5"], "--split-ratio"),
    }
    for what, (extra, needle) in cases.items():
        for run in (["--dry-run"], []):
            line = one_error(*run_cli(extract_main, [*argv, *extra, *run], capsys))
            assert needle in line, (what, run, line)
    assert digest(out) == before and not partial_path(out).exists()
    capsys.readouterr()
    assert extract_main([*argv, "--dry-run"]) == 0 and "train: 9 listed, 0 to encode" in capsys.readouterr().out


@pytest.mark.parametrize("extra", [["--pool-seeds", "-1", "--pool-shots", "1"], ["--split-seed", "-1"],
                                   ["--aug-seed", "-1", "--aug-views", "1"], ["--pool-seeds", str(2**31),
                                                                              "--pool-shots", "1"]])
def test_extract_seeds_out_of_range_are_one_line(images, tmp_path, capsys, extra):
    out = tmp_path / "c.h5"
    line = one_error(*run_cli(extract_main, ["run", "--folder", str(images), "--out", str(out), *TINY_ARGS, *extra],
                              capsys))
    assert "is not a seed" in line
    assert list(tmp_path.iterdir()) == []


@pytest.mark.parametrize("extra, needle", [(["--seeds", "-1"], "is not a seed"),
                                           (["--seeds", str(2**31)], "is not a seed"),
                                           (["--memory-gb", "nan"], "--memory-gb"),
                                           (["--memory-gb", "-1"], "--memory-gb"),
                                           (["--memory-gb", "0"], "--memory-gb"),
                                           (["--memory-gb", "1e308"], "--memory-gb")])
def test_train_options_out_of_range_are_one_line(trained, tmp_path, capsys, extra, needle):
    cache, _ = trained
    line = one_error(*run_cli(train_main, ["--cache", str(cache), "--out", str(tmp_path / "o"), *TRAIN_ARGS, *extra],
                              capsys))
    assert needle in line and not (tmp_path / "o").exists()


def test_run_all_with_a_negative_seed_is_one_line(tmp_path):
    folder = make_class_folder(tmp_path / "imgs", per_class=3)
    env = {**os.environ, "PYTHON": sys.executable, "JAX_PLATFORMS": "cpu"}
    done = subprocess.run(["bash", str(ROOT / "run_all.sh"), "--folder", str(folder), "--model", TINY,
                           "--pretrained", "random", "--seeds", "-1", "--out", str(tmp_path / "out")],
                          capture_output=True, text=True, env=env, timeout=300)
    assert "is not a seed" in one_error(done.returncode, done.stderr)


def test_more_shots_than_any_class_has_trains_on_all_images(trained, tmp_path):
    cache, _ = trained
    assert train_main(["--cache", str(cache), "--out", str(tmp_path / "o"), "--shots", str(10**12), "--seeds", "1",
                       "--methods", "zeroshot", "cmm", "--grid", "epochs=1", "--prompt", "single"]) == 0


def test_ctrl_c_during_training_is_one_line_and_the_rerun_resumes(trained, tmp_path, capsys, monkeypatch):
    cache, _ = trained
    run_shots = experiment.run_shots

    def interrupted_at_2_shots(task, shots, *args, **kwargs):
        if shots == 2:
            raise KeyboardInterrupt
        return run_shots(task, shots, *args, **kwargs)

    monkeypatch.setattr(experiment, "run_shots", interrupted_at_2_shots)
    argv = ["--cache", str(cache), "--out", str(tmp_path / "o"), *TRAIN_ARGS]
    code, err = run_cli(train_main, argv, capsys)
    assert code == 130 and "Traceback" not in err
    assert err.strip().splitlines()[-1] == (f"interrupted: finished shot counts are kept in {tmp_path / 'o'}/shots; "
                                            "rerun the same command to resume")
    monkeypatch.setattr(experiment, "run_shots", run_shots)
    assert train_main(argv) == 0
    assert "1-shot: already in" in capsys.readouterr().out


def test_damaged_saved_models_are_named_and_trained_again(trained, tmp_path, capsys):
    cache, run = trained
    params = run / "params" / "2shot.npz"
    kept = params.read_bytes()
    params.write_bytes(kept[:200])
    predict = ["predict", "--run", str(run), "--cache", str(cache), "--out", str(tmp_path / "p.csv")]
    line = one_error(*run_cli(train_main, predict, capsys))
    assert f"{params}: the saved models cannot be read" in line and f"--out {run}" in line
    code, err = run_cli(train_main, ["--cache", str(cache), "--out", str(run), *TRAIN_ARGS], capsys)
    assert code == 0 and f"warning: {params}: the saved models cannot be read" in err, err
    assert "training 2 shots again" in err and "Traceback" not in err
    assert train_main(predict) == 0


def test_report_into_a_read_only_folder_is_one_line(trained, read_only_dir, capsys):
    _, run = trained
    line = one_error(*run_cli(report_main, [str(run), "--out", str(read_only_dir / "summary")], capsys))
    assert "cannot write there" in line and "--out" in line


def _train_in_a_process(cache: Path, out: Path, compile_dir: Path) -> subprocess.CompletedProcess:
    env = {**os.environ, "CMM_JAX_CACHE": str(compile_dir), "JAX_PLATFORMS": "cpu", "PYTHONPATH": str(ROOT)}
    return subprocess.run([sys.executable, "-m", "train_jax", "--cache", str(cache), "--out", str(out), *TRAIN_ARGS,
                           "--methods", "zeroshot", "cmm", "linear_probe"], cwd=ROOT, env=env, capture_output=True,
                          text=True, timeout=300)


def _one_notice(done: subprocess.CompletedProcess, folder: Path) -> None:
    assert done.returncode == 0, done.stderr[-3000:]
    notices = [ln for ln in done.stderr.splitlines() if "compilation cache" in ln]
    assert len(notices) == 1 and notices[0].startswith(f"notice: the compilation cache {folder} cannot be written"), \
        done.stderr[-3000:]
    assert "UserWarning" not in done.stderr


def test_a_compilation_cache_under_a_file_is_one_notice(trained, tmp_path):
    cache, _ = trained
    (tmp_path / "file").write_text("x")
    _one_notice(_train_in_a_process(cache, tmp_path / "o", tmp_path / "file" / "jax"), tmp_path / "file" / "jax")


def test_a_read_only_compilation_cache_is_one_notice(trained, tmp_path, read_only_dir):
    cache, _ = trained
    _one_notice(_train_in_a_process(cache, tmp_path / "o", read_only_dir), read_only_dir)


def test_cases_the_property_test_found_are_one_line(images, tmp_path, capsys):
    """Found by tests/test_cli_property.py (HYPOTHESIS_PROFILE=thorough): tracebacks before."""
    from data.__main__ import main as data_main

    garbage = tmp_path / "garbage"
    garbage.write_bytes(b"\x89HDF\r\n\x1a\n not text")
    (tmp_path / "file").write_text("x")
    for option in ("--classnames", "--templates-file"):
        line = one_error(*run_cli(extract_main, ["run", "--folder", str(images), "--out", str(tmp_path / "c.h5"),
                                                 option, str(garbage), *TINY_ARGS], capsys))
        assert f"{garbage}: cannot read the" in line and "not UTF-8 text" in line
    fashion = ["fashion-mnist", "--idx-dir", str(tmp_path / "no-idx")]
    assert "is not a seed" in one_error(*run_cli(data_main, [*fashion, "--out", str(tmp_path / "fm"), "--seed", "-1"],
                                                 capsys))
    assert f"{garbage}: is a file" in one_error(*run_cli(data_main, [*fashion, "--out", str(garbage)], capsys))
