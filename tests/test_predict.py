"""`python -m train_jax predict`: CSV content equals the saved models' predictions, foreign caches and bad runs are
refused with one line and no CSV; the run's gap outputs; unlabelled caches; end to end from an image folder."""

import csv
import json
import shutil
from pathlib import Path

import h5py
import numpy as np
import pytest

from data.cache import UNLABELLED, l2_normalize, read_cache
from data.cache_writer import write_cache
from helpers_train import GapWorld, write_gap_cache
from train_jax import report
from train_jax.__main__ import main
from train_jax.experiment import prototypes
from train_jax.methods import logits, predict

ARGS = ["--shots", "1", "2", "--seeds", "1", "2", "--methods", "zeroshot", "linear_probe", "cmm",
        "--grid", "lr=1e-2", "alpha=1,2", "epochs=5", "--prompt", "single"]


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("predict")
    world = GapWorld(2, classes=7, dim=16)
    cache = write_gap_cache(tmp / "synth.h5", world, train=4, val=3, test=6)
    out = tmp / "run"
    assert main(["--cache", str(cache), "--out", str(out), *ARGS]) == 0
    return world, cache, out


def _predict(run_dir: Path, cache: Path, out: Path, *extra: str) -> int:
    return main(["predict", "--run", str(run_dir), "--cache", str(cache), "--out", str(out), *extra])


def _rows(path: Path) -> list[dict]:
    with open(path) as f:
        return list(csv.DictReader(f))


def test_csv_equals_the_selected_models_argmax(run, tmp_path, capsys):
    _, cache, out = run
    data = read_cache(cache)
    test, text, names = data.splits["test"], data.prototypes(0), data.classnames
    learned = report.load_params(out / "params" / "2shot.npz")
    for method, seed in (("cmm", 2), ("linear_probe", 1)):
        item = learned[f"{method}/seed{seed}"]
        expected = np.asarray(predict(method, item.settings, item.params, item.consts, test.features, text,
                                      test.norms))
        assert _predict(out, cache, tmp_path / f"{method}.csv", "--method", method, "--seed", str(seed)) == 0
        rows = _rows(tmp_path / f"{method}.csv")
        assert [r["path"] for r in rows] == list(test.paths)
        assert [r["class_1"] for r in rows] == [names[i] for i in expected]
        assert [r["label"] for r in rows] == [names[i] for i in test.labels]
        assert f"accuracy: {100 * np.mean(expected == test.labels):.2f}%" in capsys.readouterr().out

    assert _predict(out, cache, tmp_path / "ens.csv") == 0  # default: cmm, largest shots, ensemble of seeds
    assert "cmm 2-shot (ensemble of seeds 1, 2)" in capsys.readouterr().out
    mean = np.mean([np.asarray(logits("cmm", learned[f"cmm/seed{s}"].settings, learned[f"cmm/seed{s}"].params,
                                      {}, l2_normalize(test.features), prototypes(data, "single")))
                    for s in (1, 2)], axis=0)
    rows = _rows(tmp_path / "ens.csv")
    order = np.argsort(-mean, axis=1)[:, :5]
    assert [[r[f"class_{k}"] for k in range(1, 6)] for r in rows] == [[names[i] for i in o] for o in order]
    probs = np.array([[float(r[f"prob_{k}"]) for k in range(1, 6)] for r in rows])
    assert np.all(np.diff(probs, axis=1) <= 0) and np.all(probs.sum(axis=1) <= 1 + 1e-5)
    soft = np.exp(mean - mean.max(1, keepdims=True))
    np.testing.assert_allclose(probs[:, 0], (soft / soft.sum(1, keepdims=True)).max(1), atol=1e-6)


def _one_line_error(capsys, *needles: str) -> None:
    err = capsys.readouterr().err
    assert err.startswith("error: ") and err.count("\n") == 1 and "Traceback" not in err, err
    for n in needles:
        assert n in err, err


def test_refuses_a_foreign_cache(run, tmp_path, capsys):
    world, cache, out = run
    other = tmp_path / "other_model.h5"
    shutil.copy(cache, other)
    with h5py.File(other, "r+") as f:
        f.attrs["model"] = "ViT-B-32"
    target = tmp_path / "p.csv"
    assert _predict(out, other, target) == 2
    _one_line_error(capsys, "model='ViT-B-32' differs from the run's 'synthetic'")
    renamed = write_cache(tmp_path / "renamed.h5", attrs={"dataset": "Synth", "model": "synthetic", "embed_dim": 16},
                          classnames=[f"kind {c}" for c in range(7)], templates=list(read_cache(cache).templates),
                          text_features=read_cache(cache).text_features, splits={"test": world.split("test", 2)})
    assert _predict(out, renamed, target) == 2
    _one_line_error(capsys, "class list differ", "--classes-from")
    assert not target.exists() and not list(tmp_path.glob("*.tmp"))


