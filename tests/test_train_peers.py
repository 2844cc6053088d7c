"""CLAP, LP++ and the cross-modal linear probe against plain NumPy transcriptions of their authors' code (float64,
step for step), their schedules against a transcription of torch's schedulers, and all three through
``python -m train_jax`` end to end."""

import json
import math

import jax
import numpy as np
import pytest
from scipy.linalg import eigh

from helpers_train import GapWorld, write_gap_cache
from train_jax import clap, cross_modal, experiment, lpp, report
from train_jax.__main__ import main
from train_jax.config import Settings
from train_jax.methods import METHODS, predict

# float32 training against float64 references over tens to hundreds of steps: relative differences stay ~1e-5;
# 1e-4 of each array's scale leaves room for BLAS's summation order without hiding a wrong formula (those are off
# by 1e-2 or more after a few steps).
RTOL = 1e-4


def _close(actual, expected, rtol=RTOL):
    expected = np.asarray(expected, np.float64)
    np.testing.assert_allclose(np.asarray(actual, np.float64), expected, rtol=0,
                               atol=rtol * max(1.0, np.abs(expected).max()))


def _nrm(x):
    return x / np.linalg.norm(x, axis=-1, keepdims=True)


def _softmax(z):
    z = z - z.max(axis=-1, keepdims=True)
    e = np.exp(z)
    return e / e.sum(axis=-1, keepdims=True)


def torch_lrs(base, t_max, warmup, kind, warm_lr, periods):
    """The lr of each scheduler period, transcribed from torch's _LRScheduler.step and CosineAnnealingLR's
    chainable get_lr behind the warm-up wrappers (Dassl c61a1b5 dassl/optim/lr_scheduler.py; cross_modal_adaptation
    engine/optimizer/scheduler.py): ``kind`` "constant" (lr warm_lr) or "linear" (warm_lr, then base * t / W)."""
    group = cos_lr = base  # the successor's init: last_epoch 0, the group's lr
    cos_last, w_last = 0, 0  # the wrapper's init steps once: last_epoch -1 -> 0

    def wrapper_lr():
        if w_last >= warmup:
            return cos_lr
        if kind == "constant" or w_last == 0:
            return warm_lr
        return base * w_last / warmup

    group = wrapper_lr()
    out = []
    for _ in range(periods):
        out.append(group)
        if w_last >= warmup:
            cos_last += 1
            if (cos_last - 1 - t_max) % (2 * t_max) == 0:
                group = group + base * (1 - math.cos(math.pi / t_max)) / 2
            else:
                group = (1 + math.cos(math.pi * cos_last / t_max)) / (1 + math.cos(math.pi * (cos_last - 1) / t_max)) \
                    * group
            cos_lr = group
        else:
            w_last += 1
            group = wrapper_lr()
    return np.array(out)


def test_schedules_are_torchs():
    clap_lrs = torch_lrs(clap.LR, clap.EPOCHS, clap.WARMUP_EPOCHS, "constant", clap.WARMUP_LR, clap.EPOCHS)
    _close(jax.vmap(clap.lr_at)(np.arange(clap.EPOCHS)), clap_lrs, 1e-5)
    assert clap_lrs[0] == 1e-5 and clap_lrs[1] == 0.1 and 0 < clap_lrs[-1] < 2e-5
    peak = 1e-3
    xm = torch_lrs(peak, cross_modal.ITERS, cross_modal.WARMUP_ITERS, "linear", cross_modal.WARMUP_MIN_LR,
                   cross_modal.ITERS)
    _close(jax.vmap(lambda i: cross_modal.lr_at(i, peak))(np.arange(cross_modal.ITERS)), xm, 1e-5)
    assert xm[0] == 1e-5 and xm[1] == pytest.approx(peak / 50) and xm[50] == pytest.approx(peak)


# ---------------------------------------------------------------------------------------------------- CLAP


