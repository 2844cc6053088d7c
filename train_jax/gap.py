"""Modality-gap diagnostics: does the learned map bring image features to their text prototypes?

Before = CLIP image features against the prompt prototypes; after = the mapped features v' against the prototypes
the model uses (learned ones with ``learn_text``). Per test split: the gap ‖mean image − mean prototype‖ (Liang et
al. 2022, "Mind the Gap"), the mean cosine of an image to its own class prototype and to the closest other one,
their difference (the margin the triplet loss pushes), and nearest-prototype accuracy. ``write_run`` computes them
from a run folder's saved params and writes gap.json and gap.md (``train_jax.records.write_gap``) and gap.png.
"""

from __future__ import annotations

import functools
import math
from pathlib import Path
from typing import Any, Mapping, Sequence

import jax
import numpy as np

from train_jax.methods import METHODS, CMMHead
from train_jax.model import CrossModalMapper
from train_jax.records import GAP_PNG, GapFile, GapRow, Learned, load_params, saved_params, write_gap
from train_jax.runner import EVAL_BLOCK

STATS = ("gap", "cos_own", "cos_other", "margin", "nearest_acc")
PLOT_CLASSES, PLOT_PER_CLASS = 6, 60


def modality_gap(images: np.ndarray, text: np.ndarray) -> float:
    """‖mean image − mean prototype‖. images [N,D], text [C,D] -> scalar."""
    return float(np.linalg.norm(np.mean(images, axis=0) - np.mean(text, axis=0)))


