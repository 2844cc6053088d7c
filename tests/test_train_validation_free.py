"""`--select none`, the validation-free protocol: each method runs once per seed at its fixed default
(``methods.Method.fixed``), no validation row is ever read (a cache whose val split is absent or poisoned gives the
same results), and every table and record says the run is validation-free."""

import csv
import dataclasses
import json
from pathlib import Path

import jax
import numpy as np
import pytest

from data.cache import CacheReader
from data.cache_writer import write_cache
from helpers_train import GapWorld
from train_jax import baselines, report
from train_jax.__main__ import main
from train_jax.config import Settings
from train_jax.experiment import train_and_evaluate
from train_jax.methods import METHODS
from train_jax.records import CSV_FIELDS, load_params
from train_jax.run_config import RunConfig

CLASSES = 5
METHOD_NAMES = tuple(METHODS)
ARGS = ["--shots", "1", "2", "--seeds", "1", "2", "--methods", *METHOD_NAMES, "--prompt", "single",
        "--grid", "epochs=4", "--select", "none"]


def _splits(world: GapWorld) -> dict:
    return {"train": world.split("train", 6, aug_views=2), "test": world.split("test", 10),
            "val": world.split("val", 4)}


def _write(path: Path, world: GapWorld, splits: dict) -> Path:
    return write_cache(path, attrs={"dataset": "Synth", "model": "synthetic", "embed_dim": world.dim},
                       classnames=[f"class {c}" for c in range(world.classes)], templates=["a photo of a {}."],
                       text_features=world.text[:, None], splits=splits)


@pytest.fixture(scope="module")
def caches(tmp_path_factory):
    """The same train and test rows three times: with a val split, with a poisoned one (other features, wrong
    labels), and without one."""
    tmp = tmp_path_factory.mktemp("vfree")
    world = GapWorld(3, classes=CLASSES, dim=16)
    splits = _splits(world)
    val = splits["val"]
    poisoned = {**val, "features": GapWorld(9, classes=CLASSES, dim=16).images(4)[0],
                "labels": (val["labels"] + 1) % CLASSES}
    return {"clean": _write(tmp / "clean.h5", world, splits),
            "poisoned": _write(tmp / "poisoned.h5", world, {**splits, "val": poisoned}),
            "absent": _write(tmp / "absent.h5", world, {k: v for k, v in splits.items() if k != "val"})}


@pytest.fixture(scope="module")
def runs(caches, tmp_path_factory):
    out = {}
    for name, cache in caches.items():
        folder = tmp_path_factory.mktemp(f"run-{name}")
        assert main(["--cache", str(cache), "--out", str(folder), *ARGS]) == 0
        out[name] = folder
    return out


def _results(folder: Path) -> dict:
    return json.loads((folder / "results.json").read_text())


def test_one_run_per_method_and_seed_at_its_fixed_default(runs):
    results = _results(runs["clean"])
    scale = results["config"]["logit_scale"]
    assert len(results["runs"]) == len(METHOD_NAMES) * 2 * 2  # methods x seeds x shot counts
    for r in results["runs"]:
        assert r["selected"] and r["tie_break"] is None and r["val_acc"] is None and r["val_score"] is None
        settings = Settings.from_dict(r["settings"])
        rec = baselines.recipe("Synth")
        if r["method"] == "tip_adapter_f":  # its recipe's init beta and alpha (no search), its own epochs
            assert (settings.beta, settings.alpha, settings.epochs) == (1.0, rec.init_alpha, rec.epochs)
            continue
        if r["method"] == "tip_adapter":  # upstream's init beta and alpha, which it evaluates before searching
            assert (settings.beta, settings.alpha) == (1.0, rec.init_alpha)
            continue
        method = METHODS[r["method"]]
        expected = method.fixed_setting(Settings(logit_scale=scale, epochs=4), ["epochs"])
        if method.fit is None:
            assert settings == expected
        else:  # an own trainer sets its recipe's fields too (e.g. use_aug where the cache has views)
            assert {k: getattr(settings, k) for k in method.fixed} == dict(method.fixed)
    cmm = next(r for r in results["runs"] if r["method"] == "cmm")
    assert cmm["setting"] == Settings(**METHODS["cmm"].fixed).label(list(METHODS["cmm"].fixed))


