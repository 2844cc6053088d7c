"""Learned prototypes chosen by validation: the default grid searches learn_text (and use_aug where the cache has
views), the default methods add Tip-Adapter-F where it has views, and the results count the seeds that chose each."""

import json

import pytest

from helpers_train import GapWorld, write_gap_cache
from train_jax import choices, config
from train_jax.__main__ import main
from train_jax.config import Settings
from train_jax.methods import DEFAULT_METHODS, METHODS, default_methods
from train_jax.records import RunRecord


def test_default_grid_and_methods_follow_the_cache():
    assert config.DEFAULT_GRID["learn_text"] == (False, True)
    assert "use_aug" not in config.default_grid(False) and config.default_grid(True)["use_aug"] == (False, True)
    assert default_methods(False) == [m for m in METHODS if m in DEFAULT_METHODS]
    assert default_methods(True) == [m for m in METHODS if m in DEFAULT_METHODS or m == "tip_adapter_f"]
    assert "tip_adapter_f" not in DEFAULT_METHODS  # its recipe needs the views
    settings = config.expand_grid(config.default_grid(True))
    # learn_text and use_aug reach CMM and its CE-only ablation, not the methods that ignore them
    for name, runs in (("cmm", 48), ("cmm_ce", 24), ("zeroshot", 1), ("linear_probe", 25)):
        assert len(METHODS[name].settings(settings)) == runs, name


def _record(seed, learn_text, use_aug, selected, method="cmm", shots=2, dataset="Toy"):
    return RunRecord(dataset=dataset, shots=shots, method=method, seed=seed, setting="-",
                     settings=Settings(learn_text=learn_text, use_aug=use_aug), val_acc=50.0, val_score=-1.0,
                     test_acc=50.0, failed=False, fail_step=None, final_loss=1.0, selected=selected, tie_break=None,
                     shift={})


def test_chosen_on_counts_seeds_of_searched_settings_only():
    runs = [_record(seed, lt, False, selected=(lt == (seed == 2))) for seed in (1, 2, 3) for lt in (False, True)]
    assert choices.chosen_on(runs) == {"learn_text": (2,)}  # use_aug was not searched: not reported
    summary = [{"dataset": "Toy", "method": "cmm", "shots": 2, "seeds": [1, 2, 3], "chose": {"learn_text": [2]}},
               {"dataset": "Toy", "method": "cmm", "shots": 4, "seeds": [1, 2, 3], "chose": {"learn_text": []}},
               {"dataset": "Other", "method": "cmm", "shots": 2, "seeds": [1, 2, 3], "chose": {"learn_text": [1, 3]}}]
    text = choices.markdown(summary)
    assert "| cmm | learned prototypes (learn_text=1) | 3/6 | 0/3 |" in text and "summed over 2 datasets" in text
    assert choices.markdown([{k: v for k, v in summary[0].items() if k != "chose"}]) == ""


@pytest.fixture
def small_default_grid(monkeypatch):
    """The default grid's learn_text axis with one setting otherwise, so a default run stays seconds long."""
    monkeypatch.setattr(config, "DEFAULT_GRID", {"epochs": (3,), "lr": (1e-2,), "learn_text": (False, True),
                                                 "c": (1.0,)})


def test_default_run_searches_learned_prototypes_and_views(tmp_path, small_default_grid):
    cache = write_gap_cache(tmp_path / "c.h5", GapWorld(0, classes=4, dim=16), train=4, val=2, test=5, aug_views=2)
    out = tmp_path / "run"
    assert main(["--cache", str(cache), "--out", str(out), "--shots", "1", "2", "--seeds", "1", "2",
                 "--prompt", "single"]) == 0
    run_config = json.loads((out / "run_config.json").read_text())
    assert run_config["grid"]["learn_text"] == [False, True] and run_config["grid"]["use_aug"] == [False, True]
    assert run_config["methods"] == default_methods(True)
    results = json.loads((out / "results.json").read_text())
    for row in results["summary"]:
        if row["method"] in ("cmm", "cmm_ce"):
            chosen = [r for r in results["runs"] if r["selected"] and
                      (r["method"], r["shots"]) == (row["method"], row["shots"])]
            assert row["chose"]["learn_text"] == sorted(r["seed"] for r in chosen if r["settings"]["learn_text"])
            assert set(row["chose"]) == {"learn_text", "use_aug"}
        else:
            assert "chose" not in row  # the peers run their own recipes; zeroshot and the probe search neither
    md = (out / "results.md").read_text()
    assert "## Chosen on validation" in md and "| cmm | learned prototypes (learn_text=1) |" in md
    assert "| cmm_ce | augmented views (use_aug=1) |" in md


def test_given_methods_are_kept_on_a_cache_with_views(tmp_path):
    cache = write_gap_cache(tmp_path / "c.h5", GapWorld(0, classes=3, dim=8), train=2, val=1, test=2, aug_views=2)
    out = tmp_path / "run"
    assert main(["--cache", str(cache), "--out", str(out), "--shots", "1", "--seeds", "1", "--methods", "zeroshot",
                 "linear_probe", "cmm_ce", "cmm", "tip_adapter", "gda", "--grid", "epochs=1", "--prompt", "single"]) == 0
    assert "tip_adapter_f" not in json.loads((out / "run_config.json").read_text())["methods"]


def test_run_config_defaults_follow_the_cache():
    from train_jax.methods import REAL_RUN_METHODS
    from train_jax.run_config import RunConfig

    asked = RunConfig("a.h5")
    assert asked.methods is None and asked.grid is None
    assert RunConfig.from_json(json.loads(json.dumps(asked.to_json()))) == asked
    assert asked.methods_for(True) == default_methods(True) and "tip_adapter_f" in asked.methods_for(True)
    assert asked.grid_for(True) == config.default_grid(True) and "use_aug" not in asked.grid_for(False)
    given = RunConfig("a.h5", methods=("cmm",), grid={"lr": (0.1,)})
    assert given.methods_for(True) == ["cmm"] and given.grid_for(True) == {"lr": (0.1,)}
    real = default_methods(True, real_run=True)
    assert set(real) == set(REAL_RUN_METHODS) | {"tip_adapter_f"} and real == [m for m in METHODS if m in real]