def cosines(images: np.ndarray, labels: np.ndarray, text: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Cosine of each image to its own prototype and to the closest other one (rows L2-normalised).
    images [N,D], labels [N], text [C,D] (C >= 2) -> ([N], [N])."""
    sims = np.asarray(images, np.float32) @ np.asarray(text, np.float32).T
    rows = np.arange(len(labels))
    own = sims[rows, labels].astype(np.float64)
    sims[rows, labels] = -np.inf
    return own, sims.max(axis=1).astype(np.float64)


def stats(images: np.ndarray, labels: np.ndarray, text: np.ndarray) -> dict[str, float]:
    """``STATS`` of images [N,D] with labels [N] against prototypes [C,D]; nearest_acc: percent of images
    strictly closer to their own prototype than to any other."""
    own, other = cosines(images, labels, text)
    return {"gap": modality_gap(images, text), "cos_own": float(own.mean()), "cos_other": float(other.mean()),
            "margin": float((own - other).mean()), "nearest_acc": float(100.0 * np.mean(own > other))}


def has_map(method: str, settings: Any) -> bool:
    """Whether a learned model maps image features into the text space (a trained CMM head)."""
    return isinstance(METHODS[method].head(settings), CMMHead) and settings.epochs > 0


@functools.partial(jax.jit, static_argnums=0)
def _map_block(learn_text: bool, params: Mapping, block: jax.Array, text: jax.Array) -> tuple[jax.Array, jax.Array]:
    """The mapper on one block [EVAL_BLOCK,D] of images -> (mapped [EVAL_BLOCK,D], prototypes [C,D])."""
    return CrossModalMapper(learn_text).apply({"params": params}, block, text)


def mapped(settings: Any, params: Mapping, images: np.ndarray, text: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """A CMM model's mapped images [N,D] and its prototypes [C,D] (learned ones with learn_text); one compiled
    program per (learn_text, C, D) whatever N: the map is row-wise, applied to ``EVAL_BLOCK``-row blocks, the last
    padded with zero rows that are dropped. Each block's output is copied out at once, so only one block's device
    arrays are alive (ImageNet's test split is 49 blocks)."""
    images = np.asarray(images, np.float32)
    n, dim = images.shape
    text = np.asarray(text, np.float32)
    out = np.empty((n, dim), np.float32)
    protos = None
    for start in range(0, max(n, 1), EVAL_BLOCK):
        block = np.zeros((EVAL_BLOCK, dim), np.float32)
        block[: min(EVAL_BLOCK, n - start)] = images[start : start + EVAL_BLOCK]
        v, t = _map_block(bool(settings.learn_text), params, block, text)
        out[start : start + EVAL_BLOCK] = np.asarray(v)[: min(EVAL_BLOCK, n - start)]
        protos = np.asarray(t) if protos is None else protos
        del v, t
    return out, protos


def shot_rows(learned: Mapping[str, Learned], shots: int, images: np.ndarray, labels: np.ndarray,
              text: np.ndarray) -> list[GapRow]:
    """Per method with a map, the after-``STATS`` of each seed's selected model and their mean and std over seeds.

    Args: learned: ``"method/seedK" -> Learned`` (``records.load_params``); shots: their shot count; images [N,D],
    labels [N]: the test split; text [C,D]: the run's prompt prototypes.
    Returns: one ``GapRow`` per method with a map, in run-name order."""
    by_method: dict[str, list[tuple[int, dict[str, float]]]] = {}
    for run, item in sorted(learned.items()):
        method, seed = run.split("/")
        if has_map(method, item.settings):
            v, t = mapped(item.settings, item.params, images, text)
            by_method.setdefault(method, []).append((int(seed.removeprefix("seed")), stats(v, labels, t)))
    return [GapRow(m, shots, tuple(s for s, _ in rs), tuple(st for _, st in rs),
                   {k: float(np.mean([st[k] for _, st in rs])) for k in STATS},
                   {k: float(np.std([st[k] for _, st in rs])) for k in STATS})
            for m, rs in by_method.items()]


def markdown(dataset: str, before: Mapping[str, float], after: Sequence[GapRow]) -> str:
    """gap.md: the CLIP row (before), then one row per (method, shots) after the map, mean ± std over seeds."""
    head = ("| Features vs prototypes | ‖mean image − mean prototype‖ | cos to own | cos to closest other | margin | "
            "nearest-prototype acc (%) |\n|---|---|---|---|---|---|\n")
    fmt = {"gap": "{:.3f}", "cos_own": "{:.3f}", "cos_other": "{:.3f}", "margin": "{:.3f}", "nearest_acc": "{:.2f}"}
    rows = ["| CLIP (before) | " + " | ".join(fmt[k].format(before[k]) for k in STATS) + " |"]
    for r in after:
        cells = [f"{fmt[k].format(r.mean[k])} ± {fmt[k].format(r.std[k])}" for k in STATS]
        rows.append(f"| {r.method} {r.shots}-shot (after) | " + " | ".join(cells) + " |")
    return (f"# {dataset}: modality gap on the test split (Liang et al. 2022), before and after the learned map\n\n"
            + head + "\n".join(rows) + "\n\nmargin = cos to own − cos to closest other prototype (what the triplet "
            "loss pushes); after = mapped image features v' vs the model's prototypes; mean ± std over seeds.\n")


def pca_2d(points: np.ndarray) -> np.ndarray:
    """Projection of points [M,D] on their first two principal components -> [M,2]; each component's sign is
    fixed so its largest-magnitude coordinate is positive (deterministic)."""
    centred = points - points.mean(axis=0)
    _, _, vt = np.linalg.svd(centred, full_matrices=False)
    comps = vt[:2] * np.sign(vt[:2][np.arange(2), np.argmax(np.abs(vt[:2]), axis=1)])[:, None]
    return centred @ comps.T


def plot(path: Path, images: np.ndarray, labels: np.ndarray, text: np.ndarray, mapped_images: np.ndarray,
         protos: np.ndarray, classnames: Sequence[str], title: str) -> None:
    """PNG: PCA (fitted on the union of all four sets) of test images with the prompt prototypes (before) and
    mapped images with the model's prototypes (after), coloured by class; the first ``PLOT_CLASSES`` classes."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    classes = np.arange(min(PLOT_CLASSES, len(text)))
    rows = np.concatenate([np.flatnonzero(labels == c)[:PLOT_PER_CLASS] for c in classes])
    sets = [images[rows], text[classes], mapped_images[rows], protos[classes]]
    xy = np.split(pca_2d(np.concatenate(sets)), np.cumsum([len(s) for s in sets])[:-1])
    colours = plt.get_cmap("tab10")(np.arange(len(classes)) % 10)
    fig, axes = plt.subplots(1, 2, figsize=(10, 4.6), sharex=True, sharey=True)
    for ax, img, proto, name in ((axes[0], xy[0], xy[1], "before: CLIP images, prompt prototypes"),
                                 (axes[1], xy[2], xy[3], "after: mapped images, model prototypes")):
        ax.scatter(img[:, 0], img[:, 1], c=colours[np.searchsorted(classes, labels[rows])], s=10, alpha=0.6)
        ax.scatter(proto[:, 0], proto[:, 1], c=colours, s=220, marker="*", edgecolors="black", linewidths=1)
        ax.set_title(name, fontsize=10)
        ax.grid(alpha=0.3)
    handles = [plt.Line2D([], [], marker="o", ls="", color=colours[i], label=classnames[c])
               for i, c in enumerate(classes)]
    axes[1].legend(handles=handles, fontsize=7, loc="best")
    fig.suptitle(f"{title} (PCA of the test split; stars: prototypes)", fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def write_run(out: Path, dataset: str, images: np.ndarray, labels: np.ndarray, text: np.ndarray,
              classnames: Sequence[str]) -> list[GapRow]:
    """Write gap.json and gap.md (``records.write_gap``) and gap.png of a run folder from every params/<K>shot.npz
    in it.

    Args: out: the run folder; dataset: its name; images [N,D], labels [N]: the test split; text [C,D]: the run's
    prototypes; classnames [C]: for the figure's legend. The figure: cmm (else the first method with a map) at
    the largest shot count, its first seed.
    Returns: the after rows, by shot count."""
    before = stats(images, labels, text)
    after: list[GapRow] = []
    figure = None
    for shots, path in saved_params(out):
        learned = load_params(path)
        rows = shot_rows(learned, shots, images, labels, text)
        after.extend(rows)
        if rows:
            row = next((r for r in rows if r.method == "cmm"), rows[0])
            figure = (learned[f"{row.method}/seed{row.seeds[0]}"], row)
    write_gap(out, GapFile(dataset, before, tuple(after)), markdown(dataset, before, after))
    if figure is not None:
        item, row = figure
        v, t = mapped(item.settings, item.params, images, text)
        plot(out / GAP_PNG, images, labels, text, v, t, classnames,
             f"{dataset}: {row.method} {row.shots}-shot, seed {row.seeds[0]}")
    return after
