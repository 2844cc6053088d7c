"""Methods: the registry of named methods (``METHODS``) over heads (``train_jax.heads``) and their trainers.

A method names a head for given settings, the settings fields it uses and forces, its fixed default (the one
setting it runs at when nothing is selected on validation, ``--select none``), and optionally its own trainer
(``Method.fit``); methods without one train with the shared vmapped AdamW runner.

The validation-free policy (``--select none``): every method declares its fixed default here, in ``fixed``, and
nowhere else; a trainer that searches something on validation rows (Tip-Adapter's (beta, alpha)) receives a ``Job``
without them (``Job.validation_free``) and keeps its recipe's starting values instead.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Any, Callable, Collection, Mapping, Sequence

import jax
import jax.numpy as jnp

from train_jax import baselines, clap, cross_modal, logreg, lpp, training_free
from train_jax.config import DYNAMIC_FIELDS, Settings, expand_grid
from train_jax.heads import CMMHead, Head, Params, head_inputs
from train_jax.trainers import Fitted, Job

__all__ = ["CMMHead", "DEFAULT_METHODS", "Head", "METHODS", "Method", "Params", "logits", "predict", "restrict"]


def restrict(grid: Sequence[Settings], used: Sequence[str], forced: Mapping[str, Any]) -> list[Settings]:
    """Grid settings with every field outside ``used`` reset to its default and ``forced`` applied; duplicates
    dropped, first occurrence order kept."""
    default = Settings()
    unused = {f.name: getattr(default, f.name) for f in dataclasses.fields(Settings) if f.name not in used}
    return list(dict.fromkeys(dataclasses.replace(s, **{**unused, **forced}) for s in grid))


@dataclass(frozen=True)
class Method:
    """A named method: its head for given settings, the fields it uses, how it turns the grid into runs, and its
    own trainer (``fit``; None: the shared AdamW runner with the settings as given). ``grid``: the authors' own
    grid, searched instead of the user's (None: the user's grid restricted to ``used``); ``admits(settings,
    classes)``: whether a setting runs on a dataset of that many classes (None: all do); ``fixed``: the fields of
    its fixed default setting, the one it runs at without validation (``--select none``; ``fixed_setting``),
    never a forced field."""

    name: str
    head: Callable[[Settings], Head]
    used: tuple[str, ...]
    forced: Mapping[str, Any]
    description: str
    fit: Callable[[Job], Fitted] | None = None
    grid: Mapping[str, tuple] | None = None
    admits: Callable[[Settings, int], bool] | None = None
    fixed: Mapping[str, Any] = dataclasses.field(default_factory=dict, kw_only=True)

    def settings(self, grid: list[Settings], classes: int | None = None) -> list[Settings]:
        """This method's runs for the user's grid: unused fields reset to defaults, forced ones set, duplicates
        dropped (order kept); or its own grid over the defaults and forced fields. With ``classes``, only the
        settings it ``admits`` for that many classes (possibly none)."""
        if self.grid is not None:
            runs = expand_grid(self.grid, dataclasses.replace(Settings(), **self.forced))
        else:
            runs = restrict(grid, self.used, self.forced)
        if classes is None or self.admits is None:
            return runs
        return [s for s in runs if self.admits(s, classes)]

    def label_keys(self, keys: Sequence[str]) -> list[str]:
        """The fields a run's ``setting`` label shows: those of ``keys`` (the user's varied grid keys) it uses, or
        its own grid's varied keys."""
        if self.grid is not None:
            return [k for k, vs in self.grid.items() if len(vs) > 1]
        return [k for k in keys if k in self.used]

    def fixed_setting(self, base: Settings, given: Collection[str] = ()) -> Settings:
        """This method's one run without validation: its run for ``base`` (unused fields reset to defaults, forced
        ones set; with its own grid, the defaults and forced fields), then ``fixed`` over it, except the fields the
        user's grid set (``given``) that it uses."""
        if self.grid is not None:
            start = dataclasses.replace(Settings(), **self.forced)
        else:
            start = restrict([base], self.used, self.forced)[0]
        keep = set(given) & set(self.used)
        return dataclasses.replace(start, **{k: v for k, v in self.fixed.items() if k not in keep})


_TRAINED = ("lr", "weight_decay", "epochs", "warmup", "batch_size", "use_aug", "logit_scale")
# CMM publishes no settings: its fixed defaults are the default grid's settings of the best mean rank of test
# accuracy over synthetic modality-gap worlds (bench/fixed_defaults.py; figures in README "Validation-free protocol").
CMM_FIXED = {"lr": 1e-2, "alpha": 2.0, "lam": 10.0, "learn_text": False}
CMM_CE_FIXED = {"lr": 1e-2, "alpha": 0.5, "learn_text": True}

