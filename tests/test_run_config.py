"""RunConfig and the typed records of a run folder: JSON round trips, and the method order defined once."""
from __future__ import annotations

import json

import pytest

from train_jax.errors import TrainError
from train_jax.methods import METHODS
from train_jax.records import SummaryRow, method_rank, read_summary
from train_jax.run_config import RunConfig


def test_run_config_json_round_trip() -> None:
    config = RunConfig(cache="a.h5", eval_caches=("b.h5",), shots=(4, 1, 4), seeds=(2, 1, 2), methods=("cmm",),
                       grid={"lr": (0.01, 0.001), "use_aug": (True,)}, select="mean", memory_gb=1.5)
    data = json.loads(json.dumps(config.to_json()))
    assert RunConfig.from_json(data) == config
    assert config.shot_list == [1, 4] and config.seed_list == [2, 1] and config.budget == int(1.5 * 2**30)
    assert RunConfig("a.h5").settings_grid and RunConfig("a.h5").to_json()["grid"] is None


def test_summary_row_round_trip_keeps_key_order() -> None:
    row = {"dataset": "D", "method": "cmm", "shots": 2, "seeds": [1, 2], "failed_seeds": [], "failed_runs": 0,
           "settings": ["-", "-"], "tie_breaks": [None, "score"], "select": "seed", "notes": [],
           "shift": {"S": {"mean": 1.0, "std": 0.0}}, "test_mean": 50.0, "test_std": 1.0, "val_mean": 40.0,
           "loss_mean": [1.0, None], "loss_std": [0.0, None], "loss_still_falling": False,
           "loss_parts_mean": {"ce": [1.0, None]}}
    assert json.dumps(SummaryRow.from_json(row).to_json()) == json.dumps(row)
    failed = {k: row[k] for k in list(row)[:11]}
    assert json.dumps(SummaryRow.from_json(failed).to_json()) == json.dumps(failed)
    with pytest.raises(TrainError, match="unknown keys"):
        SummaryRow.from_json({**row, "extra": 1})


def test_read_summary_refuses_a_newer_schema(tmp_path) -> None:
    (tmp_path / "results.json").write_text(json.dumps({"schema_version": 999, "summary": []}))
    with pytest.raises(TrainError, match="schema version 999"):
        read_summary(tmp_path)


def test_method_order_is_the_registry_order() -> None:
    assert method_rank(["cmm", "zz", "zeroshot", "aa"]) == [m for m in METHODS if m in ("cmm", "zeroshot")] + [
        "aa", "zz"]