def clap_reference(views, labels, text, scale, orders, lrs):
    """jusiro/CLAP dbdf409 trainers/adapters.py, ZS init with the "l2" constraint: features_train are every
    (shot, view) sample (sample k: view k % A of shot k // A), logits_zs their zero-shot logits, the multipliers
    ``init_lagrangian_multipliers``; then per epoch and batch forward_lp, CE + zero_shot_constraint, torch SGD
    (momentum 0.9, no decay) at the epoch's lr. orders: per epoch the batches' sample indices."""
    n, a, dim = views.shape
    classes = len(text)
    x_all = views.reshape(n * a, dim).astype(np.float64)
    y_all = np.repeat(labels, a)
    onehot = np.eye(classes)[y_all]
    logits_zs = scale * _nrm(x_all) @ _nrm(text).T
    performance = np.diag(_softmax(logits_zs).T @ onehot) / onehot.sum(0)
    w = text.astype(np.float64).copy()
    buf, losses = None, []
    for order, lr in zip(orders, lrs):
        for idx in order:
            x, y = _nrm(x_all[idx]), y_all[idx]
            norm = np.linalg.norm(w, axis=-1, keepdims=True)
            wn = w / norm
            p = _softmax(scale * x @ wn.T)
            losses.append(-np.mean(np.log(p[np.arange(len(y)), y]))
                          + np.mean(performance * ((w - text) ** 2).sum(-1)))
            g_wn = scale * ((p - np.eye(classes)[y]) / len(y)).T @ x
            g = (g_wn - wn * (wn * g_wn).sum(-1, keepdims=True)) / norm
            g += 2 * performance[:, None] * (w - text) / classes
            buf = g if buf is None else clap.MOMENTUM * buf + g
            w = w - lr * buf
    return w, performance, losses[-1]


@pytest.mark.parametrize("per_class, views_n, epochs", [(130, 3, 3), (2, 3, 4)])
def test_clap_matches_upstream_step_for_step(per_class, views_n, epochs):
    world = GapWorld(11, classes=4, dim=8)
    feats, labels = world.images(per_class)
    rng = np.random.default_rng(0)
    views = _nrm(feats[:, None] + 0.3 * rng.normal(size=(len(labels), views_n, 8))).astype(np.float32)
    perm = rng.permutation(len(labels))  # the run's rows into the pool, in draw order
    rows = np.argsort(perm).astype(np.int32)
    pool_views, pool_labels = views[perm], labels[perm].astype(np.int32)
    n = len(rows)
    batch, steps = clap.epoch_shape(n, views_n)
    assert (batch, steps) == ((256, 2) if per_class == 130 else (24, 1))  # 520 shots: 2 batches; 8: one of all 24
    seed, scale = 3, 50.0
    out = jax.jit(lambda r: clap.train_run(r, seed, scale, pool_views, pool_labels, world.text, n=n, batch=batch,
                                           steps=steps, epochs=epochs))(rows)
    params, consts, failed, _, last, curve = jax.device_get(out)
    orders = [np.asarray(clap.epoch_order(seed, e, n * views_n, batch, steps)) for e in range(epochs)]
    w, mult, ref_last = clap_reference(views[perm][rows], labels, world.text, scale, orders,
                                       [float(clap.lr_at(e)) for e in range(epochs)])
    assert not failed and curve.shape == (epochs,)
    _close(consts["mult"], mult, 1e-5)
    _close(params["W"], w)
    assert last == pytest.approx(ref_last, rel=1e-4)
    assert not np.allclose(params["W"], world.text, atol=1e-3)  # it moved


# ---------------------------------------------------------------------------------------------------- LP++


def lpp_reference(features, labels, text, shots, bias, val_x, val_y, epochs):
    """FereshteShakeri/FewShot-CLIP-Strong-Baseline f81054f methods/linear_probe_p2.py (LinearProbe_P2.forward)
    with methods/utils.py's compute_centroids(_alpha), in float64: -> (W, b, alpha of the kept epoch, that epoch)."""
    f = features.astype(np.float64)
    text_weights = text.astype(np.float64).T  # [D, C] as clip_classifier returns it
    classes = int(len(f) / shots)
    one_hot = np.eye(classes)[labels]
    w = one_hot.T @ f  # compute_centroids: sums
    b = bias.astype(np.float64).copy()
    lr_temp = 4 * f.shape[0] / max(eigh(f.T @ f, eigvals_only=True))  # calculate_lr_w
    z = f @ text_weights
    alpha_tilde = ((one_hot * z) / one_hot.sum(0, keepdims=True)).sum(0)  # compute_centroids_alpha
    alpha_init = 250 / shots * (alpha_tilde * shots)  # calculate_init_alpha
    alpha = np.full(classes, np.mean(alpha_init))
    lr_alpha = f.shape[0] / (max(np.sum(z ** 2, axis=0)) * 4)  # calculate_lr_alpha
    buf_w = buf_b = None
    alpha_grad = np.zeros(classes)
    best_acc, best = 0.0, None
    for epoch in range(epochs):
        p = _softmax(f @ w.T + b + alpha * z)
        g = (p - one_hot) / len(f)
        gw, gb, ga = g.T @ f, g.sum(0), (g * z).sum(0)
        buf_w = gw if buf_w is None else 0.9 * buf_w + gw  # optimizer.step(): SGD, momentum 0.9
        buf_b = gb if buf_b is None else 0.9 * buf_b + gb
        w, b = w - lr_temp * buf_w, b - lr_temp * buf_b
        alpha_grad += ga  # alpha_vec.grad is never zeroed
        if (epoch + 1) % 10 == 0:
            alpha = alpha - lr_alpha * alpha_grad
        acc_val = np.mean(np.argmax(val_x @ w.T + b + alpha * (val_x @ text_weights), axis=1) == val_y) * 100.0
        if acc_val >= best_acc:
            best_acc, best = acc_val, (w.copy(), b.copy(), alpha.copy(), epoch)
    return best


