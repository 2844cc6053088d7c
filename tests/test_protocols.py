"""The generalisation protocols' rows (train_jax/protocols.py), their tables (train_jax/protocol_report.py) and the
published averages (data/published_protocols.py), against plain loops and known answers."""

import csv
import json
from dataclasses import dataclass, field

import numpy as np
import pytest

from data.published_protocols import PATH as PUBLISHED
from data.published_protocols import load as load_published
from train_jax import protocol_report
from train_jax.protocols import (NEW, AverageRow, BaseNewRow, Stat, TransferRow, base_new_average, base_new_rows,
                                 harmonic_mean, transfer_rows)


@dataclass
class Rec:
    dataset: str
    shots: int
    method: str
    seed: int
    selected: bool
    test_acc: float
    transfer: dict = field(default_factory=dict)


def test_harmonic_mean_reproduces_cocoops_published_hm():
    """Known answers: CoCoOp's Table 1 averages, HM = 2BN/(B+N) of the published base and new (2 decimals)."""
    rows = load_published().base_to_new
    assert {r.method for r in rows} == {"CLIP", "CoOp", "CoCoOp"}
    for r in rows:
        assert harmonic_mean(r.base, r.new) == pytest.approx(r.hm, abs=0.005)
    assert harmonic_mean(0.0, 0.0) == 0.0 and harmonic_mean(50.0, 50.0) == 50.0


def _base_new_records(rng):
    out = []
    for dataset in ("A", "B"):
        for method in ("zeroshot", "linear_probe", "cmm"):
            for seed in (1, 2, 3):
                for setting in range(2):  # one selected, one not
                    base = float(rng.uniform(40, 90))
                    new = {} if method == "linear_probe" else {NEW: float(rng.uniform(30, 80))}
                    out.append(Rec(dataset, 4, method, seed, setting == 1, base, new))
    return out


def test_base_new_rows_and_average_equal_plain_loops():
    records = _base_new_records(np.random.default_rng(0))
    rows = {(r.dataset, r.method): r for r in base_new_rows(records)}
    for (dataset, method), row in rows.items():
        chosen = [r for r in records if r.selected and r.dataset == dataset and r.method == method]
        base = [r.test_acc for r in chosen]
        assert row.seeds == (1, 2, 3)
        assert row.base == Stat(pytest.approx(sum(base) / 3), pytest.approx(np.std(base)))
        if method == "linear_probe":
            assert row.new is None and row.hm is None and row.scored_by == "none"
            continue
        new = [r.transfer[NEW] for r in chosen]
        assert row.new.mean == pytest.approx(sum(new) / 3)
        assert row.hm == pytest.approx(2 * row.base.mean * row.new.mean / (row.base.mean + row.new.mean))
        assert row.scored_by == ("zero-shot" if method == "zeroshot" else "map")
    average = {a.method: a for a in base_new_average(list(rows.values()))}
    cmm = average["cmm"]
    b = (rows["A", "cmm"].base.mean + rows["B", "cmm"].base.mean) / 2
    n = (rows["A", "cmm"].new.mean + rows["B", "cmm"].new.mean) / 2
    assert (cmm.base, cmm.new, cmm.hm) == (pytest.approx(b), pytest.approx(n), pytest.approx(2 * b * n / (b + n)))
    assert average["linear_probe"].new is None and average["linear_probe"].hm is None


def test_average_needs_every_dataset():
    rows = [r for r in base_new_rows(_base_new_records(np.random.default_rng(1)))
            if not (r.dataset == "B" and r.method == "cmm")]
    assert {a.method for a in base_new_average(rows)} == {"zeroshot", "linear_probe"}


def test_transfer_rows_average_the_targets_means():
    recs = [Rec("ImageNet", 16, m, s, True, 70.0 + s, {} if m == "linear_probe" else {"DTD": 40.0 + s, "EuroSAT": 30.0 * s})
            for m in ("zeroshot", "linear_probe", "cmm") for s in (1, 2)]
    rows = {r.method: r for r in transfer_rows(recs, ["DTD", "EuroSAT"])}
    cmm = rows["cmm"]
    assert cmm.source_acc.mean == pytest.approx(71.5) and cmm.targets["DTD"].mean == pytest.approx(41.5)
    assert cmm.targets["EuroSAT"] == Stat(pytest.approx(45.0), pytest.approx(15.0))
    assert cmm.average == pytest.approx((41.5 + 45.0) / 2)
    assert rows["linear_probe"].targets == {"DTD": None, "EuroSAT": None} and rows["linear_probe"].average is None
    assert rows["linear_probe"].scored_by == "none" and rows["zeroshot"].scored_by == "zero-shot"