def test_bad_runs_are_one_line_errors_and_leave_no_csv(run, tmp_path, capsys):
    _, cache, out = run
    target = tmp_path / "p.csv"
    assert _predict(tmp_path / "nowhere", cache, target) == 2
    _one_line_error(capsys, "run_config.json", "python -m train_jax --cache")
    bare = tmp_path / "bare"
    bare.mkdir()
    shutil.copy(out / "run_config.json", bare)
    assert _predict(bare, cache, target) == 2
    _one_line_error(capsys, "no saved models")
    assert _predict(out, cache, target, "--shots", "8") == 2
    _one_line_error(capsys, "no 8-shot models (trained: 1, 2)", "--shots 8")
    assert _predict(out, cache, target, "--method", "cmm_ce") == 2
    _one_line_error(capsys, "no cmm_ce models", "--methods cmm_ce")
    assert _predict(out, cache, target, "--seed", "9") == 2
    _one_line_error(capsys, "seed 9")
    assert _predict(out, cache, target, "--split", "extra") == 2
    _one_line_error(capsys, "no split 'extra'")
    assert _predict(out, cache, tmp_path / "missing" / "p.csv") == 2
    _one_line_error(capsys, "cannot write")
    assert not target.exists() and not list(tmp_path.rglob("*.tmp"))


def test_out_replaces_a_file_only_when_asked_and_never_an_input(run, tmp_path, capsys):
    _, cache, out = run
    mine = Path(shutil.copy(cache, tmp_path / "mine.h5"))
    kept = {p: p.read_bytes() for p in (mine, out / "results.json", out / "run_config.json",
                                        out / "params" / "2shot.npz")}
    old = tmp_path / "old.csv"
    old.write_text("keep me\n")
    kept[old] = old.read_bytes()
    for target, extra, needles in (
            (old, (), ("exists", "--overwrite")),
            (out / "results.json", (), ("exists", "--overwrite")),
            (mine, ("--overwrite",), ("--cache",)),  # its own input, even when asked
            (out / "run_config.json", ("--overwrite",), ("input",)),
            (out / "params" / "2shot.npz", ("--overwrite",), ("input",)),
            (tmp_path, (), ("is a folder",))):
        assert _predict(out, mine, target, *extra) == 2, target
        _one_line_error(capsys, str(target), *needles)
    assert {p: p.read_bytes() for p in kept} == kept
    assert _predict(out, mine, old, "--overwrite") == 0
    assert _rows(old)[0]["path"] == read_cache(cache).splits["test"].paths[0]


def test_out_in_a_read_only_folder_is_one_line(run, read_only_dir, capsys):
    _, cache, out = run
    assert _predict(out, cache, read_only_dir / "p.csv") == 2
    _one_line_error(capsys, str(read_only_dir / "p.csv"), "cannot write")


def _unlabelled(path: Path, world: GapWorld, like: Path) -> Path:
    src = read_cache(like)
    feats, _ = world.images(2)
    return write_cache(path, attrs={"dataset": "New", "model": "synthetic", "embed_dim": 16},
                       classnames=src.classnames, templates=src.templates, text_features=src.text_features,
                       splits={"new": {"features": feats, "labels": np.full(len(feats), UNLABELLED),
                                       "paths": np.array([f"new/{i}.png" for i in range(len(feats))])}})


def test_unlabelled_rows_are_classified_but_never_trained_on(run, tmp_path, capsys):
    world, cache, out = run
    new = _unlabelled(tmp_path / "new.h5", world, cache)
    assert not read_cache(new).splits["new"].labelled
    assert _predict(out, new, tmp_path / "p.csv", "--shots", "1") == 0
    printed = capsys.readouterr().out
    assert "accuracy" not in printed and "cmm 1-shot" in printed
    rows = _rows(tmp_path / "p.csv")
    assert len(rows) == 14 and all(r["label"] == "" for r in rows)
    assert main(["--cache", str(new), "--out", str(tmp_path / "r"), "--shots", "1"]) == 2
    _one_line_error(capsys, "no 'train' rows")
    with h5py.File(new, "r+") as f:
        f.move("splits/new", "splits/train")
        f.copy("splits/train", "splits/test")
    assert main(["--cache", str(new), "--out", str(tmp_path / "r"), "--shots", "1"]) == 2
    _one_line_error(capsys, "holds unlabelled images (label -1)", "train_jax predict")