@pytest.mark.parametrize("val_is_train", [False, True])
def test_lpp_matches_upstream_step_for_step(val_is_train):
    world = GapWorld(12, classes=5, dim=12, sigma=2.0)
    feats, labels = world.images(3)
    val_x, val_y = (feats, labels) if val_is_train else world.images(4)
    classes, dim = world.classes, world.dim
    bias = lpp.bias_init(7, classes, dim)
    assert np.all(np.abs(bias) <= 1 / np.sqrt(dim)) and bias.std() > 0
    pad = 3  # rows past n pad the program's shape; they must change nothing
    x = np.concatenate([feats, np.ones((pad, dim), np.float32)])
    y = np.concatenate([labels, np.zeros(pad, np.int64)]).astype(np.int32)
    valid = np.arange(len(x)) < len(feats)
    other = np.concatenate([np.zeros(len(val_y), bool), np.ones(6, bool)])  # another run's validation rows
    val_all = np.concatenate([val_x, world.images(2)[0][:6]])
    val_y_all = np.concatenate([val_y, np.zeros(6, np.int64)]).astype(np.int32)
    epochs = 35
    best, failed, _, curve, kept = jax.device_get(jax.jit(lambda *a: lpp.train_run(*a, epochs=epochs))(
        x, valid, y, bias, lpp.top_eigenvalue(feats), ~other, np.float32(len(feats)), world.text, val_all, val_y_all))
    w, b, alpha, epoch = lpp_reference(feats, labels, world.text, 3, bias, val_x, val_y, epochs)
    assert not failed and np.all(np.isfinite(curve)) and kept == epoch
    # on its own training rows validation saturates, so ">=" keeps the last epoch: the whole trajectory, three
    # alpha updates with the accumulated gradient included
    assert (epoch == epochs - 1) == val_is_train
    assert np.ptp(alpha) > 0.1 or not val_is_train
    _close(best["W"], w)
    _close(best["b"], b)
    _close(best["alpha"], alpha)
    assert curve[-1] < curve[0]


def test_lpp_without_validation_rows_keeps_the_last_epoch():
    world = GapWorld(13, classes=3, dim=8)
    feats, labels = world.images(2)
    run = jax.jit(lambda m: lpp.train_run(feats, np.ones(6, bool), labels.astype(np.int32), np.zeros(3, np.float32),
                                          lpp.top_eigenvalue(feats), m, np.float32(6), world.text, feats,
                                          labels.astype(np.int32), epochs=12))
    assert int(run(np.zeros(6, bool))[4]) == 11


# ---------------------------------------------------------------------------------------------------- cross-modal