def test_no_validation_row_is_read(caches, tmp_path, monkeypatch):
    read = CacheReader.read

    def no_val(self, split, rows, **kwargs):
        assert split != "val", "a validation-free run read validation rows"
        return read(self, split, rows, **kwargs)

    monkeypatch.setattr(CacheReader, "read", no_val)
    config = RunConfig(cache=str(caches["clean"]), shots=(2,), seeds=(1,), methods=METHOD_NAMES, select="none",
                       grid={"epochs": (2,)}, prompt="single")
    done = train_and_evaluate(config, tmp_path / "out", say=lambda _: None)
    assert {r.method for r in done.records} == set(METHOD_NAMES)
    with pytest.raises(AssertionError, match="read validation rows"):  # the spy does catch a validated run
        train_and_evaluate(dataclasses.replace(config, select="seed"), tmp_path / "other", say=lambda _: None)


def test_absent_or_poisoned_val_split_gives_the_same_results(runs):
    clean = _results(runs["clean"])
    for name in ("poisoned", "absent"):
        other = _results(runs[name])  # the same inputs through the same compiled programs: equal bit for bit
        assert other["runs"] == clean["runs"], name
        assert other["summary"] == clean["summary"], name
        assert (runs[name] / "results.md").read_text() == (runs["clean"] / "results.md").read_text()
        for k in (1, 2):
            a, b = load_params(runs["clean"] / f"params/{k}shot.npz"), load_params(runs[name] / f"params/{k}shot.npz")
            assert a.keys() == b.keys()
            for key in a:
                assert a[key].settings == b[key].settings
                jax.tree.map(np.testing.assert_array_equal, (a[key].params, a[key].consts),
                             (b[key].params, b[key].consts))


def test_validated_runs_do_see_the_poison(caches, tmp_path):
    """The same comparison with selection on validation: the poisoned val split changes what is chosen (so the
    test above would notice a validation-free run that read it)."""
    argv = ["--shots", "2", "--seeds", "1", "2", "--methods", "cmm", "--prompt", "single", "--grid", "epochs=4",
            "lr=1e-2,1e-3", "alpha=0.5,2"]
    for name in ("clean", "poisoned"):
        assert main(["--cache", str(caches[name]), "--out", str(tmp_path / name), *argv]) == 0
    clean, poisoned = _results(tmp_path / "clean"), _results(tmp_path / "poisoned")
    assert [r["val_acc"] for r in clean["runs"]] != [r["val_acc"] for r in poisoned["runs"]]


def test_tables_and_records_say_validation_free(runs, tmp_path, capsys):
    folder = runs["clean"]
    md = (folder / "results.md").read_text()
    assert "VALIDATION-FREE" in md.splitlines()[0]
    assert "Validation-free (--select none): no validation rows were read" in md
    assert f"cmm at {Settings(**METHODS['cmm'].fixed).label(list(METHODS['cmm'].fixed))}" in md
    results = _results(folder)
    assert results["config"]["select"] == "none"
    assert {row["select"] for row in results["summary"]} == {"none"}
    assert all("val_mean" not in row for row in results["summary"])
    with open(folder / "results.csv") as f:
        rows = list(csv.DictReader(f))
    assert list(rows[0]) == list(CSV_FIELDS)
    assert {(row["select"], row["val_acc"], row["val_score"], row["selected"]) for row in rows} == {
        ("none", "", "", "True")}
    assert report.main([str(folder), "--out", str(tmp_path / "summary")]) == 0
    assert "VALIDATION-FREE" in (tmp_path / "summary" / "summary.md").read_text().splitlines()[0]
    # a validation-free dataset beside a validated one: the combined table names it
    validated = tmp_path / "validated"
    assert main(["--cache", str(_write_other(tmp_path)), "--out", str(validated), "--shots", "1", "--seeds", "1",
                 "--methods", "zeroshot", "--prompt", "single"]) == 0
    assert report.main([str(folder), str(validated), "--out", str(tmp_path / "mixed")]) == 0
    first = (tmp_path / "mixed" / "summary.md").read_text().splitlines()[0]
    assert "MIXED PROTOCOLS: validation-free (fixed defaults) for Synth;" in first


