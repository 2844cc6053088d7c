"""`python -m extract`: end to end in a subprocess, and each bad input's one-line error leaving the cache untouched."""
from __future__ import annotations

import fcntl
import json
import os
import subprocess
import sys
from pathlib import Path

import h5py
import numpy as np
import pytest
import torch

from extract.__main__ import build_parser, main
from data.cache import lock_path, partial_path, read_cache
from helpers_extract import BATCH_ATOL, TINY, digest, make_class_folder, make_local_dir, seeded_tiny

REPO = Path(__file__).resolve().parents[1]
TINY_ARGS = ["--model", TINY, "--pretrained", "random", "--workers", "0", "--batch-size", "4", "--no-progress"]


def test_cli_end_to_end_in_a_subprocess(tmp_path: Path) -> None:
    root = make_class_folder(tmp_path / "imgs", per_class=4)
    extra = tmp_path / "mine.txt"
    extra.write_text("a drawing of a {}.\n")
    out = tmp_path / "c.h5"
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    run = subprocess.run([sys.executable, "-m", "extract", "run", "--folder", str(root), "--out", str(out),
                          "--model", TINY, "--pretrained", "random", "--workers", "1", "--aug-views", "2",
                          "--templates-file", str(extra), "--template", "a blurry photo of a {}."],
                         cwd=tmp_path, env=env, capture_output=True, text=True, timeout=300)
    assert run.returncode == 0, run.stderr
    assert f"wrote {out}" in run.stdout and "img/s" in run.stderr
    cache = read_cache(out)
    assert cache.templates[0] == "a blurry photo of a {}." and cache.templates[-1] == "a drawing of a {}."
    assert len(cache.templates) == 9 and cache.splits["train"].aug_features.shape[1] == 2
    info = subprocess.run([sys.executable, "-m", "extract", "info", str(out)], cwd=tmp_path, env=env,
                          capture_output=True, text=True, timeout=120)
    assert info.returncode == 0 and "complete" in info.stdout and "valid: yes" in info.stdout
    assert "train: 6 encoded of 6 listed rows" in info.stdout


def test_help_explains_every_option() -> None:
    parser = build_parser()
    subparsers = next(a for a in parser._actions if a.dest == "command").choices
    for name, sub in subparsers.items():
        for action in sub._actions:
            assert action.help, f"{name} {action.option_strings or action.dest} has no help"
    run_help = " ".join(subparsers["run"].format_help().split())
    assert "(default: 64)" in run_help and "(default: None)" not in run_help
    assert "(default: all the dataset has)" in run_help and "has) (default" not in run_help


