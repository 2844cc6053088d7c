"""Side by side on one cache, in one run: this project's methods against their authors' own procedures (issue 25).

Three pairs, each on the same few-shot draws (this project's ``data.fewshot``) of one cache, per shot count:
- **linear probe**: ``train_jax`` (``experiment.run_shots``, method ``linear_probe``, the default 25-value C grid)
  against CoOp's ``lpclip`` search (``bench/coop_lpclip.py``: scikit-learn, 7 coarse C values then 8 binary-search
  steps, 23 fits per seed) on the raw features; skipped with a line when scikit-learn is absent;
- **CMM**: ``train_jax`` (method ``cmm``, the 12-setting lr x alpha x lambda grid) against the plain PyTorch loop
  of ``bench/train_torch.py`` (the same runs one after another, then their test predictions);
- **Tip-Adapter-F**: ``train_jax`` (method ``tip_adapter_f``) against upstream's loop transcribed in PyTorch
  (``bench/tip_adapter_torch.py``) on the same cached views.

The two sides of a pair run one after the other, their order alternating between rounds; this project's side is
cold in the process at the first shot count (its compilation counted in its time and shown apart, no persistent
compilation cache) and compiles nothing more at the others. The peers run with ``--peer-threads`` BLAS / torch
threads (default 1: on a shared 2-core machine OpenBLAS and OpenMP threads that wait for a descheduled sibling
make scikit-learn and torch several times slower; 1 thread is their best case there). Accuracies: test accuracy
in percent, mean over seeds: of the validation-selected run (probe, Tip-Adapter-F), of every run (CMM: both sides
train the whole grid). "others' CPU %" is the share of the machine's CPU other processes took meanwhile.

    python -m bench.bench_upstream                               # 40 classes, dim 256, shots 1 4 16, seeds 1 2 3
    python -m bench.bench_upstream --cache outputs/cache/x.h5 --pairs probe --plain   # a real cache, the probe only
"""

from __future__ import annotations

import argparse
import contextlib
import os
import sys
import tempfile
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from bench.common import format_table, load_average, machine_lines, timed

PAIRS = ("probe", "cmm", "tip")
HEADERS = ["round", "shots", "pair", "this s", "of which compile s", "peer s", "peer / this", "this acc", "peer acc",
           "Δ acc", "others' CPU %"]
CMM_GRID = {"lr": (1e-2, 1e-3), "alpha": (0.5, 1.0, 2.0), "lam": (1.0, 10.0)}  # frozen prototypes: the torch loop's


def _unit(x: np.ndarray) -> np.ndarray:
    return (x / np.linalg.norm(x, axis=-1, keepdims=True)).astype(np.float32)


def write_peer_cache(path: Path, classes: int, dim: int, per_split: dict[str, int], views: int, seed: int = 0
                     ) -> Path:
    """A synthetic cache with CLIP's traits: image features in a cone of their own (a shared direction), classes
    near their prompt's direction, anisotropic noise (a power-law spectrum), raw norms around 10 (lognormal, 10%),
    ``views`` augmented views per train image (the image plus noise, own norms)."""
    from data.cache_writer import write_cache

    rng = np.random.default_rng(seed)
    shared_t, shared_i = _unit(rng.normal(size=dim)), _unit(rng.normal(size=dim))
    directions = _unit(rng.normal(size=(classes, dim)))
    text = _unit(0.6 * shared_t + directions)
    centers = _unit(3.0 * shared_i + _unit(directions + 0.7 * _unit(rng.normal(size=(classes, dim)))))
    spectrum = (1.0 + np.arange(dim)) ** -0.3
    spectrum *= np.sqrt(dim / np.sum(spectrum**2))
    rotation = np.linalg.qr(rng.normal(size=(dim, dim)))[0]
    noise = lambda n: (rng.normal(size=(n, dim)) * spectrum) @ rotation.T / np.sqrt(dim)  # noqa: E731
    norms = lambda shape: (10.0 * np.exp(0.1 * rng.normal(size=shape))).astype(np.float32)  # noqa: E731
    splits = {}
    for name, per_class in per_split.items():
        labels = np.repeat(np.arange(classes), per_class)
        feats = _unit(centers[labels] + noise(len(labels)))
        split = {"features": feats, "labels": labels, "norms": norms(len(labels)),
                 "paths": [f"{name}/c{y:03d}/{i:05d}.png" for i, y in enumerate(labels)]}
        if name == "train" and views:
            jitter = 0.5 * noise(len(labels) * views).reshape(len(labels), views, dim)
            split |= {"aug_features": _unit(feats[:, None] + jitter), "aug_norms": norms((len(labels), views))}
        splits[name] = split
    return write_cache(path, attrs={"dataset": "PeerSynth", "model": "synthetic", "embed_dim": dim},
                       classnames=[f"class {c}" for c in range(classes)], templates=["a photo of a {}."],
                       text_features=text[:, None], splits=splits)


