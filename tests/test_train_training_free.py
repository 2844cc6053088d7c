"""The training-free methods against plain NumPy transcriptions of their authors' code on small data: Tip-Adapter
(gaopengcuhk/Tip-Adapter d0e2d6f: ``build_cache_model``, ``search_hp``) and GDA (mrflogs/ICLR24 560fe21:
``main_few_shots.py: run``); and both through ``python -m train_jax`` end to end.

Tolerances: the closed forms run in float32 here and float64 in the transcriptions; the GDA precision inverts a
matrix of condition number at most n (samples, here 48), so its float32 error is about n * eps = 6e-6 of the
weights' largest entry: they must agree to 1e-5 of it (they do to 6e-7).
Chosen hyperparameters are first argmaxes of validation accuracies over a grid; a prediction whose two largest
logits are within TIE (logit units; float32 rounding of 100 * cos is about 1e-5) may go either way, so the tests
accept exactly the choices that are the first argmax for some resolution of those near-ties."""

import json

import numpy as np
import pytest

from data.cache import Split, read_cache
from helpers_train import GapWorld, write_gap_cache
from train_jax import baselines, report, training_free
from train_jax.__main__ import build_parser, main
from train_jax.config import Settings
from train_jax.methods import METHODS, predict
from train_jax.runner import Buckets
from train_jax.trainers import Job

SEEDS = (1, 2)
TIE = 1e-3


def _first_best_up_to_ties(logits: np.ndarray, labels: np.ndarray, chosen: int) -> None:
    """Assert that grid point ``chosen`` is the first best of the accuracies of logits [G,N,C] (grid points in
    upstream's loop order) on labels [N], for some resolution of the near-ties (top-2 gap < TIE): its accuracy
    counting them right (hi) reaches every point's counting them wrong (lo), and every earlier point's lo stays
    below it (upstream keeps only strictly better points). Also that the grid matters (the accuracies differ)."""
    top = np.sort(logits, axis=-1)
    sure = top[..., -1] - top[..., -2] >= TIE
    right = np.argmax(logits, axis=-1) == labels
    lo, hi = np.mean(right & sure, axis=1), np.mean(right | ~sure, axis=1)
    assert lo.max() > hi.min()  # the choice matters
    assert hi[chosen] >= lo.max() and np.all(lo[:chosen] < hi[chosen])


def _job(method: str, *, views: int = 3, shots: int = 4, budget: int | None = None, buckets: Buckets = Buckets(),
         dataset: str = "DTD", world_seed: int = 3) -> Job:
    """A Job of 2 runs (seeds) on a synthetic world of 4 classes in 16 dims: 6 train images per class (a shuffled
    pool), each run its own shots, a shared validation set with each run's own members."""
    world = GapWorld(world_seed, classes=4, dim=16, theta=2.0)
    train = world.split("train", 6, views)
    split = Split(train["features"], train["labels"], train["paths"], train.get("aug_features"))
    rng = np.random.default_rng(world_seed)
    pool_rows = rng.permutation(len(train["labels"]))
    pool_labels = train["labels"][pool_rows]
    rows = np.stack([np.concatenate([rng.choice(np.flatnonzero(pool_labels == c), shots, replace=False)
                                     for c in range(world.classes)]) for _ in SEEDS])
    val, val_y = world.images(5)
    members = rng.random((len(SEEDS), len(val_y))) < 0.7
    settings = METHODS[method].settings([Settings()]) * len(SEEDS)
    return Job(METHODS[method].head(settings[0]), settings, split, pool_rows, rows, np.array(SEEDS), world.text,
               dataset, val, val_y, members, budget, None, buckets)


def _shots(job: Job, run: int) -> tuple[np.ndarray, np.ndarray]:
    """The run's shots as upstream's loaders see them: views [N,A,D] (or the plain feature as one view), labels."""
    split, idx = job.split, job.pool_rows[job.rows[run]]
    views = split.aug_features[idx] if split.aug_features is not None else split.features[idx][:, None]
    return views.astype(np.float64), split.labels[idx]


