"""run_all.sh --protocol: few-shot and base-to-new in one call on a tiny image folder (tiny random-weight CLIP),
and the options it refuses before extracting anything."""
from __future__ import annotations

import json
from pathlib import Path

from test_pipeline import _make_folder, _run_all


def test_run_all_few_shot_and_base_to_new_in_one_call(tmp_path: Path) -> None:
    folder = _make_folder(tmp_path / "colours")  # 3 classes: 2 base, 1 new
    out = tmp_path / "out"
    run = _run_all("--folder", str(folder), "--model", "cmm-tiny-vit", "--pretrained", "random", "--shots", "1",
                   "--seeds", "1", "--out", str(out), "--protocol", "few-shot base-to-new",
                   "--train-args", "--methods zeroshot linear_probe cmm --grid lr=1e-2 alpha=1 lambda=1 epochs=2")
    assert run.returncode == 0, run.stderr[-3000:]
    b2n = out / "runs" / "base-to-new" / "colours"
    for name in ("base_to_new.md", "base_to_new.csv", "base_to_new.json"):
        assert (b2n / name).is_file(), name
    data = json.loads((b2n / "base_to_new.json").read_text())
    from data.cache import open_cache

    names = open_cache(out / "cache" / "cmm-tiny-vit-random" / "colours.h5").classnames
    assert data["classes"] == {"base": names[:2], "new": names[2:]}  # in label order: the first ceil(3/2) are base
    summary = (out / "results" / "summary.md").read_text()
    assert "## Base-to-new generalisation" in summary and "| colours |" not in summary.split("## Base-to-new")[1]
    rows = json.loads((out / "results" / "summary.json").read_text())
    assert {r["dataset"] for r in rows["summary"]} == {"colours"} and len(rows["base_to_new"]["rows"]) == 3


def test_run_all_refuses_protocol_options_that_do_not_fit(tmp_path: Path) -> None:
    bogus = _run_all("--protocol", "leave-one-out")
    assert bogus.returncode == 2 and "'leave-one-out' is not few-shot" in bogus.stderr
    folder = _run_all("--folder", str(tmp_path), "--pretrained", "random", "--protocol", "cross-dataset")
    assert folder.returncode == 2 and "not --folder" in folder.stderr
    source = _run_all("--source", "ImageNet")
    assert source.returncode == 2 and "--source goes with --protocol cross-dataset" in source.stderr