@dataclass
class Draw:
    """One seed's rows: train, validation (split ``val_split``) and every encoded test row, as indices into the
    splits' listings."""

    train: np.ndarray
    val: np.ndarray


def draws(task, shots: int, seeds: list[int]) -> tuple[dict[int, Draw], str]:
    """This project's few-shot draw of every seed (``train_jax.experiment``'s sampling) and the validation split."""
    from train_jax import experiment

    picks, val_split, val_rows = experiment._sample(task, shots, seeds)
    return {s: Draw(picks[s], val_rows[s]) for s in seeds}, val_split


def features(task, split: str, rows: np.ndarray, *, raw: bool, views: bool = False) -> np.ndarray:
    """Features of listed rows: unit ([n,D], or [n,A,D] views only) or raw (x their norms)."""
    x = task.cache.read(split, rows, views=views)[1 if views else 0]
    if not raw:
        return x
    norms = task.cache.norms(split, rows, views=views)
    return x * (norms[:, 1:, None] if views else norms[:, None])


def this_side(task, method: str, shots: int, seeds: list[int], grid, max_shots: int) -> tuple[float, float]:
    """``experiment.run_shots`` for one method -> (mean test accuracy over the selected runs, or over every run
    for cmm, compile seconds)."""
    from train_jax import compile_cache, experiment

    before = compile_cache.stats()
    result = experiment.run_shots(task, shots, seeds, [method], grid, [], max_shots=max_shots)
    runs = [r for r in result.records if r.selected or method == "cmm"]
    return float(np.mean([r.test_acc for r in runs])), (compile_cache.stats() - before).compile_s


def coop_side(task, shots: int, seeds: list[int], plain: list[float] | None) -> float:
    """CoOp's search per seed on the raw features (or, with ``plain``, plain fits of those C values) -> mean test
    accuracy (NaN for plain fits)."""
    from bench import coop_lpclip

    found, val_split = draws(task, shots, seeds)
    test_rows = np.flatnonzero(task.listings["test"].status == 1)
    test_x, test_y = features(task, "test", test_rows, raw=True), task.listings["test"].labels[test_rows]
    accs = []
    for s in seeds:
        d = found[s]
        x, y = features(task, "train", d.train, raw=True), task.listings["train"].labels[d.train]
        if plain is not None:
            coop_lpclip.plain_fits(x, y, plain)
            continue
        vx, vy = features(task, val_split, d.val, raw=True), task.listings[val_split].labels[d.val]
        accs.append(coop_lpclip.search(x, y, vx, vy, test_x, test_y).test_acc)
    return float(np.mean(accs)) if accs else float("nan")


def torch_cmm_side(task, shots: int, seeds: list[int], settings) -> float:
    """``bench/train_torch.py``'s loop over every (seed, setting) run, then each run's test predictions -> mean
    test accuracy over the runs."""
    import torch
    import torch.nn.functional as F

    from bench.train_torch import train_loop

    found, _ = draws(task, shots, seeds)
    pool_rows = np.unique(np.concatenate([d.train for d in found.values()]))
    pool_x = features(task, "train", pool_rows, raw=False)
    pool_y = task.listings["train"].labels[pool_rows].astype(np.int64)
    runs = [(s, st) for s in seeds for st in settings]
    rows = np.stack([np.searchsorted(pool_rows, found[s].train) for s, _ in runs])
    hp = {k: np.array([getattr(st, k) for _, st in runs], np.float32)
          for k in ("lr", "weight_decay", "warmup", "alpha", "lam", "margin", "logit_scale")}
    out = train_loop(pool_x, pool_y, task.text, rows, np.array([s for s, _ in runs]), hp,
                     batch=settings[0].batch_size, epochs=settings[0].epochs)
    test_rows = np.flatnonzero(task.listings["test"].status == 1)
    x = torch.from_numpy(features(task, "test", test_rows, raw=False))
    y, text = torch.from_numpy(task.listings["test"].labels[test_rows]), torch.from_numpy(task.text)
    accs = []
    with torch.no_grad():
        for (dw, b), (_, st) in zip(out, runs):
            mapped = F.normalize(x + x @ torch.from_numpy(dw).T + torch.from_numpy(b), dim=-1)
            pred = (st.logit_scale * (st.alpha * mapped @ text.T + x @ text.T)).argmax(dim=1)
            accs.append(100.0 * float((pred == y).float().mean()))
    return float(np.mean(accs))