# ---- Tip-Adapter ------------------------------------------------------------------------------------------------

def _tip_upstream(views, labels, val, val_y, text, scale):
    """build_cache_model + search_hp (utils.py), in NumPy: keys = the views' mean, normalised; values one-hot; the
    double loop over the grid keeping the first strictly better (beta, alpha). -> keys, values, beta, alpha, the
    logits [G,Nv,C] at every grid point (loop order) and the grid's betas [G], alphas [G]."""
    keys = views.mean(axis=1)
    keys /= np.linalg.norm(keys, axis=-1, keepdims=True)
    values = np.eye(text.shape[0])[labels]
    beta_list = [i * (scale[0] - 0.1) / 200 + 0.1 for i in range(200)]
    alpha_list = [i * (scale[1] - 0.1) / 20 + 0.1 for i in range(20)]
    best_acc, best_beta, best_alpha, grid = 0, 0, 0, []
    for beta in beta_list:
        for alpha in alpha_list:
            affinity = val @ keys.T
            cache_logits = np.exp(-1 * (beta - beta * affinity)) @ values
            tip_logits = 100.0 * val @ text.T + cache_logits * alpha
            acc = 100 * np.mean(np.argmax(tip_logits, axis=1) == val_y)
            grid.append((beta, alpha, tip_logits))
            if acc > best_acc:
                best_acc, best_beta, best_alpha = acc, beta, alpha
    betas, alphas, logits = zip(*grid)
    return keys, values, best_beta, best_alpha, np.stack(logits), np.array(betas), np.array(alphas)


def test_tip_adapter_is_upstreams_cache_model_and_search():
    job = _job("tip_adapter")
    fitted = training_free.tip_adapter_fit(job)
    scale = baselines.recipe("DTD").scale
    assert fitted.note == "" and not fitted.failed.any()
    for run in range(len(SEEDS)):
        views, labels = _shots(job, run)
        own = job.members[run]
        val, val_y = job.val_feats[own].astype(np.float64), job.val_labels[own]
        keys, values, _, _, logits, betas, alphas = _tip_upstream(views, labels, val, val_y, job.text, scale)
        np.testing.assert_allclose(fitted.params["keys"][run], keys, atol=1e-6)
        np.testing.assert_array_equal(fitted.consts["values"][run], values)
        st = fitted.settings[run]
        chosen = np.flatnonzero(np.isclose(betas, st.beta, rtol=1e-6) & np.isclose(alphas, st.alpha, rtol=1e-6))
        assert len(chosen) == 1 and st.logit_scale == 100.0
        _first_best_up_to_ties(logits, val_y, chosen[0])  # upstream's (beta, alpha) unless a near-tie decides
        test = job.val_feats  # every validation row, the other run's included: logits of the fitted model
        logits = np.asarray(METHODS["tip_adapter"].head(st).logits(
            {"keys": fitted.params["keys"][run]}, {"values": fitted.consts["values"][run]},
            test, test @ job.text.T, job.text, {"logit_scale": 100.0, "alpha": st.alpha, "beta": st.beta}))
        expect = 100.0 * test @ job.text.T + st.alpha * np.exp(-st.beta * (1 - test @ keys.T)) @ values
        np.testing.assert_allclose(logits, expect, rtol=1e-5, atol=1e-4)


def test_tip_adapter_without_views_uses_the_plain_features_and_says_so():
    job = _job("tip_adapter", views=0, dataset="MyFolder")
    fitted = training_free.tip_adapter_fit(job)
    assert fitted.note == training_free.NO_VIEWS.format(method="tip_adapter", dataset="MyFolder",
                                                        what="its cache keys are")
    feats, _ = _shots(job, 1)
    np.testing.assert_allclose(fitted.params["keys"][1], feats[:, 0], atol=1e-6)
    betas, alphas = (baselines.search_values(s, n) for s, n in zip(baselines.OTHER.scale, baselines.SEARCH_STEPS))
    assert all(np.isclose(betas, s.beta).any() and np.isclose(alphas, s.alpha).any() for s in fitted.settings)


