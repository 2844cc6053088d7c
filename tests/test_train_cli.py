"""`python -m train_jax` end to end on tiny synthetic caches: outputs, reloadable params, shift evaluation,
resuming, clear errors; and the report's combine mode."""

import csv
import json
import shutil
from pathlib import Path

import h5py
import numpy as np
import pytest

from helpers_train import GapWorld, write_gap_cache, write_shift_cache
from data.fewshot import FewClassWarning
from train_jax import report
from train_jax.__main__ import main
from train_jax.methods import predict
from train_jax.records import SCHEMA_VERSION

SHIFT_CLASSES = [4, 0, 2]
ARGS = ["--shots", "1", "2", "--seeds", "1", "2", "--methods", "zeroshot", "linear_probe", "cmm_ce", "cmm",
        "--grid", "lr=1e-2", "alpha=1,2", "epochs=5", "--prompt", "single"]


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("cli")
    world = GapWorld(1, classes=6, dim=16)
    cache = write_gap_cache(tmp / "synth.h5", world, train=4, val=3, test=10)
    shift = write_shift_cache(tmp / "shift.h5", world, SHIFT_CLASSES, test=8)
    shift_all = write_shift_cache(tmp / "shift_all.h5", world, list(range(6)), test=4, dataset="SynthAll")
    out = tmp / "out"
    argv = ["--cache", str(cache), "--eval-cache", str(shift), "--eval-cache", str(shift_all), "--out", str(out),
            *ARGS]
    assert main(argv) == 0
    return world, cache, shift, out, argv


def _results(out: Path) -> dict:
    return json.loads((out / "results.json").read_text())


