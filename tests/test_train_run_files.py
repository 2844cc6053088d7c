"""The diagnostics files of a run folder (gap.json, compare.json / compare.csv) through ``train_jax.records``:
typed records that round-trip, versions checked on read, bad files as one-line errors."""

import csv
import json

import pytest

from train_jax import records
from train_jax.compare import Comparison, Interval
from train_jax.errors import TrainError
from train_jax.records import CompareFile, GapFile, GapRow

STATS = {"gap": 0.5, "cos_own": 0.3, "cos_other": 0.2, "margin": 0.1, "nearest_acc": 75.0}


def _gap() -> GapFile:
    row = GapRow("cmm", 2, (1, 2), (STATS, {**STATS, "gap": 0.25}), {**STATS, "gap": 0.375}, {**STATS, "gap": 0.125})
    return GapFile("Toy", STATS, (row,))


def _comparisons() -> tuple[Comparison, ...]:
    one = Comparison("Toy", 1, "linear_probe", "cmm", (1, 2, 3), (1.0, 2.0, 3.0), 2.0, 1.0, Interval(-0.5, 4.5),
                     Interval(0.5, 3.5), 30, 7, "7", "")
    avg = Comparison("Average (2 of 11 datasets)", 1, "zeroshot", "cmm", (1,), (-4.0,), -4.0, None, None, None, 60,
                     None, "not estimable", "one seed", ("DTD", "EuroSAT"))
    return one, avg


def test_gap_file_round_trips_and_is_versioned(tmp_path):
    gap = _gap()
    records.write_gap(tmp_path, gap, "# md\n")
    assert (tmp_path / records.GAP_MD).read_text() == "# md\n"
    data = json.loads((tmp_path / records.GAP_JSON).read_text())
    assert data["schema_version"] == records.GAP_VERSION and list(data) == ["schema_version", "dataset", "before",
                                                                            "after"]
    assert records.read_gap(tmp_path) == gap
    del data["schema_version"]  # a file written before gap.json carried a version reads as version 1
    (tmp_path / records.GAP_JSON).write_text(json.dumps(data))
    assert records.read_gap(tmp_path) == gap
    assert records.read_gap(tmp_path / "none") is None


@pytest.mark.parametrize("text, says", [("{", "unreadable"), (json.dumps({"schema_version": 9}), "version 9"),
                                        (json.dumps({"dataset": "x"}), "before")])
def test_bad_gap_files_are_one_line_errors(tmp_path, text, says):
    (tmp_path / records.GAP_JSON).write_text(text)
    with pytest.raises(TrainError) as e:
        records.read_gap(tmp_path)
    assert str(tmp_path / records.GAP_JSON) in str(e.value) and says in str(e.value) and "\n" not in str(e.value)


def test_compare_files_round_trip_json_and_csv(tmp_path):
    one, avg = _comparisons()
    compare = CompareFile("cmm", (one,), (avg,), ("a note",))
    records.write_compare(tmp_path, compare)
    assert records.read_compare(tmp_path) == compare
    data = json.loads((tmp_path / records.COMPARE_JSON).read_text())
    assert data["schema_version"] == records.COMPARE_VERSION
    assert data["comparisons"][0]["over_seeds"] == {"low": -0.5, "high": 4.5, "excludes_zero": False}
    assert "datasets" not in data["comparisons"][0] and data["average"][0]["datasets"] == ["DTD", "EuroSAT"]
    with open(tmp_path / records.COMPARE_CSV) as f:
        rows = list(csv.DictReader(f))
    assert list(rows[0]) == list(records.COMPARE_FIELDS)
    assert [r["method"] for r in rows] == ["linear_probe", "zeroshot"]  # the average's rows last
    assert (rows[0]["mean"], rows[0]["seeds"], rows[0]["images_excludes_0"]) == ("2.0000", "1 2 3", "1")
    assert (rows[1]["sd"], rows[1]["seeds_low"], rows[1]["seeds_to_settle"]) == ("", "", "")


def test_bad_compare_files_are_one_line_errors(tmp_path):
    records.write_compare(tmp_path, CompareFile("cmm", ()))
    data = json.loads((tmp_path / records.COMPARE_JSON).read_text())
    (tmp_path / records.COMPARE_JSON).write_text(json.dumps({**data, "schema_version": 2}))
    with pytest.raises(TrainError, match="version 2") as e:
        records.read_compare(tmp_path)
    assert "\n" not in str(e.value)
    with pytest.raises(TrainError, match="unreadable"):
        records.read_compare(tmp_path / "none")


def test_saved_params_lists_shot_counts_in_numeric_order(tmp_path):
    (tmp_path / records.PARAMS_DIR).mkdir()
    for k in (10, 2, 1):
        records.save_params(records.params_path(tmp_path, k), {})
    (tmp_path / records.PARAMS_DIR / "notes.npz").write_bytes(b"")
    assert [k for k, _ in records.saved_params(tmp_path)] == [1, 2, 10]