def test_tip_adapter_chunks_equal_one_call():
    whole = training_free.tip_adapter_fit(_job("tip_adapter"))
    chunked = training_free.tip_adapter_fit(_job("tip_adapter", budget=1))  # one run per chunk
    assert whole.settings == chunked.settings


# ---- GDA --------------------------------------------------------------------------------------------------------

def _gda_upstream(views, labels, classes, val, val_y, text):
    """main_few_shots.py's run() in NumPy: every view a sample; class means; the KS estimator
    D * pinv((n - 1) cov + tr(cov) I) of the centred samples' covariance; W, b of the implied linear classifier;
    alpha the first strictly best of the 7 values (0.1 if none gets an image right). -> W [D,C], b [C], alpha and
    the validation logits [7,Nv,C] of every alpha."""
    vecs = views.transpose(1, 0, 2).reshape(-1, views.shape[2])  # augment_epoch passes over the loader
    vec_labels = np.tile(labels, views.shape[1])
    mus = np.stack([vecs[vec_labels == i].mean(axis=0) for i in range(classes)])
    center_vecs = np.concatenate([vecs[vec_labels == i] - mus[i] for i in range(classes)])
    cov = np.cov(center_vecs.T)
    dim = center_vecs.shape[1]
    cov_inv = dim * np.linalg.pinv((center_vecs.shape[0] - 1) * cov + np.trace(cov) * np.eye(dim))
    ps = np.ones(classes) / classes
    w = np.einsum("nd, dc -> cn", mus, cov_inv)
    b = np.log(ps) - np.einsum("nd, dc, nc -> n", mus, cov_inv, mus) / 2
    best_val_acc, best_alpha, grid = 0, 0.1, []
    for alpha in [0.0001, 0.001, 0.01, 0.1, 1.0, 10.0, 100.0]:
        val_logits = 100.0 * val @ text.T + alpha * (val @ w + b)
        acc = 100 * np.mean(np.argmax(val_logits, axis=1) == val_y)
        grid.append(val_logits)
        if acc > best_val_acc:
            best_val_acc, best_alpha = acc, alpha
    return w, b, best_alpha, np.stack(grid)


def test_gda_is_upstreams_estimator_classifier_and_alpha():
    job = _job("gda")
    fitted = training_free.gda_fit(job)
    assert fitted.note == "" and not fitted.failed.any()
    for run in range(len(SEEDS)):
        views, labels = _shots(job, run)
        own = job.members[run]
        w, b, _, logits = _gda_upstream(views, labels, 4, job.val_feats[own].astype(np.float64),
                                        job.val_labels[own], job.text)
        scale = np.abs(w).max()
        np.testing.assert_allclose(fitted.params["W"][run], w.T, atol=1e-5 * scale)
        np.testing.assert_allclose(fitted.params["b"][run], b, atol=1e-5 * np.abs(b).max())
        st = fitted.settings[run]
        assert st.logit_scale == 100.0 and st.alpha in training_free.GDA_ALPHAS
        chosen = int(np.flatnonzero(training_free.GDA_ALPHAS == np.float32(st.alpha))[0])
        _first_best_up_to_ties(logits, job.val_labels[own], chosen)  # upstream's alpha unless a near-tie decides


def test_gda_padding_and_chunks_change_nothing():
    whole = training_free.gda_fit(_job("gda"))
    n = 4 * 4  # rows per run: 4 shots x 4 classes
    other = training_free.gda_fit(_job("gda", budget=1, buckets=Buckets(rows=3 * n, pool=100)))
    assert whole.settings == other.settings
    for key in ("W", "b"):
        np.testing.assert_allclose(other.params[key], whole.params[key], rtol=1e-5,
                                   atol=1e-5 * np.abs(whole.params[key]).max())


def test_gda_of_one_plain_shot_is_zero_shot():
    """One shot per class and no views: every sample is its class mean, the scatter is 0, so is the precision
    (pinv), and the classifier is constant: the ensemble predicts as zero-shot CLIP."""
    job = _job("gda", views=0, shots=1, dataset="MyFolder")
    fitted = training_free.gda_fit(job)
    assert not fitted.failed.any() and "gda on MyFolder" in fitted.note
    np.testing.assert_array_equal(fitted.params["W"], 0.0)
    np.testing.assert_allclose(fitted.params["b"], np.log(1 / 4), rtol=1e-6)


