"""Selection on validation: the tie-break rule (accuracy, then validation score, then grid order), the mean over
seeds, the runner's validation score, and `python -m train_jax` giving the same tables for a reversed grid."""

import csv
import json
from pathlib import Path

import jax
import numpy as np
import pytest

from helpers_train import GapWorld, write_gap_cache
from train_jax import report
from train_jax.__main__ import main
from train_jax.config import Settings
from train_jax.evaluate import select_best
from train_jax.methods import CMMHead
from train_jax.runner import Pool, hparam_arrays, predict_runs, score_runs, target_log_prob, train_runs


def _acc(hits, n=6):
    return 100.0 * np.asarray(hits, np.float64) / n


def test_tie_on_accuracy_goes_to_the_better_score():
    acc, score = np.array([50.0, 80.0, 80.0, 60.0]), np.array([0.0, -2.0, -1.0, 0.0])
    choice = select_best(acc, score, np.zeros(4, bool))
    assert (choice.index, choice.tie_break) == (2, "score")
    # the same runs listed in reverse order: the same run wins
    choice = select_best(acc[::-1], score[::-1], np.zeros(4, bool))
    assert (choice.index, choice.tie_break) == (1, "score")
    # a NaN score loses the tie-break
    assert select_best(np.array([80.0, 80.0]), np.array([np.nan, -5.0]), np.zeros(2, bool)).index == 1


def test_grid_order_only_when_accuracy_and_score_both_tie():
    choice = select_best(np.array([70.0, 80.0, 80.0, 80.0]), np.array([0.0, -1.0, -1.0, -1.5]), np.zeros(4, bool))
    assert (choice.index, choice.tie_break) == (1, "order")
    choice = select_best(np.array([70.0, 90.0, 80.0]), np.array([0.0, -9.0, -1.0]), np.zeros(3, bool))
    assert (choice.index, choice.tie_break) == (1, None)


def test_failed_runs_are_never_selected():
    choice = select_best(np.array([90.0, 80.0, 80.0]), np.array([0.0, -2.0, -1.0]), np.array([True, False, False]))
    assert (choice.index, choice.tie_break) == (2, "score")
    assert select_best(np.array([90.0, 80.0]), np.array([0.0, -1.0]), np.array([True, True])).index is None


def test_mean_over_seeds():
    # settings x seeds; 0 + 5 and 1 + 4 hits of 6 are equal means although their float sums differ in the last bit
    acc = np.stack([_acc([0, 5]), _acc([1, 4]), _acc([3, 1])])
    assert np.sum(acc[0]) != np.sum(acc[1])
    score = np.array([[-1.0, -3.0], [-2.0, -1.0], [0.0, 0.0]])
    choice = select_best(acc, score, np.zeros((3, 2), bool))
    assert (choice.index, choice.tie_break) == (1, "score")  # mean score -1.5 beats -2
    # a setting that failed for a seed ranks after those that did not, whatever its mean over the other seeds
    failed = np.array([[False, False], [False, False], [True, False]])
    choice = select_best(np.stack([_acc([2, 2]), _acc([3, 2]), _acc([0, 6])]), score, failed)
    assert (choice.index, choice.tie_break) == (1, None)
    # one seed is the [R] case
    one = select_best(acc[:, :1], score[:, :1], np.zeros((3, 1), bool))
    assert one == select_best(acc[:, 0], score[:, 0], np.zeros(3, bool))


def _log_prob64(logits: np.ndarray, targets: np.ndarray) -> np.ndarray:
    """Reference in float64: log softmax(logits)[target] per row."""
    x = logits.astype(np.float64)
    m = x.max(axis=1, keepdims=True)
    return x[np.arange(len(x)), targets] - (m[:, 0] + np.log(np.sum(np.exp(x - m), axis=1)))


def test_target_log_prob_does_not_round_confident_rows_to_zero():
    logits = np.array([[100.0, 80.0, 0.0], [100.0, 80.0, 0.0], [3.0, 3.0, -1.0], [0.0, 50.0, 120.0]], np.float32)
    targets = np.array([0, 1, 1, 0])
    got = np.asarray(target_log_prob(logits, targets))
    np.testing.assert_allclose(got, _log_prob64(logits, targets), rtol=1e-5)
    assert -3e-9 < got[0] < -1e-9  # -exp(-20); float32 log_softmax gives exactly 0
    assert float(jax.nn.log_softmax(logits)[0, 0]) == 0.0


def test_score_runs_is_the_log_probability_of_the_true_class():
    world = GapWorld(0, classes=5, dim=16)
    x, y = world.images(3)
    pool = Pool(x[:, None], y.astype(np.int32))
    settings = [Settings(epochs=3, lr=1e-2, alpha=a, batch_size=8) for a in (0.5, 2.0)]
    hp = hparam_arrays(settings)
    head = CMMHead()
    trained = train_runs(head, hp, np.tile(np.arange(len(y)), (2, 1)), np.array([1, 1]), pool, world.text,
                         batch_size=8, use_aug=False)
    test_x, test_y = world.images(4)
    preds, logp = score_runs(head, trained, hp, test_x, test_y, world.text)
    np.testing.assert_array_equal(preds, predict_runs(head, trained, hp, test_x, world.text))
    chunked = score_runs(head, trained, hp, test_x, test_y, world.text, budget=1)  # one run per chunk
    np.testing.assert_array_equal(chunked[0], preds)
    np.testing.assert_allclose(chunked[1], logp, rtol=1e-5, atol=1e-6)  # another vmap width: float32 rounding
    for s in range(2):
        params = jax.tree.map(lambda a: a[s], trained.params)
        logits = head.logits(params, {}, test_x, test_x @ world.text.T, world.text,
                             {k: v[s] for k, v in hp.items()})
        np.testing.assert_allclose(logp[s], _log_prob64(np.asarray(logits), test_y), rtol=1e-5, atol=1e-6)