def _write_other(tmp_path: Path) -> Path:
    world = GapWorld(4, classes=CLASSES, dim=16)
    return write_cache(tmp_path / "other.h5", attrs={"dataset": "Other", "model": "synthetic", "embed_dim": 16},
                       classnames=[f"class {c}" for c in range(CLASSES)], templates=["a photo of a {}."],
                       text_features=world.text[:, None], splits=_splits(world))


def test_grid_values_override_fixed_defaults_and_several_are_refused(caches, tmp_path, capsys):
    out = tmp_path / "one"
    assert main(["--cache", str(caches["clean"]), "--out", str(out), "--shots", "1", "--seeds", "1", "--methods",
                 "cmm", "linear_probe", "--select", "none", "--grid", "lr=3e-3", "C=10", "epochs=2"]) == 0
    by_method = {r["method"]: Settings.from_dict(r["settings"]) for r in _results(out)["runs"]}
    assert (by_method["cmm"].lr, by_method["cmm"].epochs, by_method["linear_probe"].c) == (3e-3, 2, 10.0)
    assert by_method["cmm"].alpha == METHODS["cmm"].fixed["alpha"]  # the fields the grid does not give stay fixed
    capsys.readouterr()
    assert main(["--cache", str(caches["clean"]), "--out", str(tmp_path / "two"), "--shots", "1", "--select",
                 "none", "--grid", "lr=1e-2,1e-3"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: --select none") and "lr" in err and len(err.strip().splitlines()) == 1
    assert not (tmp_path / "two").exists()


def test_fixed_setting_applies_forced_and_resets_unused():
    base = Settings(lr=0.5, beta=3.0, logit_scale=50.0)
    assert METHODS["zeroshot"].fixed_setting(base) == Settings(logit_scale=50.0, epochs=0)
    probe = METHODS["linear_probe"].fixed_setting(base)
    assert probe == Settings(c=METHODS["linear_probe"].fixed["c"])
    cmm = METHODS["cmm"].fixed_setting(base, given=["lr"])
    assert cmm == Settings(**{**METHODS["cmm"].fixed, "lr": 0.5, "logit_scale": 50.0})
    assert all(not set(m.fixed) & set(m.forced) for m in METHODS.values())  # forced fields are not its to fix
    gda = METHODS["gda"].fixed_setting(base, given=["alpha"])  # gda's alpha is not a grid setting of its own
    assert gda.alpha == METHODS["gda"].fixed["alpha"] and gda.logit_scale == 100.0
    xm = METHODS["cross_modal_lp"].fixed_setting(base, given=["lr"])  # its own grid: the user's does not apply
    assert (xm.lr, xm.weight_decay, xm.batch_size) == (1e-3, 0.0, 8)


def test_fixed_defaults_study_ranks_and_runs(capsys):
    from bench import fixed_defaults

    np.testing.assert_array_equal(fixed_defaults.ranks(np.array([50.0, 70.0, 50.0, 60.0])), [3.5, 1.0, 3.5, 2.0])
    assert fixed_defaults.main(["--worlds", "1", "--shots", "1", "--seeds", "1", "--dim", "8"]) == 0
    out = capsys.readouterr().out.strip().splitlines()
    assert out[-1].startswith("fixed defaults (best mean rank): cmm_ce lr=") and "; cmm lr=" in out[-1]