def test_rows_round_trip_through_json():
    records = _base_new_records(np.random.default_rng(2))
    for row in base_new_rows(records):
        assert BaseNewRow.from_json(json.loads(json.dumps(row.to_json()))) == row
    for row in base_new_average(base_new_rows(records)):
        assert AverageRow.from_json(json.loads(json.dumps(row.to_json()))) == row
    recs = [Rec("S", 1, "cmm", 1, True, 50.0, {"T": 20.0}), Rec("S", 1, "linear_probe", 1, True, 60.0)]
    for row in transfer_rows(recs, ["T"]):
        assert TransferRow.from_json(json.loads(json.dumps(row.to_json()))) == row


def test_run_folder_tables_markdown_csv_json(tmp_path):
    rows = base_new_rows(_base_new_records(np.random.default_rng(3)))
    a = [r for r in rows if r.dataset == "A"]
    protocol_report.write_base_new(tmp_path, a, {"base": ["x", "y"], "new": ["z"]})
    md = (tmp_path / "base_to_new.md").read_text()
    assert "2 base, 1 new classes" in md and "| linear_probe |" in md
    lp = next(line for line in md.splitlines() if line.startswith("| linear_probe |"))
    assert "| — | — | — (per-class weights) |" in lp  # new and HM
    assert "frozen prompt prototypes" in md and "per-class weights" in md
    with open(tmp_path / "base_to_new.csv") as f:
        lines = list(csv.DictReader(f))
    assert [line["method"] for line in lines] == ["zeroshot", "linear_probe", "cmm"]
    assert lines[1]["new_mean"] == "" and float(lines[2]["hm"]) == pytest.approx(a[2].hm, abs=0.005)
    assert protocol_report.read_base_new(tmp_path) == a

    recs = [Rec("S", 16, m, 1, True, 50.0, {} if m == "linear_probe" else {"T1": 20.0, "T2": 30.0})
            for m in ("zeroshot", "linear_probe", "cmm")]
    xd = transfer_rows(recs, ["T1", "T2"])
    protocol_report.write_transfer(tmp_path, xd)
    md = (tmp_path / "cross_dataset.md").read_text()
    assert "| cmm | 50.00 ± 0.00 | 20.00 ± 0.00 | 30.00 ± 0.00 | 25.00 |" in md
    with open(tmp_path / "cross_dataset.csv") as f:
        lines = list(csv.DictReader(f))
    assert [(x["method"], x["role"], x["dataset"]) for x in lines[:4]] == [
        ("zeroshot", "source", "S"), ("zeroshot", "target", "T1"), ("zeroshot", "target", "T2"),
        ("zeroshot", "average", "")]
    assert protocol_report.read_transfer(tmp_path) == xd


def test_combined_sections_with_published_averages(tmp_path):
    rows = base_new_rows(_base_new_records(np.random.default_rng(4)))
    for d in ("A", "B"):
        (tmp_path / d).mkdir()
        protocol_report.write_base_new(tmp_path / d, [r for r in rows if r.dataset == d], {"base": [], "new": []})
    text, payload = protocol_report.combined([tmp_path / "A", tmp_path / "B"])
    assert "average over 2 dataset(s)" in text and "CoCoOp | 80.47 | 71.69 | 75.83" in text
    assert len(payload["base_to_new"]["rows"]) == 6 and len(payload["base_to_new"]["average"]) == 3
    assert protocol_report.combined([tmp_path / "nothing"]) == ("", {})


def test_damaged_protocol_file_is_one_error(tmp_path):
    (tmp_path / "base_to_new.json").write_text('{"schema_version": 99}')
    with pytest.raises(Exception, match="schema version 1"):
        protocol_report.read_base_new(tmp_path)


def test_damaged_published_file_is_one_error(tmp_path):
    from data.errors import DataError

    bad = json.loads(PUBLISHED.read_text())
    bad["base_to_new"][0]["source"] = "nowhere"
    path = tmp_path / "published.json"
    path.write_text(json.dumps(bad))
    with pytest.raises(DataError, match="row 0 is not an object"):
        load_published(path)
    path.write_text("{")
    with pytest.raises(DataError, match="cannot read it"):
        load_published(path)