def test_sharded_cli_then_merge_then_info(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    root = make_class_folder(tmp_path / "imgs", per_class=4)
    out = tmp_path / "c.h5"
    for i in range(2):
        assert main(["run", "--folder", str(root), "--out", str(out), "--shard", f"{i}/2", *TINY_ARGS]) == 0
    shards = [str(tmp_path / f"c.shard-{i}-of-2.h5") for i in range(2)]
    assert main(["merge", str(out), *shards, "--no-progress"]) == 0
    assert main(["run", "--folder", str(root), "--out", str(tmp_path / "full.h5"), *TINY_ARGS]) == 0
    merged, full = read_cache(out), read_cache(tmp_path / "full.h5")
    for name, split in full.splits.items():
        np.testing.assert_allclose(merged.splits[name].features, split.features, atol=BATCH_ATOL)
    capsys.readouterr()
    assert main(["info", str(partial_path(out)) + "x"]) == 2
    assert "no such cache file" in capsys.readouterr().err


def one_error_line(err: str) -> str:
    lines = [ln for ln in err.splitlines() if ln.startswith("error: ")]
    assert len(lines) == 1 and "Traceback" not in err, err
    return lines[0]


def test_bad_inputs_give_one_line_errors_and_leave_the_cache_untouched(tmp_path: Path,
                                                                       capsys: pytest.CaptureFixture) -> None:
    root = make_class_folder(tmp_path / "imgs", per_class=4)
    out = tmp_path / "c.h5"
    assert main(["run", "--folder", str(root), "--out", str(out), *TINY_ARGS]) == 0
    before = digest(out)
    empty = make_class_folder(tmp_path / "with_empty", per_class=2)
    (empty / "zebra").mkdir()
    corrupt = make_class_folder(tmp_path / "corrupt", per_class=5)
    (corrupt / "dog" / "img01.png").write_bytes(b"garbage")
    config = json.loads((REPO / "extract/model_configs/cmm-tiny-vit.json").read_text())
    config["vision_cfg"]["layers"] = 2
    (tmp_path / "deeper.json").write_text(json.dumps(config))
    tensor, empty_pt, noise_pt, noise_st = (tmp_path / n for n in ("t.pt", "e.pt", "n.pt", "n.safetensors"))
    torch.save(torch.zeros(3), tensor)
    empty_pt.write_bytes(b"")
    noise_pt.write_bytes(np.random.default_rng(0).bytes(4096))
    noise_st.write_bytes(np.random.default_rng(1).bytes(4096))
    cases = {
        "missing folder": (["--folder", str(tmp_path / "nope")], "image folder not found"),
        "empty class": (["--folder", str(empty)], "zebra: class folder holds no image"),
        "unknown model": (["--folder", str(root), "--model", "ViT-Q-99"], "unknown model 'ViT-Q-99'"),
        "template without {}": (["--folder", str(root), "--template", "a photo"], "placeholder '{}'"),
        "corrupt image": (["--folder", str(corrupt), "--name", "imgs", "--overwrite"],
                          "img01.png: cannot read image"),
        "other listing": (["--folder", str(corrupt), "--name", "imgs", "--skip-bad"],
                          "exists with another image listing"),
        "different model": (["--folder", str(root), "--model-config", str(tmp_path / "deeper.json"),
                             "--model", ""], "refusing to mix"),
        "no dataset": ([], "give exactly one of --folder"),
        "no --pretrained": (["--folder", str(root), "--pretrained", ""], "--pretrained is required with --model"),
        "bare tensor weights": (["--folder", str(root), "--pretrained", str(tensor)], "cannot load these weights"),
        "empty weights": (["--folder", str(root), "--pretrained", str(empty_pt)], "cannot load these weights"),
        "random .pt": (["--folder", str(root), "--pretrained", str(noise_pt)], "cannot load these weights"),
        "random .safetensors": (["--folder", str(root), "--pretrained", str(noise_st)], "cannot load these weights"),
    }
    for what, (args, message) in cases.items():
        capsys.readouterr()
        code = main(["run", "--out", str(out), *TINY_ARGS, *args])
        line = one_error_line(capsys.readouterr().err)
        assert code == 2 and message in line, (what, line)
        assert digest(out) == before, what
    assert main(["run", "--out", str(out), "--folder", str(corrupt), "--name", "imgs", "--skip-bad",
                 "--overwrite", *TINY_ARGS]) == 0
    assert read_cache(out).bad_paths == ["dog/img01.png"]


def test_out_in_read_only_folder_is_one_line(tmp_path: Path, read_only_dir: Path,
                                             capsys: pytest.CaptureFixture) -> None:
    root = make_class_folder(tmp_path / "imgs", per_class=2)
    assert main(["run", "--folder", str(root), "--out", str(read_only_dir / "c.h5"), *TINY_ARGS]) == 2
    line = one_error_line(capsys.readouterr().err)
    assert f"{read_only_dir}: cannot write there" in line and "writable --out" in line


def test_out_that_is_a_folder_and_not_utf8_names(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    root = make_class_folder(tmp_path / "imgs", per_class=2)
    (tmp_path / "c.h5").mkdir()
    assert main(["run", "--folder", str(root), "--out", str(tmp_path / "c.h5"), *TINY_ARGS]) == 2
    assert "c.h5: is a folder, not a cache file" in one_error_line(capsys.readouterr().err)
    assert main(["info", str(tmp_path / "c.h5")]) == 2
    assert "c.h5: is a folder, not a cache file" in one_error_line(capsys.readouterr().err)
    (root / "cat" / "img00.png").rename(root / "cat" / os.fsdecode(b"caf\xe9.png"))
    assert main(["run", "--folder", str(root), "--out", str(tmp_path / "d.h5"), "--skip-bad", *TINY_ARGS]) == 2
    assert "file name is not valid UTF-8" in one_error_line(capsys.readouterr().err)


def test_info_and_merge_on_files_without_bad_and_info_names_corruption(tmp_path: Path,
                                                                       capsys: pytest.CaptureFixture) -> None:
    root = make_class_folder(tmp_path / "imgs", per_class=4)
    shards = [tmp_path / f"c.shard-{i}-of-2.h5" for i in range(2)]
    for i in range(2):
        assert main(["run", "--folder", str(root), "--out", str(tmp_path / "c.h5"), "--shard", f"{i}/2",
                     *TINY_ARGS]) == 0
    for shard in shards:
        with h5py.File(shard, "r+") as f:
            del f["bad"]
    capsys.readouterr()
    assert main(["info", str(shards[0])]) == 0
    out = capsys.readouterr().out
    # text, and per split (3) labels, status, slot, features and norms
    assert "bad images: 0" in out and "checksums: 16 datasets verified" in out and "valid: yes" in out
    assert main(["merge", str(tmp_path / "m.h5"), *map(str, shards), "--no-progress"]) == 0
    with h5py.File(tmp_path / "m.h5", "r") as f:
        offset = f["splits/train/status"].id.get_chunk_info(0).byte_offset
    with open(tmp_path / "m.h5", "r+b") as raw:
        raw.seek(offset)
        raw.write(b"\x07")
    capsys.readouterr()
    assert main(["info", str(tmp_path / "m.h5")]) == 2
    assert "/splits/train/status rows 0-" in one_error_line(capsys.readouterr().err)


def test_info_on_a_partial_being_written_says_so(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    out = tmp_path / "c.h5"
    partial_path(out).write_bytes(b"")
    lock = os.open(lock_path(out), os.O_RDWR | os.O_CREAT)
    fcntl.flock(lock, fcntl.LOCK_EX)
    try:
        assert main(["info", str(partial_path(out))]) == 2
    finally:
        os.close(lock)
    line = one_error_line(capsys.readouterr().err)
    assert "an extraction is writing it now; wait for it to finish" in line and "delete" not in line


def test_local_dir_model_without_pretrained(tmp_path: Path) -> None:
    root = make_class_folder(tmp_path / "imgs", per_class=4)
    make_local_dir(tmp_path / "model", seeded_tiny(5))
    out = tmp_path / "c.h5"
    assert main(["run", "--folder", str(root), "--out", str(out), "--model", f"local-dir:{tmp_path / 'model'}",
                 "--workers", "0", "--no-progress"]) == 0
    attrs = read_cache(out).attrs
    assert attrs["model"] == f"local-dir:{(tmp_path / 'model').resolve()}" and attrs["activation"] == "gelu"
    assert json.loads(attrs["model_config"])["model_cfg"]["embed_dim"] == 32
    assert attrs["logit_scale"] == pytest.approx(1 / 0.07, rel=1e-6) and attrs["logit_bias"] == 0.0


def test_dry_run_plans_a_pooled_extraction_without_a_model(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    root = make_class_folder(tmp_path / "imgs", per_class=6)
    out = tmp_path / "c.h5"
    argv = ["run", "--folder", str(root), "--out", str(out), "--model", "no-such-model", "--pretrained", "random"]
    assert main([*argv, "--pool-seeds", "1", "--pool-shots", "1", "--aug-views", "2", "--dry-run"]) == 0
    text = capsys.readouterr().out
    assert "train rows encoded: seeds 1 at <= 1 shots" in text and "train: 9 listed, 3 to encode" in text
    assert "9 image forwards" in text and not out.exists() and not partial_path(out).exists()  # 3 x (1 + 2 views)
    assert main([*argv, "--pool-seeds", "1", "--dry-run"]) == 2
    assert "--pool-seeds needs --pool-shots" in one_error_line(capsys.readouterr().err)


def test_dry_run_json_is_the_plan_as_data(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    root = make_class_folder(tmp_path / "imgs", per_class=6)
    out = tmp_path / "c.h5"
    argv = ["run", "--folder", str(root), "--out", str(out), "--model", "no-such-model", "--pretrained", "random",
            "--pool-seeds", "1", "--pool-shots", "1", "--aug-views", "2", "--dry-run"]
    assert main([*argv, "--json"]) == 0
    planned = json.loads(capsys.readouterr().out)
    assert planned["target"] == str(out) and planned["pool"] == {"seeds": [1], "shots": 1}
    assert planned["splits"]["train"] == {"listed": 9, "to_encode": 3, "in_file": 0, "forwards": 9}
    assert planned["to_encode"] == sum(s["to_encode"] for s in planned["splits"].values())
    assert planned["views"] == {"asked": 2, "in_file": None} and planned["refused"] is None
    assert main(argv) == 0  # the same plan in words
    assert "train: 9 listed, 3 to encode (0 already in the file), 9 image forwards" in capsys.readouterr().out
    assert main([*argv[:-1], "--json"]) == 2  # --json without --dry-run
    assert "--json goes with --dry-run" in one_error_line(capsys.readouterr().err)