def torch_tip_side(task, shots: int, seeds: list[int]) -> float:
    """Upstream Tip-Adapter-F (``bench/tip_adapter_torch.py``) per seed, with the dataset's upstream recipe (this
    project's ``baselines.recipe``) -> mean test accuracy."""
    from bench import tip_adapter_torch
    from train_jax.baselines import SEARCH_STEPS, recipe

    rec = recipe(task.dataset)
    found, val_split = draws(task, shots, seeds)
    test_rows = np.flatnonzero(task.listings["test"].status == 1)
    test_x, test_y = features(task, "test", test_rows, raw=False), task.listings["test"].labels[test_rows]
    accs = []
    for s in seeds:
        d = found[s]
        raw = features(task, "train", d.train, raw=True, views=True)
        unit = features(task, "train", d.train, raw=False, views=True)
        vx, vy = features(task, val_split, d.val, raw=False), task.listings[val_split].labels[d.val]
        acc, _, _ = tip_adapter_torch.run(raw, unit, task.listings["train"].labels[d.train], vx, vy, test_x, test_y,
                                          task.text.T.copy(), init_alpha=rec.init_alpha, scale=rec.scale,
                                          epochs=rec.epochs, seed=s, steps=SEARCH_STEPS)
        accs.append(acc)
    return float(np.mean(accs))


def _peer_threads(n: int):
    """Limit BLAS (scikit-learn, numpy) and torch to n threads within the block."""
    stack = contextlib.ExitStack()
    try:
        from threadpoolctl import threadpool_limits

        stack.enter_context(threadpool_limits(n))
    except ImportError:
        pass
    try:
        import torch

        old = torch.get_num_threads()
        torch.set_num_threads(n)
        stack.callback(torch.set_num_threads, old)
    except ImportError:
        pass
    return stack


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m bench.bench_upstream", description=__doc__.split("\n\n")[0])
    p.add_argument("--cache", type=Path, help="a cache to run on (default: a synthetic one, the options below)")
    p.add_argument("--classes", type=int, default=40, help="synthetic cache: classes (default %(default)s)")
    p.add_argument("--dim", type=int, default=256, help="synthetic cache: feature dim (default %(default)s)")
    p.add_argument("--train", type=int, default=16, help="synthetic cache: train images per class (default "
                   "%(default)s)")
    p.add_argument("--test", type=int, default=50, help="synthetic cache: test images per class (default %(default)s)")
    p.add_argument("--views", type=int, default=10, help="synthetic cache: augmented views (default %(default)s)")
    p.add_argument("--shots", type=int, nargs="+", default=[1, 4, 16])
    p.add_argument("--seeds", type=int, nargs="+", default=[1, 2, 3])
    p.add_argument("--pairs", nargs="+", choices=PAIRS, default=list(PAIRS))
    p.add_argument("--rounds", type=int, default=1, help="interleaved rounds, sides' order alternating (default 1)")
    p.add_argument("--peer-threads", type=int, default=1, help="BLAS/torch threads of the peers (default 1)")
    p.add_argument("--plain", action="store_true", help="probe pair: plain scikit-learn fits of the grid's C values "
                   "instead of CoOp's search (the 'never slower than scikit-learn' check)")
    args = p.parse_args(argv)
    os.environ.setdefault("TQDM_DISABLE", "1")  # train_jax's progress bars

    print("\n".join(machine_lines(["jax", "jaxlib", "optax", "torch", "scikit-learn", "numpy"])))
    print(f"load average at start: {load_average():.2f}; peer threads {args.peer_threads}")
    pairs = list(args.pairs)
    if "probe" in pairs:
        try:
            import sklearn  # noqa: F401
        except ImportError:
            print("probe pair skipped: scikit-learn is not installed (pip install scikit-learn)")
            pairs.remove("probe")
    with tempfile.TemporaryDirectory(prefix="bench_upstream_") as tmp:
        cache = args.cache or write_peer_cache(Path(tmp) / "peers.h5", args.classes, args.dim,
                                               {"train": args.train, "val": 4, "test": args.test}, args.views)
        rows, totals = _run(cache, pairs, args)
    print()
    print(format_table(HEADERS, rows))
    print()
    for pair, t in totals.items():
        if args.rounds > 1:  # rounds after the first: this side compiles nothing more in the process
            per_round = len(args.shots)
            this_w, peer_w = sum(t["this"][per_round:]), sum(t["peer"][per_round:])
            print(f"{pair}, rounds 1-{args.rounds - 1} (this side warm in the process): peer / this = "
                  f"{peer_w / this_w:.2f}x ({peer_w:.1f} s / {this_w:.1f} s)")
        this, peer = sum(t["this"]), sum(t["peer"])
        gaps = [abs(a - b) for a, b in zip(t["this_acc"], t["peer_acc"]) if np.isfinite(b)]
        compiled = sum(t["compile"])
        line = (f"{pair}: peer / this = {peer / this:.2f}x over all shot counts and rounds ({peer:.1f} s / {this:.1f} "
                f"s, this side's compilation {compiled:.1f} s included; {peer / max(this - compiled, 1e-9):.2f}x "
                "without it)")
        if gaps:
            line += f"; largest accuracy gap {max(gaps):.2f} points"
        if pair == "probe" and not args.plain:
            worst = min(a - b for a, b in zip(t["this_acc"], t["peer_acc"]))
            line += (f"; targets: >= 10x CoOp's search {'met' if peer >= 10 * this else 'missed'} (without this "
                     f"side's compilation {'met' if peer >= 10 * (this - compiled) else 'missed'}), within 0.5 points "
                     f"at every shot count {'met' if gaps and max(gaps) <= 0.5 else 'missed'} (never more than 0.5 "
                     f"below: {'met' if worst >= -0.5 else 'missed'})")
        print(line)
    return 0