def cross_modal_reference(images, image_y, text, image_idx, text_idx, lr, wd, val_x, val_y):
    """linzhiqiu/cross_modal_adaptation ac9077e train.py's train(): per iteration the image and text batches
    concatenated, LogitHead (normalise, zero-shot-initialised bias-free linear, * exp(4.60517)), CE, torch AdamW,
    the scheduler stepped after each iteration, validation every 100 iterations keeping the first best (strict >).
    -> (W of the kept iteration, that iteration)."""
    iters = len(image_idx)
    lrs = torch_lrs(lr, iters, 50, "linear", 1e-5, iters)
    w = _nrm(text.astype(np.float64))  # get_zero_shot_weights: the normalised class text features
    m, v = np.zeros_like(w), np.zeros_like(w)
    scale = np.exp(4.60517)
    best_acc, best = None, None
    for i in range(iters):
        x = _nrm(np.concatenate([images[image_idx[i]], text[text_idx[i]]]).astype(np.float64))
        y = np.concatenate([image_y[image_idx[i]], text_idx[i]])
        p = _softmax(scale * x @ w.T)
        g = scale * ((p - np.eye(len(text))[y]) / len(y)).T @ x
        step = i + 1
        w = w * (1 - lrs[i] * wd)  # torch AdamW: decoupled decay first
        m = 0.9 * m + 0.1 * g
        v = 0.999 * v + 0.001 * g * g
        denom = np.sqrt(v) / math.sqrt(1 - 0.999 ** step) + 1e-8
        w = w - lrs[i] / (1 - 0.9 ** step) * m / denom
        if i % 100 == 0:
            acc = np.mean(np.argmax(_nrm(val_x) @ w.T, axis=1) == val_y)
            if best_acc is None or acc > best_acc:
                best_acc, best = acc, (w.copy(), i)
    return best


def test_loader_order_is_a_restarting_drop_last_shuffle():
    order = cross_modal.loader_order(np.random.default_rng(0), 10, 4, 7)  # 2 batches a pass, 2 rows dropped
    assert order.shape == (7, 4)
    for p in range(3):
        chunk = order[2 * p: 2 * p + 2].ravel()
        assert len(set(chunk.tolist())) == 8 and chunk.max() < 10


def test_cross_modal_matches_upstream_step_for_step():
    world = GapWorld(14, classes=6, dim=10)
    images, image_y = world.images(3)
    val_x, val_y = world.images(2)
    iters, lr, wd = 250, 1e-2, 0.01  # evaluations at 0, 100, 200; a large lr so that the checkpoints differ
    rng = np.random.default_rng(1)
    b_img, b_txt = cross_modal.halves(8)
    image_idx = cross_modal.loader_order(rng, len(image_y), b_img, iters)
    text_idx = cross_modal.loader_order(rng, world.classes, b_txt, iters)
    members = np.ones(len(val_y), bool)
    members[-3:] = False  # another run's rows
    w, failed, _, curve = jax.device_get(jax.jit(lambda *a: cross_modal.train_run(*a, iters=iters))(
        image_idx, text_idx, np.float32(lr), np.float32(wd), members, images, image_y.astype(np.int32), world.text,
        val_x, val_y.astype(np.int32)))
    ref_w, kept = cross_modal_reference(images, image_y, world.text, image_idx, text_idx, lr, wd, val_x[members],
                                        val_y[members])
    assert not failed and curve.shape == (3,) and np.all(np.isfinite(curve))
    _close(w, ref_w)
    assert kept > 0 or np.allclose(w, ref_w)


def test_methods_runs_and_labels():
    grid = [Settings(lr=1e-2, alpha=1.0, logit_scale=50.0), Settings(lr=1e-3, alpha=2.0, logit_scale=50.0)]
    xm = METHODS["cross_modal_lp"]
    runs = xm.settings(grid, 100)
    assert [(s.lr, s.weight_decay, s.batch_size) for s in runs] == [
        (lr, wd, bs) for lr in (1e-3, 1e-4) for wd in (0.0, 0.01, 1e-4) for bs in (8, 32)]  # their loop order
    assert all(s.logit_scale == pytest.approx(100.0, rel=1e-5) for s in runs)
    assert {s.batch_size for s in xm.settings(grid, 10)} == {8}  # 16 texts per batch need more than 10 classes
    assert xm.settings(grid, 4) == []  # upstream: "No valid batch size found"
    assert xm.label_keys(["lr", "alpha"]) == ["lr", "weight_decay", "batch_size"]
    for name, epochs in (("clap", 300), ("lp_plus_plus", 300)):
        (only,) = METHODS[name].settings(grid, 100)  # the user's grid is not theirs to search
        assert only.epochs == epochs and only.lr == (0.1 if name == "clap" else Settings().lr)
    assert METHODS["clap"].settings(grid)[0].logit_scale == 50.0  # CLIP's own temperature (the cache's)


# ---------------------------------------------------------------------------------------------------- end to end


