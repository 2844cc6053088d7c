"""Base-to-new and cross-dataset transfer end to end (`python -m train_jax --protocol ...`) on synthetic features
whose modality gap is one shared transformation: every class's images are ``normalise(Q t_y + g + noise)`` with
one rotation Q and one offset g (``helpers_train.GapWorld``), so a map learned on some classes undoes the gap
for any class, while zero-shot CLIP (v . t) stays poor and per-class weights know only the training classes.
Known answers: the learned map beats zero-shot on the new classes and on another dataset's classes; per-class
methods get no new-class accuracy; the accuracies equal numpy transcriptions; a target cache of another model is
refused in one line."""

import json

import jax
import numpy as np
import pytest

from data.cache import read_cache
from data.cache_writer import write_cache
from helpers_train import GapWorld
from train_jax import report
from train_jax.__main__ import main
from train_jax.config import Settings
from train_jax.evaluators import Group, Placement, TargetSet, on_targets
from train_jax.heads import CMMHead
from train_jax.records import load_params
from train_jax.runner import Trained

CLASSES, DIM = 40, 16
BASE = list(range(20))  # ceil(40 / 2) = 20 base classes
ARGS = ["--shots", "4", "--seeds", "1", "2", "--methods", "zeroshot", "linear_probe", "cmm_ce", "cmm",
        "--grid", "lr=1e-2", "epochs=30", "alpha=1", "--prompt", "single"]


def _normalize(x):
    return x / np.linalg.norm(x, axis=-1, keepdims=True)


def _write_classes(path, world, classes, dataset, model="synthetic", train=8, val=4, test=20):
    """A cache of ``world``'s ``classes`` (relabelled 0.. in that order): images of the same transformation."""
    splits = {}
    for name, per_class in (("train", train), ("val", val), ("test", test)):
        feats, labels = world.images(per_class)
        keep = np.isin(labels, classes)
        local = np.searchsorted(classes, labels[keep])
        splits[name] = {"features": feats[keep], "labels": local,
                        "paths": np.array([f"{dataset}/{name}/c{y:03d}/{i:04d}.png" for i, y in enumerate(local)])}
    return write_cache(path, attrs={"dataset": dataset, "model": model, "embed_dim": world.dim},
                       classnames=[f"class {c}" for c in classes], templates=["a photo of a {}."],
                       text_features=world.text[classes][:, None, :], splits=splits)


