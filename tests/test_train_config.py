"""Settings, grids parsed from CLI strings, JSON round trips."""

import re

import pytest

from train_jax.config import DEFAULT_GRID, Settings, expand_grid, grid_from_json, grid_to_json, parse_grid
from train_jax.errors import TrainError


def test_parse_grid_and_expand():
    grid = parse_grid(["lr=1e-3,1e-4", "lambda=0,1", "learn_text=0,1", "epochs=5"])
    assert grid == {"lr": (1e-3, 1e-4), "lam": (0.0, 1.0), "learn_text": (False, True), "epochs": (5,)}
    settings = expand_grid(grid)
    assert len(settings) == 8
    assert settings[0] == Settings(lr=1e-3, lam=0.0, learn_text=False, epochs=5)
    assert settings[-1] == Settings(lr=1e-4, lam=1.0, learn_text=True, epochs=5)
    assert [s.lr for s in settings[:4]] == [1e-3] * 4  # first key varies slowest
    assert settings[1].label(["lr", "lam"]) == "lr=0.001 lambda=0"


@pytest.mark.parametrize("spec, fragment", [
    (["foo=1"], "unknown setting 'foo'"),
    (["lr"], "KEY=V1,V2"),
    (["lr=abc"], "lr='abc'"),
    (["epochs=1.5"], "epochs='1.5'"),
    (["lr=1", "lr=2"], "given twice"),
    (["lr=-1"], "lr=-1.0 is out of range"),
    (["use_aug=maybe"], "use_aug"),
    (["epochs=1e400"], "epochs='1e400'"),  # found by tests/test_cli_property.py: int(inf) overflowed
])
def test_bad_grid_is_a_clear_error(spec, fragment):
    with pytest.raises(TrainError, match=None) as err:
        expand_grid(parse_grid(spec))
    assert fragment in str(err.value)


def test_json_round_trips():
    s = Settings(lr=0.01, alpha=2.0, learn_text=True, epochs=7)
    assert Settings.from_dict(s.to_dict()) == s
    assert grid_from_json(grid_to_json(DEFAULT_GRID)) == DEFAULT_GRID
    with pytest.raises(TrainError, match="unknown setting"):
        Settings.from_dict({"nope": 1})


@pytest.mark.parametrize("spec, fragment", [
    ("epochs=1e9", "epochs=1000000000 is out of range (0 to 10000)"),
    ("margin=inf", "margin=inf is not a finite number"),
    ("margin=3", "margin=3.0 is out of range (0 to 2, a cosine distance)"),
    ("alpha=nan", "alpha=nan is not a finite number"),
    ("s=inf", "logit_scale=inf is not a finite number"),
])
def test_settings_no_run_can_finish_are_refused(spec, fragment):
    with pytest.raises(TrainError, match=re.escape(fragment)):
        expand_grid(parse_grid([spec]))


def test_each_setting_is_described_once_and_everything_derives_from_it():
    """Kind, aliases, help and label name live in the field's metadata; the runner's arrays, the grid parser and
    --help are derived from it."""
    import dataclasses

    from train_jax.config import ALIASES, DYNAMIC_FIELDS, FIELDS, grid_keys_help, parse_grid

    assert set(FIELDS) == {f.name for f in dataclasses.fields(Settings)}
    assert all(f.metadata["kind"] in ("run", "program") and f.metadata["help"] for f in FIELDS.values())
    assert "batch_size" not in DYNAMIC_FIELDS and "lr" in DYNAMIC_FIELDS
    assert ALIASES["lambda"] == "lam" and ALIASES["wd"] == "weight_decay"
    assert parse_grid(["lambda=1,2"]) == {"lam": (1.0, 2.0)}
    assert Settings(lam=2.0).label(["lam"]) == "lambda=2"
    assert all(name in grid_keys_help() for name in FIELDS)