def test_gda_search_falls_back_as_upstream():
    job = _job("gda")
    fitted = training_free.gda_fit(job)
    nowhere = np.full_like(job.val_labels, -1)  # no alpha gets any image right: upstream keeps its initial 0.1
    assert np.all(training_free.gda_search(fitted.params, job.val_feats, nowhere, job.members, job.text)
                  == np.float32(0.1))


# ---- end to end -------------------------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def cli_run(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("training_free")
    world = GapWorld(4, classes=5, dim=16, theta=2.0)
    cache = write_gap_cache(tmp / "c.h5", world, train=4, val=4, test=12, dataset="DTD", aug_views=3)
    plain = write_gap_cache(tmp / "plain.h5", world, train=4, val=4, test=6, dataset="MyFolder")
    out = tmp / "out"
    argv = ["--cache", str(cache), "--out", str(out), "--shots", "1", "2", "--seeds", "1", "2", "--methods",
            "zeroshot", "tip_adapter", "gda", "--prompt", "single"]
    assert main(argv) == 0
    assert main(["--cache", str(plain), "--out", str(tmp / "plain"), "--shots", "2", "--seeds", "1",
                 "--methods", "tip_adapter", "gda"]) == 0
    return cache, out, tmp / "plain"


def test_training_free_methods_run_end_to_end(cli_run):
    cache, out, _ = cli_run
    runs = json.loads((out / "results.json").read_text())["runs"]
    data = read_cache(cache)
    test, text = data.splits["test"], data.prototypes(0)
    scale = baselines.recipe("DTD").scale
    betas, alphas = (baselines.search_values(s, n) for s, n in zip(scale, baselines.SEARCH_STEPS))
    for k in (1, 2):
        learned = report.load_params(out / "params" / f"{k}shot.npz")
        for method in ("tip_adapter", "gda"):
            mine = [r for r in runs if r["method"] == method and r["shots"] == k]
            assert len(mine) == 2 and all(r["selected"] and r["note"] == "" for r in mine)  # one run per seed
            for r in mine:
                st = Settings.from_dict(r["settings"])
                assert st.logit_scale == 100.0 and r["loss_curve"] == [] and r["final_loss"] is None
                if method == "tip_adapter":
                    assert np.isclose(betas, st.beta).any() and np.isclose(alphas, st.alpha).any()
                    assert learned[f"{method}/seed{r['seed']}"].params["keys"].shape == (5 * k, 16)
                else:
                    assert st.alpha in training_free.GDA_ALPHAS
                item = learned[f"{method}/seed{r['seed']}"]
                preds = np.asarray(predict(method, item.settings, item.params, item.consts, test.features, text))
                assert 100.0 * np.mean(preds == test.labels) == pytest.approx(r["test_acc"], abs=1e-9)
    md = (out / "results.md").read_text()
    assert md.index("| zeroshot |") < md.index("| tip_adapter |") < md.index("| gda |")


def test_training_free_methods_say_when_the_cache_has_no_views(cli_run):
    _, _, plain = cli_run
    runs = json.loads((plain / "results.json").read_text())["runs"]
    assert {r["method"]: r["note"] for r in runs} == {
        "tip_adapter": training_free.NO_VIEWS.format(method="tip_adapter", dataset="MyFolder",
                                                     what="its cache keys are"),
        "gda": training_free.NO_VIEWS.format(method="gda", dataset="MyFolder",
                                             what="its class means and covariance are estimated from")}


def test_help_lists_them_and_they_run_by_default():
    text = build_parser().format_help()
    assert "  tip_adapter: training-free Tip-Adapter" in text and "  gda: training-free GDA" in text
    assert {"tip_adapter", "gda"} <= set(build_parser().parse_args(["--cache", "c", "--out", "o"]).methods)