def test_outputs_written(run):
    _, _, _, out, _ = run
    for name in ("results.json", "results.csv", "results.md", "accuracy_vs_shots.png", "params/1shot.npz",
                 "params/2shot.npz", "run_config.json"):
        assert (out / name).is_file(), name
    assert (out / "accuracy_vs_shots.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    results = _results(out)
    runs = results["runs"]
    # zeroshot 1 setting, linear probe 1 (alpha unused), cmm_ce 2, cmm 2 -> 6 per seed and shots
    assert len(runs) == 6 * 2 * 2
    with open(out / "results.csv") as f:
        rows = list(csv.DictReader(f))
    assert len(rows) == len(runs) and list(rows[0]) == list(report.CSV_FIELDS)
    for key in {(r["method"], r["shots"], r["seed"]) for r in runs}:
        chosen = [r for r in runs if (r["method"], r["shots"], r["seed"]) == key and r["selected"]]
        assert len(chosen) == 1
        best = max(r["val_acc"] for r in runs if (r["method"], r["shots"], r["seed"]) == key)
        assert chosen[0]["val_acc"] == best  # selected on validation
    summary = {(s["method"], s["shots"]): s for s in results["summary"]}
    assert set(summary) == {(m, k) for m in ("zeroshot", "linear_probe", "cmm_ce", "cmm") for k in (1, 2)}
    cmm = [r["test_acc"] for r in runs if r["method"] == "cmm" and r["shots"] == 2 and r["selected"]]
    assert summary["cmm", 2]["test_mean"] == pytest.approx(np.mean(cmm))
    assert summary["cmm", 2]["test_std"] == pytest.approx(np.std(cmm))
    md = (out / "results.md").read_text()
    assert "| cmm |" in md and "2-shot" in md and "Distribution shift" in md
    assert (out / "loss_curves.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    curves = [r["loss_curve"] for r in runs if r["method"] == "cmm" and r["shots"] == 2 and r["selected"]]
    assert all(len(c) == 5 and None not in c for c in curves)  # epochs=5: each epoch's mean training loss
    np.testing.assert_allclose(summary["cmm", 2]["loss_mean"], np.mean(curves, axis=0))
    np.testing.assert_allclose(summary["cmm", 2]["loss_std"], np.std(curves, axis=0), atol=1e-12)
    assert "loss_mean" not in summary["zeroshot", 1] and "loss_mean" not in summary["linear_probe", 1]
    for r in (r for r in runs if r["method"] == "cmm"):  # each epoch's mean loss = mean CE + lam * mean triplet
        parts = r["loss_parts"]
        assert set(parts) == {"ce", "triplet"} and len(parts["ce"]) == len(r["loss_curve"])
        total = np.array(parts["ce"], float) + r["settings"]["lam"] * np.array(parts["triplet"], float)
        np.testing.assert_allclose(total, np.array(r["loss_curve"], float), rtol=1e-5, atol=1e-6)
    assert all(r["loss_parts"] == {} for r in runs if r["method"] == "linear_probe")  # its own trainer: no parts
    assert {"ce", "triplet"} == set(summary["cmm", 2]["loss_parts_mean"])


def test_params_reload_and_reproduce_accuracy(run):
    world, cache, _, out, _ = run
    from data.cache import read_cache

    learned = report.load_params(out / "params" / "2shot.npz")
    assert set(learned) == {f"{m}/seed{s}" for m in ("zeroshot", "linear_probe", "cmm_ce", "cmm") for s in (1, 2)}
    data = read_cache(cache)
    test, text = data.splits["test"], data.prototypes(0)
    for name in ("cmm/seed2", "linear_probe/seed1"):
        item = learned[name]
        method, seed = name.split("/seed")
        preds = np.asarray(predict(method, item.settings, item.params, item.consts, test.features, text,
                                   test.norms))
        record = next(r for r in _results(out)["runs"] if r["method"] == method and r["seed"] == int(seed)
                      and r["shots"] == 2 and r["selected"])
        assert record["settings"] == item.settings.to_dict()
        assert 100.0 * np.mean(preds == test.labels) == pytest.approx(record["test_acc"], abs=1e-9)
    assert not np.all(learned["cmm/seed1"].params["dW"] == 0)


def test_shift_evaluated_on_mapped_class_subset(run):
    world, _, shift, out, _ = run
    from data.cache import read_cache

    test = read_cache(shift).splits["test"]
    zero_shot = np.argmax(test.features @ world.text[SHIFT_CLASSES].T, axis=1)
    expected = 100.0 * np.mean(zero_shot == test.labels)
    for r in _results(out)["runs"]:
        assert set(r["shift"]) == ({"SynthShift", "SynthAll"} if r["selected"] else set())
        if r["method"] == "zeroshot":
            assert r["shift"]["SynthShift"] == pytest.approx(expected)


def test_rerun_resumes_and_config_change_is_refused(run, capsys):
    _, _, _, out, argv = run
    before = (out / "shots" / "2shot.json").read_bytes()
    assert main(argv) == 0
    assert "already in" in capsys.readouterr().out
    assert (out / "shots" / "2shot.json").read_bytes() == before
    changed = [a if a != "alpha=1,2" else "alpha=3" for a in argv]
    assert main(changed) == 2
    assert "different grid" in capsys.readouterr().err


def test_results_carry_the_schema_version_and_old_records_files_resume(run, tmp_path, capsys):
    *_, out, argv = run
    results = _results(out)
    assert results["schema_version"] == SCHEMA_VERSION
    files = [json.loads((out / "shots" / f"{k}shot.json").read_text()) for k in (1, 2)]
    assert all(f["schema_version"] == SCHEMA_VERSION for f in files)
    assert [r for f in files for r in f["records"]] == results["runs"]
    old = tmp_path / "old"
    shutil.copytree(out, old)
    (old / "shots" / "1shot.json").write_text(json.dumps(files[0]["records"]))  # schema 1: a plain list
    assert main([*argv[: argv.index("--out") + 1], str(old), *argv[argv.index("--out") + 2:]]) == 0
    assert _results(old)["runs"] == results["runs"]
    (old / "shots" / "1shot.json").write_text(json.dumps({"schema_version": 99, "records": []}))
    assert main([*argv[: argv.index("--out") + 1], str(old), *argv[argv.index("--out") + 2:]]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("error: ") and "1shot.json" in err[0] and "99" in err[0]


def test_bad_inputs_are_one_line_errors(run, tmp_path, capsys):
    _, cache, _, _, _ = run
    with pytest.warns(FewClassWarning, match="fewer than 5 train images and contribute all they have: 'class 0'"):
        assert main(["--cache", str(cache), "--out", str(tmp_path / "a"), "--shots", "5", "--seeds", "1",
                     "--methods", "zeroshot"]) == 0  # a class smaller than K gives all it has (as Dassl)
    capsys.readouterr()

    old = tmp_path / "old.h5"
    old.write_bytes(Path(cache).read_bytes())
    with h5py.File(old, "r+") as f:
        f.attrs["schema_version"] = 99
    assert main(["--cache", str(old), "--out", str(tmp_path / "b")]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: ") and "schema version 99" in err and err.count("\n") == 1

    assert main(["--cache", str(cache), "--out", str(tmp_path / "c"), "--grid", "lr=fast"]) == 2
    assert "lr='fast'" in capsys.readouterr().err


def test_diverging_runs_are_reported_and_excluded(run, tmp_path, capsys):
    _, cache, _, _, _ = run
    out = tmp_path / "nan"
    argv = ["--cache", str(cache), "--out", str(out), "--shots", "1", "--seeds", "1", "--methods", "cmm",
            "--grid", "lr=1e-2,1e38", "epochs=3"]
    assert main(argv) == 0
    assert "warning: cmm seed 1 (lr=1e+38) stopped at step" in capsys.readouterr().err
    runs = _results(out)["runs"]
    assert [(r["setting"], r["failed"], r["selected"]) for r in runs] == [("lr=0.01", False, True),
                                                                         ("lr=1e+38", True, False)]
    assert "Runs stopped by a non-finite loss: cmm 1-shot: 1" in (out / "results.md").read_text()


def test_results_do_not_depend_on_the_cache_row_order(run, tmp_path):
    from data.cache import read_cache
    from data.cache_writer import write_cache
    from train_jax.config import Settings
    from train_jax.experiment import load_task, run_shots

    _, cache, _, _, _ = run
    data = read_cache(cache)
    rng = np.random.default_rng(0)
    splits = {}
    for name, split in data.splits.items():
        order = rng.permutation(len(split.labels))
        splits[name] = {"features": split.features[order], "labels": split.labels[order], "paths": split.paths[order]}
    shuffled = write_cache(tmp_path / "shuffled.h5", attrs=data.attrs, classnames=data.classnames,
                           templates=data.templates, text_features=data.text_features, splits=splits)
    grid = [Settings(epochs=3, lr=1e-2, batch_size=4)]
    a, b = (run_shots(load_task(path, prompt="single"), 2, [1, 2], ["cmm"], grid, []) for path in (cache, shuffled))
    assert [(r.val_acc, r.test_acc) for r in a.records] == [(r.val_acc, r.test_acc) for r in b.records]
    for key in a.learned:
        np.testing.assert_allclose(a.learned[key].params["dW"], b.learned[key].params["dW"], rtol=1e-5, atol=1e-6)


def test_default_prompt_is_ensemble_for_the_imagenet_family():
    from train_jax.experiment import default_prompt

    assert [default_prompt(d) for d in ("ImageNet", "ImageNetA", "imagenet-sketch", "DTD", "Food101", "ImageNette")] == [
        "ensemble", "ensemble", "ensemble", "single", "single", "single"]


def test_help_lists_options_and_default_grid(capsys):
    with pytest.raises(SystemExit) as e:
        main(["--help"])
    assert e.value.code == 0
    text = capsys.readouterr().out
    for option in ("--cache", "--eval-cache", "--shots", "--seeds", "--methods", "--grid", "--prompt", "--out",
                   "--memory-gb", "--devices", "--select", "Default grid", "log-probability of the true class"):
        assert option in text


def _fake_run_dir(path: Path, dataset: str, acc: dict) -> Path:
    path.mkdir()
    summary = [{"dataset": dataset, "method": m, "shots": k, "test_mean": v, "test_std": 0.5, "seeds": [1],
                "failed_seeds": [], "failed_runs": 0, "settings": ["-"], "shift": {}} for (m, k), v in acc.items()]
    (path / "results.json").write_text(json.dumps({"summary": summary}))
    return path


def _tables(md: str) -> dict[str, dict[str, dict[str, str]]]:
    """Markdown -> {section heading: {first cell: {column: cell}}}."""
    tables: dict[str, dict[str, dict[str, str]]] = {}
    heading, header = "", []
    for line in md.splitlines():
        if line.startswith("#"):
            heading, header = line.lstrip("# ").strip(), []
        elif line.startswith("|") and not line.startswith("|---"):
            cells = [c.strip() for c in line.strip().strip("|").split("|")]
            if not header:
                header = cells
            else:
                tables.setdefault(heading, {})[cells[0]] = dict(zip(header, cells))
    return tables


def test_report_combines_run_dirs(run, tmp_path):
    _, _, _, out, _ = run
    dtd = _fake_run_dir(tmp_path / "dtd", "DTD", {("zeroshot", 1): 40.0, ("cmm", 1): 50.0, ("cmm", 2): 55.0})
    euro = _fake_run_dir(tmp_path / "euro", "EuroSAT", {("zeroshot", 1): 30.0, ("cmm", 1): 70.0})
    assert report.main([str(dtd), str(euro), str(out), "--out", str(tmp_path / "all")]) == 0
    md = (tmp_path / "all" / "summary.md").read_text()
    tables = _tables(md)
    average = tables["Average (2 of 11 datasets)"]
    assert average["zeroshot"] == {"Method": "zeroshot", "1-shot": "35.00", "2-shot": "—"}
    assert average["cmm"] == {"Method": "cmm", "1-shot": "60.00", "2-shot": "—"}  # EuroSAT has no 2-shot result
    one_shot = tables["1-shot"]
    assert list(one_shot["cmm"])[:3] == ["Method", "DTD", "EuroSAT"]  # benchmark order first
    assert one_shot["cmm"]["DTD"] == "50.00 ± 0.50" and one_shot["cmm"]["Average (2 of 11 datasets)"] == "60.00"
    assert tables["2-shot"]["cmm"]["EuroSAT"] == "—" and tables["2-shot"]["cmm"]["DTD"] == "55.00 ± 0.50"
    assert "Synth" in one_shot["cmm"]  # the CLI run's dataset
    assert "SynthShift" in tables["Distribution shift"]["Synth"]  # the CLI run's shift table
    assert (tmp_path / "all" / "accuracy_vs_shots.png").is_file()
    assert report.main([str(tmp_path / "missing"), "--out", str(tmp_path / "x")]) == 2


def test_rerun_with_a_cache_of_another_identity_is_refused(run, tmp_path, capsys):
    world, _, _, _, _ = run
    cache = write_gap_cache(tmp_path / "c.h5", world, train=4, val=3, test=10)
    argv = ["--cache", str(cache), "--out", str(tmp_path / "out"), "--shots", "1", "--seeds", "1", "--methods",
            "zeroshot", "--prompt", "single"]
    assert main(argv) == 0
    moved = tmp_path / "moved.h5"
    cache.rename(moved)  # the same cache elsewhere: still accepted
    assert main([a if a != str(cache) else str(moved) for a in argv]) == 0
    with h5py.File(moved, "r+") as f:  # re-extracted with other weights under the same path
        f.attrs["weights_sha256"] = "0" * 64
    capsys.readouterr()
    assert main([*[a if a != str(cache) else str(moved) for a in argv], "--shots", "1", "2"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: ") and err.count("\n") == 1
    assert "results of a cache made with weights_sha256=''" in err and "use another --out" in err
    assert not (tmp_path / "out" / "shots" / "2shot.json").exists()


def test_out_that_is_a_file_or_read_only_is_one_line(run, tmp_path, capsys):
    _, cache, _, _, _ = run
    (tmp_path / "file").write_text("x")
    assert main(["--cache", str(cache), "--out", str(tmp_path / "file")]) == 2
    err = capsys.readouterr().err
    assert "file: is a file, not a folder" in err and err.count("\n") == 1
    assert main(["--cache", str(cache), "--out", "/proc/no-such-run"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: /proc/no-such-run: cannot write there") and err.count("\n") == 1


def test_logit_scale_defaults_to_the_caches(run, tmp_path):
    _, cache, _, out, _ = run
    assert json.loads((out / "run_config.json").read_text())["logit_scale"] == 100  # the cache records none
    assert "Logit scale: 100 (default; the cache records none)." in (out / "results.md").read_text()
    own = tmp_path / "own.h5"
    own.write_bytes(Path(cache).read_bytes())
    with h5py.File(own, "r+") as f:
        f.attrs["logit_scale"] = 50.0
    small = ["--shots", "1", "--seeds", "1", "--methods", "zeroshot", "cmm", "--grid", "epochs=2", "alpha=1"]
    assert main(["--cache", str(own), "--out", str(tmp_path / "a"), *small]) == 0
    results = _results(tmp_path / "a")
    assert {r["method"] for r in results["runs"]} == {"zeroshot", "cmm"}
    assert {r["settings"]["logit_scale"] for r in results["runs"]} == {50.0}
    assert results["config"]["logit_scale"] == 50 and results["config"]["logit_scale_from"] == "cache"
    assert "Logit scale: 50 (the model's own, recorded in the cache)." in (tmp_path / "a/results.md").read_text()
    assert main(["--cache", str(own), "--out", str(tmp_path / "b"), *small, "s=30"]) == 0
    assert {r["settings"]["logit_scale"] for r in _results(tmp_path / "b")["runs"]} == {30.0}


def _pooled_copy(full: Path, out: Path, seeds: list[int], shots: int) -> Path:
    """`full` rewritten as a pooled cache: every row listed, only the train rows of the seeds' draws encoded."""
    from data.cache import read_cache
    from data.cache_writer import CacheWriter
    from data.fewshot import pool_rows

    data = read_cache(full)
    names = set(data.splits)
    splits = {name: {"paths": s.paths, "labels": s.labels} for name, s in data.splits.items()}
    train = data.splits["train"]
    encode = pool_rows(train.labels, train.paths, data.classnames, seeds, shots, val_from_train="val" not in names)
    splits["train"]["encode"] = encode
    attrs = {**data.attrs, "pool": json.dumps({"seeds": seeds, "shots": shots}),
             "command": json.dumps(["python", "-m", "extract", "run", "--folder", "x", "--pool-seeds", "1",
                                    "--pool-shots", str(shots), "--out", str(out)])}
    writer = CacheWriter.open(out, attrs=attrs, classnames=data.classnames, templates=data.templates, splits=splits,
                              embed_dim=train.features.shape[1], aug_views=train.aug_features.shape[1])
    writer.write_text(data.text_features)
    writer.write_rows("train", encode, train.features[encode], train.aug_features[encode])
    for name in names - {"train"}:
        writer.write_rows(name, np.arange(len(data.splits[name].labels)), data.splits[name].features)
    return writer.finalize()


@pytest.mark.parametrize("val", [3, None])
def test_pooled_cache_gives_the_results_and_params_of_the_full_cache(tmp_path, val, capsys):
    import jax

    from data.cache import ABSENT, open_cache
    from train_jax.config import Settings
    from train_jax.experiment import load_task, run_shots

    world = GapWorld(2, classes=4, dim=16)
    full = write_gap_cache(tmp_path / "full.h5", world, train=12, val=val, test=10, aug_views=2)
    pooled = _pooled_copy(full, tmp_path / "pooled.h5", [1, 2], 4)
    status = open_cache(pooled).listing("train").status
    assert 0 < np.sum(status == ABSENT) < len(status)  # some rows are not encoded
    grid = [Settings(epochs=3, lr=1e-2, batch_size=4), Settings(epochs=3, lr=1e-2, batch_size=4, use_aug=True)]
    for shots in (1, 4):
        a, b = (run_shots(load_task(p, prompt="single"), shots, [1, 2], ["cmm", "linear_probe"], grid, ["use_aug"])
                for p in (full, pooled))
        assert a.records == b.records
        assert a.learned.keys() == b.learned.keys()
        for key in a.learned:
            for x, y in zip(jax.tree.leaves(a.learned[key].params), jax.tree.leaves(b.learned[key].params)):
                np.testing.assert_array_equal(x, y)

    out = tmp_path / "more"
    assert main(["--cache", str(pooled), "--out", str(out), "--shots", "8", "--seeds", "1", "3"]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "8-shot draws of seeds 1 3 need" in err and "not encoded" in err
    assert "`python -m extract run --folder x --out " in err and "--pool-seeds 1 2 3 --pool-shots 8`" in err
    assert not out.exists()


def test_a_drawn_unreadable_image_is_left_out_of_the_sample(run, tmp_path):
    from data.fewshot import sample_shots
    from train_jax.experiment import _sample, load_task

    _, cache, _, _, _ = run
    bad = tmp_path / "bad.h5"
    bad.write_bytes(Path(cache).read_bytes())
    task = load_task(cache, prompt="single")
    train = task.listings["train"]
    drawn = sample_shots(train.labels, train.paths, task.cache.classnames, 2, 1)
    with h5py.File(bad, "r+") as f:  # as if --skip-bad had found it unreadable
        f["splits/train/status"][drawn[0]] = 2
    with pytest.warns(UserWarning, match="1 drawn train images were unreadable at extraction"):
        picks, _, _ = _sample(load_task(bad, prompt="single"), 2, [1])
    assert picks[1].tolist() == drawn[1:].tolist()
