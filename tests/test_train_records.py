"""The results schema: a RunRecord survives JSON byte for byte; records files of schema 1 (a plain list), 2 (no
curves) and 3 (no loss parts) read, others are one-line errors."""

import dataclasses
import json

import pytest

from train_jax.config import Settings
from train_jax.errors import TrainError
from train_jax.records import SCHEMA_VERSION, RunRecord, read_records, records_from_json, records_to_json


def _records() -> list[RunRecord]:
    common = dict(dataset="Toy", shots=2, method="cmm", setting="lr=0.01", val_acc=50.0, test_acc=37.5)
    return [
        RunRecord(**common, seed=1, settings=Settings(lr=1e-2, use_aug=True), val_score=-0.6931471805599453,
                  failed=False, fail_step=None, final_loss=0.123456789, selected=True, tie_break="score",
                  shift={"ToyShift": 12.5}, note="a remark", loss_curve=(0.75, 0.5, None),
                  loss_parts={"ce": (0.5, 0.25, None), "triplet": (0.125, 0.0625, None)}),
        RunRecord(**common, seed=2, settings=Settings(lr=1e-2), val_score=None, failed=True, fail_step=7,
                  final_loss=None, selected=False, tie_break=None, shift={}),
    ]


def test_round_trip_through_json_text():
    records = _records()
    text = json.dumps(records_to_json(records))
    assert json.loads(text)["schema_version"] == SCHEMA_VERSION
    again = records_from_json(json.loads(text), "x.json")
    assert again == records and json.dumps(records_to_json(again)) == text
    assert all(isinstance(r.settings, Settings) for r in again)


def test_schema_1_plain_list_reads(tmp_path):
    path = tmp_path / "2shot.json"
    path.write_text(json.dumps([r.to_json() for r in _records()]))
    assert read_records(path) == _records()


def test_schema_2_reads_without_curves(tmp_path):
    path = tmp_path / "2shot.json"
    old = [{k: v for k, v in r.to_json().items() if k not in ("loss_curve", "loss_parts")} for r in _records()]
    path.write_text(json.dumps({"schema_version": 2, "records": old}))
    assert read_records(path) == [dataclasses.replace(r, loss_curve=(), loss_parts={}) for r in _records()]


def test_schema_3_reads_without_loss_parts(tmp_path):
    path = tmp_path / "2shot.json"
    old = [{k: v for k, v in r.to_json().items() if k != "loss_parts"} for r in _records()]
    path.write_text(json.dumps({"schema_version": 3, "records": old}))
    assert read_records(path) == [dataclasses.replace(r, loss_parts={}) for r in _records()]
    assert _records()[0].loss_parts  # the round trip above keeps them


def test_schema_4_reads_without_transfer(tmp_path):
    records = [dataclasses.replace(_records()[0], transfer={"new": 40.0, "ToyTarget": 12.5}), _records()[1]]
    assert records_from_json(json.loads(json.dumps(records_to_json(records))), "x.json") == records
    path = tmp_path / "2shot.json"
    old = [{k: v for k, v in r.to_json().items() if k != "transfer"} for r in records]
    path.write_text(json.dumps({"schema_version": 4, "records": old}))
    assert read_records(path) == [dataclasses.replace(r, transfer={}) for r in records]


@pytest.mark.parametrize("data, says", [
    ({"schema_version": 99, "records": []}, "found 99"),
    ([{"dataset": "Toy"}], "missing keys"),
    ([{**_records()[0].to_json(), "extra": 1}], "unknown keys ['extra']"),
    ([{**_records()[0].to_json(), "settings": {"nope": 1}}], "unknown setting"),
])
def test_other_files_are_one_line_errors(tmp_path, data, says):
    path = tmp_path / "2shot.json"
    path.write_text(json.dumps(data))
    with pytest.raises(TrainError) as e:
        read_records(path)
    assert str(path) in str(e.value) and says in str(e.value) and "\n" not in str(e.value)