def test_mixed_labels_are_refused_by_the_reader(run, tmp_path):
    world, cache, _ = run
    bad = tmp_path / "mixed.h5"
    shutil.copy(cache, bad)
    with h5py.File(bad, "r+") as f:
        f["splits/test/labels"][0] = UNLABELLED
    from data.cache import CacheError

    with pytest.raises(CacheError, match="labels outside"):
        read_cache(bad)


def test_run_writes_the_gap_table_figure_and_summary_line(run, tmp_path):
    _, _, out = run
    gap = json.loads((out / "gap.json").read_text())
    assert [(r["method"], r["shots"], r["seeds"]) for r in gap["after"]] == [("cmm", 1, [1, 2]), ("cmm", 2, [1, 2])]
    assert "| CLIP (before) |" in (out / "gap.md").read_text()
    assert (out / "gap.png").read_bytes()[:4] == b"\x89PNG"
    config = json.loads((out / "run_config.json").read_text())
    assert config["identity"]["model"] == "synthetic" and len(config["identity"]["classnames_sha256"]) == 64
    report.combine([out], tmp_path / "results")
    assert "Modality gap on test (cmm 2-shot; mean over 1 dataset(s)" in (tmp_path / "results" / "summary.md").read_text()


def test_end_to_end_from_an_image_folder(tmp_path, capsys):
    """Extract a labelled folder with the tiny model, train, extract a folder of new images unlabelled with the
    training cache's classes, predict; a cache of another class list is refused."""
    from extract.__main__ import main as extract
    from helpers_extract import TINY, make_class_folder, make_images

    tiny = ["--model", TINY, "--pretrained", "random", "--workers", "0", "--no-progress"]
    folder = make_class_folder(tmp_path / "imgs", per_class=6)
    train = tmp_path / "train.h5"
    assert extract(["run", "--folder", str(folder), "--split-ratio", "0.5,0.17,0.33", *tiny, "--out", str(train)]) == 0
    run_dir = tmp_path / "run"
    assert main(["--cache", str(train), "--out", str(run_dir), "--shots", "1", "--seeds", "1", "2",
                 "--methods", "cmm", "--grid", "epochs=2"]) == 0
    make_images(tmp_path / "new" / "a", 3, seed=7)
    make_images(tmp_path / "new", 2, seed=8)
    new = tmp_path / "new.h5"
    assert extract(["run", "--folder", str(tmp_path / "new"), "--unlabelled", "--classes-from", str(train), *tiny,
                    "--out", str(new)]) == 0
    cache = read_cache(new)
    assert list(cache.splits) == ["test"] and set(cache.splits["test"].labels) == {UNLABELLED}
    assert cache.templates == read_cache(train).templates
    np.testing.assert_allclose(cache.text_features, read_cache(train).text_features, atol=1e-6)
    preds = tmp_path / "preds.csv"
    assert _predict(run_dir, new, preds) == 0
    rows = _rows(preds)
    assert [r["path"] for r in rows] == ["a/img00.png", "a/img01.png", "a/img02.png", "img00.png", "img01.png"]
    assert all(r["class_1"] in ("cat", "dog", "red fox") and r["prob_3"] for r in rows) and "class_4" not in rows[0]

    names = tmp_path / "names.txt"
    names.write_text("cat\ndog\nwolf\n")
    other = tmp_path / "other.h5"
    assert extract(["run", "--folder", str(tmp_path / "new"), "--unlabelled", "--classnames", str(names), *tiny,
                    "--out", str(other)]) == 0
    capsys.readouterr()
    assert _predict(run_dir, other, tmp_path / "other.csv") == 2
    _one_line_error(capsys, "class list differ")
    (tmp_path / "empty").mkdir()
    assert extract(["run", "--folder", str(tmp_path / "empty"), "--unlabelled", "--classes-from", str(train), *tiny,
                    "--out", str(tmp_path / "e.h5")]) == 2
    _one_line_error(capsys, "holds no image")
    assert extract(["run", "--folder", str(tmp_path / "new"), "--unlabelled", *tiny, "--out", str(other)]) == 2
    _one_line_error(capsys, "--classes-from TRAIN.h5")