@pytest.fixture(scope="module")
def base_to_new(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("b2n")
    world = GapWorld(0, classes=CLASSES, dim=DIM, sigma=0.5)
    cache = _write_classes(tmp / "synth.h5", world, np.arange(CLASSES), "Synth")
    out = tmp / "out"
    assert main(["--cache", str(cache), "--protocol", "base-to-new", "--out", str(out), *ARGS]) == 0
    return world, cache, out


@pytest.fixture(scope="module")
def cross(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("xd")
    world = GapWorld(0, classes=CLASSES, dim=DIM, sigma=0.5)
    source = _write_classes(tmp / "a.h5", world, np.arange(20), "SynthA")
    target = _write_classes(tmp / "b.h5", world, np.arange(20, 40), "SynthB")
    out = tmp / "out"
    assert main(["--cache", str(source), "--transfer-to", str(target), "--out", str(out), *ARGS]) == 0
    return world, source, target, out


def _rows(out, stem):
    return {r["method"]: r for r in json.loads((out / f"{stem}.json").read_text())["rows"]}


def test_map_learned_on_base_classes_beats_zero_shot_on_new_classes(base_to_new):
    _, _, out = base_to_new
    rows = _rows(out, "base_to_new")
    zero = rows["zeroshot"]["new"]["mean"]
    for method in ("cmm", "cmm_ce"):
        assert rows[method]["new"]["mean"] > zero + 5, (method, rows[method]["new"], zero)
        assert rows[method]["base"]["mean"] > rows["zeroshot"]["base"]["mean"] + 20
        assert rows[method]["scored_by"] == "map"
    # a per-class method learns the base classes well and has nothing for the new ones
    probe = rows["linear_probe"]
    assert probe["base"]["mean"] > rows["zeroshot"]["base"]["mean"] and probe["new"] is None and probe["hm"] is None
    line = next(x for x in (out / "base_to_new.md").read_text().splitlines() if x.startswith("| linear_probe |"))
    assert "| — | — | — (per-class weights) |" in line
    assert (out / "base_to_new.csv").read_text().count("\n") == 1 + 4
    config = json.loads((out / "run_config.json").read_text())
    assert config["protocol"] == "base-to-new" and config["dataset"] == "Synth"


def test_base_and_new_accuracies_equal_numpy_transcriptions(base_to_new):
    """Base: the selected runs were trained and tested on the 20 base classes only; new: the model applied to the
    new classes' test images with the map and the new classes' prototypes (float64 here; the two may differ on a
    near-tie that BLAS rounding decides, so up to one image)."""
    world, cache, out = base_to_new
    test = read_cache(cache, splits=["test"]).splits["test"]
    feats, labels = _normalize(test.features.astype(np.float64)), test.labels
    base, new = labels < 20, labels >= 20
    text = _normalize(world.text.astype(np.float64))
    runs = json.loads((out / "results.json").read_text())["runs"]
    learned = load_params(out / "params" / "4shot.npz")
    one_image = 100.0 / new.sum() + 1e-9
    for r in (r for r in runs if r["selected"]):
        if r["method"] == "linear_probe":
            assert r["transfer"] == {}
            continue
        model = learned[f"{r['method']}/seed{r['seed']}"]
        s, alpha = model.settings.logit_scale, model.settings.alpha
        dw = np.asarray(model.params["dW"], np.float64) if r["method"] != "zeroshot" else 0.0
        b = np.asarray(model.params["b"], np.float64) if r["method"] != "zeroshot" else 0.0
        if "dT" in model.params:
            assert model.params["dT"].shape == (20, DIM)  # learned offsets of the base classes only

        def acc(rows, protos, offset):
            v = feats[rows]
            mapped = _normalize(v + v @ np.transpose(dw) + b) if r["method"] != "zeroshot" else v
            logits = s * (alpha * mapped @ protos.T + v @ protos.T) if r["method"] != "zeroshot" else v @ protos.T
            return 100.0 * np.mean(np.argmax(logits, 1) == labels[rows] - offset)

        assert abs(r["transfer"]["new"] - acc(new, text[20:], 20)) <= one_image
        if "dT" not in model.params:
            assert abs(r["test_acc"] - acc(base, text[:20], 0)) <= 100.0 / base.sum() + 1e-9


def test_class_free_evaluator_drops_the_learned_prototype_offsets():
    """on_targets of a learn_text model equals the same map with dT removed, on other classes' prototypes."""
    rng = np.random.default_rng(0)
    params = {"dW": 0.1 * rng.normal(size=(2, DIM, DIM)).astype(np.float32),
              "b": 0.1 * rng.normal(size=(2, DIM)).astype(np.float32),
              "dT": rng.normal(size=(2, 5, DIM)).astype(np.float32)}  # 5 training classes
    trained = Trained(params, {}, np.zeros(2, bool), np.full(2, -1), np.zeros(2), np.zeros((2, 0)))
    settings = (Settings(alpha=1.0), Settings(alpha=2.0))
    feats = _normalize(rng.normal(size=(30, DIM))).astype(np.float32)
    text = _normalize(rng.normal(size=(7, DIM))).astype(np.float32)  # 7 other classes
    labels = rng.integers(0, 7, 30)
    got = on_targets(Group(CMMHead(True), trained, settings), [TargetSet("T", feats, labels, text)], Placement())
    for i, st in enumerate(settings):
        v = feats.astype(np.float64)
        mapped = _normalize(v + v @ params["dW"][i].T.astype(np.float64) + params["b"][i])
        logits = st.logit_scale * (st.alpha * mapped @ text.T + v @ text.T)
        assert got["T"][i] == pytest.approx(100.0 * np.mean(np.argmax(logits, 1) == labels), abs=100 / 30 + 1e-9)
    probe = Group(type("PerClass", (), {})(), trained, settings)  # a head without class_free
    assert on_targets(probe, [TargetSet("T", feats, labels, text)], Placement()) == {}
    jax.clear_caches()


def test_cross_dataset_map_transfers_to_another_datasets_classes(cross):
    world, _, target, out = cross
    rows = _rows(out, "cross_dataset")
    zero = rows["zeroshot"]["targets"]["SynthB"]["mean"]
    assert rows["cmm"]["targets"]["SynthB"]["mean"] > zero + 5
    assert rows["cmm"]["average"] == pytest.approx(rows["cmm"]["targets"]["SynthB"]["mean"])
    assert rows["linear_probe"]["targets"] == {"SynthB": None} and rows["linear_probe"]["average"] is None
    test = read_cache(target, splits=["test"]).splits["test"]
    feats = _normalize(test.features.astype(np.float64))
    expect = 100.0 * np.mean(np.argmax(feats @ _normalize(world.text[20:].astype(np.float64)).T, 1) == test.labels)
    assert zero == pytest.approx(expect, abs=100.0 / len(test.labels) + 1e-9)
    md = (out / "cross_dataset.md").read_text()
    assert "| Method | Source accuracy | SynthB | Target average |" in md
    config = json.loads((out / "run_config.json").read_text())
    assert config["protocol"] == "cross-dataset" and len(config["caches"]["transfer_caches"]) == 1


def test_target_cache_of_another_model_is_refused_in_one_line(cross, tmp_path, capsys):
    world, source, _, _ = cross
    other = _write_classes(tmp_path / "other.h5", world, np.arange(20, 40), "SynthB", model="another-model")
    assert main(["--cache", str(source), "--transfer-to", str(other), "--out", str(tmp_path / "o"), *ARGS]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("error: ") and "model='another-model'" in err[0]
    assert not (tmp_path / "o").exists()  # refused before anything is written


@pytest.mark.parametrize("extra", [["--protocol", "cross-dataset"],
                                   ["--protocol", "base-to-new", "--transfer-to", "x.h5"]])
def test_protocol_options_that_do_not_fit_are_one_error(cross, tmp_path, capsys, extra):
    _, source, _, _ = cross
    assert main(["--cache", str(source), *extra, "--out", str(tmp_path / "o"), *ARGS]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "--transfer-to" in err[0]


def test_resuming_with_another_protocol_is_refused(base_to_new, capsys):
    _, cache, out = base_to_new
    assert main(["--cache", str(cache), "--out", str(out), *ARGS]) == 2
    assert "different protocol" in capsys.readouterr().err


def test_report_combines_both_protocols(base_to_new, cross, tmp_path):
    _, _, b2n = base_to_new
    _, _, _, xd = cross
    out = report.combine([b2n, xd], tmp_path / "summary")
    text = (out / "summary.md").read_text()
    assert "## Base-to-new generalisation" in text and "## Cross-dataset transfer from SynthA" in text
    assert "CoCoOp | 80.47 | 71.69 | 75.83" in text and "CoCoOp | 71.02 | 65.74" in text
    data = json.loads((out / "summary.json").read_text())
    assert {r["dataset"] for r in data["summary"]} == {"SynthA"}  # the base-half run is not a few-shot result
    assert len(data["base_to_new"]["rows"]) == 4 and len(data["cross_dataset"]["rows"]) == 4