def _run(cache: Path, pairs: list[str], args) -> tuple[list[list], dict]:
    from train_jax import experiment
    from train_jax.config import DEFAULT_GRID, Settings, expand_grid
    from train_jax.methods import METHODS

    task = experiment.load_task(cache)
    probe_grid = [Settings(c=c) for c in DEFAULT_GRID["c"]]
    cmm_grid = METHODS["cmm"].settings(expand_grid(CMM_GRID))
    top = max(args.shots)
    sides = {
        "probe": (lambda k: this_side(task, "linear_probe", k, args.seeds, probe_grid, top),
                  lambda k: coop_side(task, k, args.seeds, [s.c for s in probe_grid] if args.plain else None)),
        "cmm": (lambda k: this_side(task, "cmm", k, args.seeds, cmm_grid, top),
                lambda k: torch_cmm_side(task, k, args.seeds, cmm_grid)),
        "tip": (lambda k: this_side(task, "tip_adapter_f", k, args.seeds, [Settings()], top),
                lambda k: torch_tip_side(task, k, args.seeds)),
    }
    rows, totals = [], {p: {"this": [], "peer": [], "this_acc": [], "peer_acc": [], "compile": []} for p in pairs}
    for r in range(args.rounds):
        for k in sorted(args.shots):
            for pair in pairs:
                this_fn, peer_fn = sides[pair]
                got = {}
                for side in ("this", "peer") if r % 2 == 0 else ("peer", "this"):
                    fn, out = (this_fn if side == "this" else peer_fn), []
                    with _peer_threads(args.peer_threads) if side == "peer" else contextlib.nullcontext():
                        got[side] = (timed(lambda: out.append(fn(k))), out[0] if out else None)
                    got[side] = (got[side][0], out[0])
                (t_this, (acc_this, compile_s)), (t_peer, acc_peer) = got["this"], got["peer"]
                others = max(t_this.others, t_peer.others)
                rows.append([r, k, pair, t_this.wall, compile_s, t_peer.wall, t_peer.wall / t_this.wall,
                             f"{acc_this:.2f}", f"{acc_peer:.2f}" if np.isfinite(acc_peer) else "-",
                             f"{acc_this - acc_peer:+.2f}" if np.isfinite(acc_peer) else "-", 100 * others])
                for key, v in (("this", t_this.wall), ("peer", t_peer.wall), ("this_acc", acc_this),
                               ("peer_acc", acc_peer), ("compile", compile_s)):
                    totals[pair][key].append(v)
                print(format_table(HEADERS, rows[-1:]).splitlines()[-1], flush=True)
    return rows, totals


if __name__ == "__main__":
    sys.exit(main())
