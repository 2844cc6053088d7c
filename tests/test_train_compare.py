"""Paired comparisons end to end: a run stores its selected runs' per-image correctness (shots/<K>shot_test_correct.npz,
read back by records.read_correct), results.md / compare.csv / compare.json carry the comparison against
--compare-to, the report's combine adds the benchmark average and per-shot tables to summary.md, and run folders
without per-image files degrade to the interval over seeds with a note."""

import csv
import json
import shutil
from pathlib import Path

import numpy as np
import pytest

from helpers_train import GapWorld, write_gap_cache
from train_jax import records, report
from train_jax.__main__ import main
from train_jax.compare import ShotInputs, compare_shot
from train_jax.errors import TrainError
from train_jax.records import correct_path, read_correct, write_correct

ARGS = ["--shots", "1", "2", "--seeds", "1", "2", "3", "--methods", "zeroshot", "linear_probe", "cmm", "--grid",
        "lr=1e-2", "alpha=1,2", "epochs=5", "--prompt", "single"]


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("compare")
    cache = write_gap_cache(tmp / "dtd.h5", GapWorld(2, classes=6, dim=16), train=4, val=3, test=30, dataset="DTD")
    out = tmp / "DTD"
    argv = ["--cache", str(cache), "--out", str(out), *ARGS]
    assert main(argv) == 0
    return out, argv


def _selected(out: Path) -> list[dict]:
    return [r for r in json.loads((out / "results.json").read_text())["runs"] if r["selected"]]


def _tables(md: str) -> dict[str, list[dict[str, str]]]:
    """Markdown -> {section heading: [row as {column: cell}]}."""
    tables: dict[str, list[dict[str, str]]] = {}
    heading, header = "", []
    for line in md.splitlines():
        if line.startswith("#"):
            heading, header = line.lstrip("# ").strip(), []
        elif line.startswith("|") and not line.startswith("|---"):
            cells = [c.strip() for c in line.strip().strip("|").split("|")]
            if not header:
                header = cells
            else:
                tables.setdefault(heading, []).append(dict(zip(header, cells)))
    return tables


def test_per_image_correctness_is_stored_for_the_selected_runs(run):
    out, _ = run
    for k in (1, 2):
        correct = read_correct(correct_path(out / "shots", k))
        chosen = [r for r in _selected(out) if r["shots"] == k]
        assert set(correct) == {(r["method"], r["seed"]) for r in chosen}
        for r in chosen:  # the same predictions as the recorded accuracy
            assert 100 * correct[(r["method"], r["seed"])].mean() == pytest.approx(r["test_acc"], abs=1e-9)
        assert {v.shape for v in correct.values()} == {(6 * 30,)}


def test_results_carry_the_comparison_in_markdown_csv_and_json(run):
    out, _ = run
    data = json.loads((out / "compare.json").read_text())
    assert data["reference"] == "cmm" and data["level"] == 0.95
    rows = data["comparisons"]
    assert [(r["shots"], r["method"]) for r in rows] == [(1, "zeroshot"), (1, "linear_probe"), (2, "zeroshot"),
                                                         (2, "linear_probe")]
    chosen = _selected(out)
    for row in rows:  # recomputed from the records and the per-image files
        acc = {}
        for r in chosen:
            if r["shots"] == row["shots"]:
                acc.setdefault(r["method"], {})[r["seed"]] = r["test_acc"]
        (again,) = [c for c in compare_shot("DTD", row["shots"], ShotInputs(
            acc, read_correct(correct_path(out / "shots", row["shots"]))), "cmm") if c.method == row["method"]]
        assert row["mean"] == pytest.approx(again.mean) and row["over_images"]["low"] == again.over_images.low
        assert row["seeds"] == [1, 2, 3] and row["n_test"] == 180 and row["note"] == ""
    with open(out / "compare.csv") as f:
        table = list(csv.DictReader(f))
    assert [(int(r["shots"]), r["method"]) for r in table] == [(r["shots"], r["method"]) for r in rows]
    assert all(float(t["mean"]) == pytest.approx(r["mean"], abs=1e-4) for t, r in zip(table, rows))
    md = _tables((out / "results.md").read_text())["Paired differences vs cmm (percentage points)"]
    for line, row in zip(md, rows):
        assert line["Method"] == row["method"] and line["Δ"] == f"{row['mean']:+.2f}"
        assert line["95% CI, seeds"].endswith("*") == row["over_seeds"]["excludes_zero"]
        assert line["95% CI, test images"].endswith("*") == row["over_images"]["excludes_zero"]
        assert (line["Seeds to settle"] == "—") == (row["settle"] == "settled")


def test_compare_to_rerenders_and_missing_files_degrade(run, tmp_path, capsys):
    out, argv = run
    copy = tmp_path / "DTD"
    shutil.copytree(out, copy)
    argv = [a if a != str(out) else str(copy) for a in argv]
    assert main([*argv, "--compare-to", "zeroshot"]) == 0  # finished shots are not retrained
    assert "already in" in capsys.readouterr().out
    data = json.loads((copy / "compare.json").read_text())
    assert data["reference"] == "zeroshot" and {r["method"] for r in data["comparisons"]} == {"linear_probe", "cmm"}
    assert "Paired differences vs zeroshot" in (copy / "results.md").read_text()
    correct_path(copy / "shots", 2).unlink()  # a shot count trained before the file existed
    assert main(argv) == 0
    rows = json.loads((copy / "compare.json").read_text())["comparisons"]
    assert all((r["over_images"] is None) == (r["shots"] == 2) for r in rows)
    assert all(r["over_seeds"] is not None for r in rows)
    assert "interval over seeds only" in (copy / "results.md").read_text()