GRID = ["lr=1e-2,1e-3", "alpha=0.5,1,2", "epochs=5"]
REVERSED = ["lr=1e-3,1e-2", "alpha=2,1,0.5", "epochs=5"]


@pytest.fixture(scope="module")
def cache(tmp_path_factory):
    # 1 shot: 1 validation image per class, 6 classes -> validation accuracies in steps of 16.7 points: ties
    return write_gap_cache(tmp_path_factory.mktemp("sel") / "synth.h5", GapWorld(1, classes=6, dim=16), train=4,
                           val=3, test=10)


def _argv(cache: Path, out: Path, grid: list[str], seeds: str, *extra: str) -> list[str]:
    return ["--cache", str(cache), "--out", str(out), "--shots", "1", "--seeds", *seeds.split(),
            "--methods", "zeroshot", "cmm_ce", "cmm", "--prompt", "single", "--grid", *grid, *extra]


def _run(*args) -> dict:
    assert main(_argv(*args)) == 0
    return json.loads((args[1] / "results.json").read_text())


def _chosen(results: dict) -> dict:
    return {(r["method"], r["seed"]): r for r in results["runs"] if r["selected"]}


def _same_tables(a: dict, b: dict, out_a: Path, out_b: Path) -> None:
    assert (out_a / "results.md").read_text() == (out_b / "results.md").read_text()
    assert a["summary"] == b["summary"]
    assert {k: (r["settings"], r["test_acc"]) for k, r in _chosen(a).items()} == {
        k: (r["settings"], r["test_acc"]) for k, r in _chosen(b).items()}


def test_reversed_grid_gives_the_same_tables(cache, tmp_path):
    a = _run(cache, tmp_path / "a", GRID, "1 2 3")
    b = _run(cache, tmp_path / "b", REVERSED, "1 2 3")
    _same_tables(a, b, tmp_path / "a", tmp_path / "b")
    # ties happened, and among runs whose test accuracies differ: "first on ties" would depend on the grid order
    runs = a["runs"]
    order_dependent = [
        k for k, r in _chosen(a).items() if r["tie_break"] == "score"
        and len({t["test_acc"] for t in runs if (t["method"], t["seed"]) == k and t["val_acc"] == r["val_acc"]}) > 1
    ]
    assert order_dependent
    for k, r in _chosen(a).items():  # the selected run is the best on (val_acc, val_score)
        cands = [t for t in runs if (t["method"], t["seed"]) == k and not t["failed"]]
        assert (r["val_acc"], r["val_score"]) == max((t["val_acc"], t["val_score"]) for t in cands)
    md = (tmp_path / "a" / "results.md").read_text()
    assert report.TIE_MARK in md and "seed" in md.split(report.TIE_MARK)[-1]
    with open(tmp_path / "a" / "results.csv") as f:
        rows = list(csv.DictReader(f))
    assert {row["tie_break"] for row in rows if row["selected"] == "True"} >= {"score"}
    assert all(row["val_score"] for row in rows)


def test_select_mean_picks_one_setting_per_method_from_all_seeds(cache, tmp_path, capsys):
    a = _run(cache, tmp_path / "a", GRID, "1 2", "--select", "mean")  # seeds 1 2: a tie on the mean accuracy
    b = _run(cache, tmp_path / "b", REVERSED, "1 2", "--select", "mean")
    _same_tables(a, b, tmp_path / "a", tmp_path / "b")
    chosen = _chosen(a)
    for method in ("zeroshot", "cmm_ce", "cmm"):
        picked = {json.dumps(r["settings"]) for (m, _), r in chosen.items() if m == method}
        assert len(picked) == 1 and len([k for k in chosen if k[0] == method]) == 2
        by_setting: dict[str, list] = {}
        for r in a["runs"]:
            if r["method"] == method:
                by_setting.setdefault(json.dumps(r["settings"]), []).append(r)
        means = {s: (round(np.mean([r["val_acc"] for r in rs]), 6), np.mean([r["val_score"] for r in rs]))
                 for s, rs in by_setting.items()}
        assert means[picked.pop()] == max(means.values())
    assert any(r["tie_break"] for r in chosen.values())
    assert "mean validation accuracy over seeds" in (tmp_path / "a" / "results.md").read_text()
    capsys.readouterr()
    assert main(_argv(cache, tmp_path / "a", GRID, "1 2")) == 2  # a folder is not resumed with another --select
    assert "different select ('mean')" in capsys.readouterr().err