# The registry, in the order tables, plots and summaries list methods (``records.method_rank``).
METHODS: dict[str, Method] = {
    m.name: m
    for m in (
        Method("zeroshot", lambda s: CMMHead(), ("logit_scale",), {"epochs": 0},
               "zero-shot CLIP (the untrained mapper)"),
        Method(
            "linear_probe", lambda s: logreg.LinearProbeHead(), ("c",), {},
            "CoOp's linear probe: L-BFGS logistic regression on the image features, C chosen on validation",
            logreg.fit,
            # CoOp's lpclip only searches C on validation; scikit-learn's default C of the LogisticRegression it fits
            fixed={"c": 1.0},
        ),
        Method(
            "tip_adapter", lambda s: training_free.TipCacheHead(), (), training_free.FORCED,
            "training-free Tip-Adapter: a cache of the shots' features; (beta, alpha) searched on validation",
            training_free.tip_adapter_fit,  # validation-free: its recipe's init beta 1 and the dataset's alpha
        ),
        Method(
            "tip_adapter_f", lambda s: baselines.TipAdapterHead(), (), baselines.FORCED,
            "Tip-Adapter-F with its authors' recipe; (beta, alpha) searched on validation after training",
            baselines.fit,  # validation-free: its recipe's init beta 1 and alpha (configs/<dataset>.yaml), no search
        ),
        Method(
            "gda", lambda s: training_free.GDAHead(), (), training_free.FORCED,
            "training-free GDA: the linear classifier of the class means and one shared covariance, added to "
            "zero-shot with its weight chosen on validation",
            training_free.gda_fit,
            fixed={"alpha": training_free.GDA_NO_HIT_ALPHA},  # upstream's alpha before (without) its search
        ),
        Method(
            "clap", lambda s: clap.ClapHead(), ("logit_scale",), clap.FORCED,
            "CLAP: zero-shot-initialised linear probe with its class-adaptive penalty, its authors' fixed recipe "
            "(no validation)", clap.fit,
        ),
        Method(
            "lp_plus_plus", lambda s: lpp.LPPHead(), (), lpp.FORCED,
            "LP++: linear probe plus class-wise weighted text logits, its authors' step sizes; epoch chosen on "
            "validation", lpp.fit,  # validation-free: its last epoch
        ),
        Method(
            "cross_modal_lp", lambda s: cross_modal.CrossModalHead(), (), cross_modal.FORCED,
            "cross-modal linear probe: text embeddings as extra training samples, its authors' 12-setting grid and "
            "checkpoint chosen on validation", cross_modal.fit, cross_modal.GRID,
            lambda s, classes: cross_modal.admits(s.batch_size, classes),
            fixed=cross_modal.FIXED,  # validation-free: its last iterate
        ),
        Method(
            "cmm_ce", lambda s: CMMHead(s.learn_text), _TRAINED + ("alpha", "learn_text"), {"lam": 0.0},
            "CMM without the triplet loss (ablation)",
            fixed=CMM_CE_FIXED,
        ),
        Method(
            "cmm", lambda s: CMMHead(s.learn_text), _TRAINED + ("alpha", "lam", "margin", "learn_text"), {},
            "Cross-Modal Mapping: CE + lambda * hardest-negative triplet",
            fixed=CMM_FIXED,
        ),
    )
}
DEFAULT_METHODS = ("zeroshot", "linear_probe", "tip_adapter", "gda", "cmm_ce", "cmm")
# run_all.sh's real runs (not its offline check) also train the peers with their own trainers: bench/bench_peers.py
# estimates their 16-shot sweep of the 11 benchmarks at well under a few minutes of one GPU (README "Methods")
REAL_RUN_METHODS = DEFAULT_METHODS + ("clap", "lp_plus_plus", "cross_modal_lp")
VIEW_METHODS = ("tip_adapter_f",)  # also run by default when the training cache holds augmented views


def default_methods(views: bool, real_run: bool = False) -> list[str]:
    """The methods trained when --methods is not given (``real_run``: ``run_all.sh``'s real runs), in ``METHODS``
    order: ``DEFAULT_METHODS`` (or ``REAL_RUN_METHODS``), plus ``VIEW_METHODS`` (whose recipes need augmented
    views) when the training cache holds views."""
    chosen = set(REAL_RUN_METHODS if real_run else DEFAULT_METHODS) | (set(VIEW_METHODS) if views else set())
    return [m for m in METHODS if m in chosen]


def logits(method: str, settings: Settings, params: Params, consts: Params, feats, text, norms=None) -> jax.Array:
    """Class logits of one learned model. feats [N,D] L2-normalised, text [C,D] prototypes, norms [N]: the
    features' norms before normalisation (needed by the heads that read raw features) -> [N,C] float32."""
    hp = {k: jnp.asarray(getattr(settings, k), jnp.float32) for k in DYNAMIC_FIELDS}
    feats, text = jnp.asarray(feats, jnp.float32), jnp.asarray(text, jnp.float32)
    head = METHODS[method].head(settings)
    return head.logits(params, consts, head_inputs(head, feats, norms), feats @ text.T, text, hp)


def predict(method: str, settings: Settings, params: Params, consts: Params, feats, text, norms=None) -> jax.Array:
    """Class predictions of one learned model; arguments as ``logits`` -> [N] int."""
    return jnp.argmax(logits(method, settings, params, consts, feats, text, norms), axis=-1)