def test_combine_adds_the_average_and_per_shot_tables(run, tmp_path):
    out, _ = run
    euro = tmp_path / "EuroSAT"
    shutil.copytree(out, euro)
    results = json.loads((euro / "results.json").read_text())
    for r in results["runs"]:
        r["dataset"] = "EuroSAT"
        r["test_acc"] = r["test_acc"] + (1.0 if r["method"] == "linear_probe" else 0.0)
    for r in results["summary"]:
        r["dataset"] = "EuroSAT"
    (euro / "results.json").write_text(json.dumps(results))
    old = tmp_path / "old"
    old.mkdir()
    (old / "results.json").write_text(json.dumps({"summary": [
        {"dataset": "Food101", "method": "cmm", "shots": 1, "test_mean": 50.0, "test_std": 0.5, "seeds": [1],
         "failed_seeds": [], "failed_runs": 0, "settings": ["-"], "shift": {}}]}))
    assert report.main([str(out), str(euro), "--out", str(tmp_path / "all")]) == 0
    data = json.loads((tmp_path / "all" / "compare.json").read_text())
    average = data["average"]
    assert [(r["shots"], r["method"]) for r in average] == [(1, "zeroshot"), (1, "linear_probe"), (2, "zeroshot"),
                                                            (2, "linear_probe")]
    by = {(r["dataset"], r["shots"], r["method"]): r for r in data["comparisons"]}
    for r in average:
        parts = [by[(d, r["shots"], r["method"])] for d in ("DTD", "EuroSAT")]
        assert r["datasets"] == ["DTD", "EuroSAT"] and r["dataset"] == "Average (2 of 11 datasets)"
        assert r["diffs"] == pytest.approx(np.mean([p["diffs"] for p in parts], axis=0))  # averaged per seed
        assert r["n_test"] == 360 and r["over_images"] is not None
    md = (tmp_path / "all" / "summary.md").read_text()
    tables = _tables(md)
    assert len(tables["Paired differences vs cmm: Average (2 of 11 datasets)"]) == 4
    one_shot = {row["Method"]: row for row in tables["Paired differences vs cmm, 1-shot"]}
    assert list(one_shot["zeroshot"]) == ["Method", "DTD", "EuroSAT", "Average (2 of 11 datasets)"]
    for method, row in one_shot.items():
        r = by[("DTD", 1, method)]
        marks = "*" * r["over_seeds"]["excludes_zero"] + "°" * r["over_images"]["excludes_zero"]
        assert row["DTD"] == f"{r['mean']:+.2f}{marks}"
    # a run folder whose results.json has no per-run records is named and left out; an absent reference is named
    assert report.main([str(out), str(old), "--out", str(tmp_path / "x"), "--compare-to", "tip_adapter_f"]) == 0
    notes = json.loads((tmp_path / "x" / "compare.json").read_text())["notes"]
    assert any(str(old) in n for n in notes) and any("tip_adapter_f has no selected run" in n for n in notes)
    assert "tip_adapter_f has no selected run" in (tmp_path / "x" / "summary.md").read_text()


def test_per_image_files_round_trip_and_bad_ones_are_one_line_errors(tmp_path):
    path = tmp_path / "1shot_test_correct.npz"
    assert read_correct(path) is None  # a run folder from before the file existed
    correct = {"cmm/seed1": np.array([True, False, True]), "zeroshot/seed1": np.array([False, False, True])}
    write_correct(path, correct)
    back = read_correct(path)
    assert set(back) == {("cmm", 1), ("zeroshot", 1)} and np.array_equal(back[("cmm", 1)], correct["cmm/seed1"])
    assert not list(tmp_path.glob("*.tmp"))
    bad = {
        "version": dict(schema_version=np.array(99), **correct),
        "lengths": dict(schema_version=np.array(1), **{"cmm/seed1": np.ones(3, bool), "x/seed1": np.ones(4, bool)}),
        "key": dict(schema_version=np.array(1), **{"cmm": np.ones(3, bool)}),
    }
    for name, arrays in bad.items():
        np.savez(tmp_path / f"{name}.npz", **arrays)
    (tmp_path / "junk.npz").write_bytes(b"not a zip")
    for name in (*bad, "junk"):
        with pytest.raises(TrainError) as e:
            read_correct(tmp_path / f"{name}.npz")
        assert f"{name}.npz" in str(e.value) and "\n" not in str(e.value) and "delete it" in str(e.value)


def test_every_file_of_the_run_folder_is_named_by_records(run):
    """records declares every file a run writes: the folder holds only those names (and the per-shot files)."""
    out, _ = run
    named = {records.RUN_CONFIG, records.RESULTS_JSON, records.RESULTS_CSV, records.RESULTS_MD, records.ACCURACY_PNG,
             records.LOSS_PNG, records.COMPILE_JSON, records.GAP_JSON, records.GAP_MD, records.GAP_PNG,
             records.COMPARE_JSON, records.COMPARE_CSV}
    shots = {1, 2}
    named |= {str(p.relative_to(out)) for k in shots for p in (records.shot_path(out, k), records.params_path(out, k),
                                                                records.correct_path(out / records.SHOTS_DIR, k))}
    found = {str(p.relative_to(out)) for p in out.rglob("*") if p.is_file()}
    assert found <= named and records.GAP_JSON in found and records.COMPARE_CSV in found