@pytest.fixture(scope="module")
def cli_run(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("peers")
    world = GapWorld(15, classes=6, dim=16)
    cache = write_gap_cache(tmp / "synth.h5", world, train=5, val=3, test=12, aug_views=3)
    out = tmp / "out"
    argv = ["--cache", str(cache), "--out", str(out), "--shots", "1", "2", "--seeds", "1", "2", "--methods", "clap",
            "lp_plus_plus", "cross_modal_lp", "--prompt", "single"]
    assert main(argv) == 0
    return world, cache, out


def test_peers_run_end_to_end(cli_run):
    world, cache, out = cli_run
    runs = json.loads((out / "results.json").read_text())["runs"]
    per = {m: [r for r in runs if r["method"] == m] for m in ("clap", "lp_plus_plus", "cross_modal_lp")}
    # 6 classes: the cross-modal batch of 32 (16 texts) is not run, as upstream; 1 run for the others
    assert [len(v) for v in per.values()] == [4, 4, 4 * 6]
    for r in runs:
        assert r["note"] == "" and not r["failed"] and r["settings"]["use_aug"]
    assert {r["setting"] for r in per["cross_modal_lp"]} == {
        f"lr={lr} weight_decay={wd} batch_size=8" for lr in ("0.001", "0.0001") for wd in ("0", "0.01", "0.0001")}
    assert all(len(r["loss_curve"]) == 300 for r in per["clap"] + per["lp_plus_plus"])
    for key in {(r["method"], r["shots"], r["seed"]) for r in runs}:
        group = [r for r in runs if (r["method"], r["shots"], r["seed"]) == key]
        (chosen,) = [r for r in group if r["selected"]]
        assert chosen["val_acc"] == max(r["val_acc"] for r in group)
    md = (out / "results.md").read_text()
    assert all(m in md for m in per)


def test_peer_params_reload_and_reproduce_accuracy(cli_run):
    world, cache, out = cli_run
    from data.cache import read_cache

    test = read_cache(cache).splits["test"]
    learned = report.load_params(out / "params" / "2shot.npz")
    runs = json.loads((out / "results.json").read_text())["runs"]
    for method in ("clap", "lp_plus_plus", "cross_modal_lp"):
        model = learned[f"{method}/seed1"]
        preds = np.asarray(predict(method, model.settings, model.params, model.consts, test.features, world.text))
        (rec,) = [r for r in runs if r["method"] == method and r["shots"] == 2 and r["seed"] == 1 and r["selected"]]
        assert 100 * np.mean(preds == test.labels) == pytest.approx(rec["test_acc"])


def test_peers_without_views_say_so(tmp_path, capsys):
    world = GapWorld(16, classes=6, dim=16)
    cache = write_gap_cache(tmp_path / "plain.h5", world, train=3, val=2, test=6, dataset="MyFolder")
    out = tmp_path / "out"
    assert main(["--cache", str(cache), "--out", str(out), "--shots", "1", "--seeds", "1", "--methods", "clap",
                 "lp_plus_plus", "cross_modal_lp"]) == 0
    runs = json.loads((out / "results.json").read_text())["runs"]
    assert all("MyFolder: the cache has no augmented views" in r["note"] and not r["settings"]["use_aug"]
               for r in runs)
    assert "no augmented views" in capsys.readouterr().err


def test_a_method_with_no_setting_for_the_classes_is_skipped_with_a_warning(tmp_path):
    world = GapWorld(17, classes=4, dim=8)
    task = experiment.load_task(write_gap_cache(tmp_path / "c4.h5", world, train=2, val=1, test=3))
    with pytest.warns(UserWarning, match="cross_modal_lp not run: none of its settings runs on 4 classes"):
        result = experiment.run_shots(task, 1, [1], ["zeroshot", "cross_modal_lp"], [Settings()], [])
    assert {r.method for r in result.records} == {"zeroshot"}


def test_help_lists_the_peers(capsys):
    with pytest.raises(SystemExit):
        main(["--help"])
    text = capsys.readouterr().out
    assert all(m in text for m in ("clap", "lp_plus_plus", "cross_modal_lp"))


def test_bench_peers_runs(capsys):
    from bench import bench_peers

    bench_peers.main(["--classes", "6", "--dim", "8", "--views", "2", "--seeds", "1", "--fraction", "0.001"])
    out = capsys.readouterr().out
    assert "| total" in out and "all three, 11 datasets: here" in out
