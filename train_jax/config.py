"""Training settings as data: one frozen dataclass, a grid of them parsed from CLI strings, JSON round trips.

The CMM paper does not publish its optimiser settings, margin, triplet weight or alpha, so none of the defaults
below is "the paper's". Every run trains the whole grid and picks the setting best on the few-shot *validation*
split, never on test (the rule: ``evaluate.select_best``). ``DEFAULT_GRID`` is what is searched when the user gives no
``--grid``; the remaining fields stay at their ``Settings`` defaults.
"""

from __future__ import annotations

import dataclasses
import itertools
import json
import math
from dataclasses import dataclass
from typing import Any, Mapping, Sequence

from train_jax.errors import TrainError

RUN, PROGRAM = "run", "program"  # a field's kind: a per-run array of one compiled program, or fixed per program


def _setting(default: Any, kind: str, help: str, aliases: tuple[str, ...] = (), shown_as: str = "") -> Any:
    """A ``Settings`` field with its kind, CLI aliases, help text and the name labels show (default: its own)."""
    return dataclasses.field(default=default, metadata={"kind": kind, "aliases": aliases, "help": help,
                                                        "shown_as": shown_as})


MAX_EPOCHS = 10_000  # passes over the K-shot set; LP++ and CLAP train 300, more never finishes a grid in time


@dataclass(frozen=True)
class Settings:
    """Hyperparameters of one training run; each field's meaning is its ``help`` metadata (``--help`` lists it)."""

    lr: float = _setting(1e-3, RUN, "peak AdamW learning rate (linear warm-up, then cosine decay to 0)")
    weight_decay: float = _setting(1e-2, RUN, "decoupled AdamW weight decay (times the lr, as PyTorch/optax); pulls "
                                              "dW, b towards 0, i.e. the mapper towards zero-shot CLIP", ("wd",))
    alpha: float = _setting(1.0, RUN, "weight of the mapped term in s * (alpha * v'T^T + v T^T) (Tip-Adapter-F: "
                                      "of its cache logits)")
    lam: float = _setting(10.0, RUN, "weight of the triplet loss (0 = the CE-only ablation)", ("lambda",), "lambda")
    margin: float = _setting(0.2, RUN, "triplet margin on cosine distance")
    epochs: int = _setting(50, RUN, "passes over the K-shot training set (0 = no training: zero-shot)")
    warmup: float = _setting(0.05, RUN, "fraction of the run's steps used for linear warm-up")
    batch_size: int = _setting(256, PROGRAM, "mini-batch size (capped at the training-set size)", ("bs",))
    learn_text: bool = _setting(False, PROGRAM, "also learn the class prototypes (T + dT, dT zero-initialised)")
    use_aug: bool = _setting(False, PROGRAM, "draw one random view per image and epoch from the cached augmented "
                                             "views (plus the original)")
    logit_scale: float = _setting(100.0, RUN, "CLIP logit scale s (default: the model's own, recorded in the "
                                              "cache; 100 for caches without it)", ("s",))
    beta: float = _setting(5.5, RUN, "Tip-Adapter-F sharpness (only used by that method)")
    c: float = _setting(1.0, RUN, "the linear probe's inverse L2 strength (scikit-learn's C; only used by that "
                                  "method)", ("C",), "C")
    adam_eps: float = _setting(1e-8, RUN, "AdamW's epsilon (Tip-Adapter-F's recipe sets 1e-4)")

    def __post_init__(self) -> None:
        checks = {  # setting: (valid?, the valid range in words)
            "lr": (self.lr > 0, "> 0"),
            "weight_decay": (self.weight_decay >= 0, ">= 0"),
            "alpha": (self.alpha >= 0, ">= 0"),
            "lam": (self.lam >= 0, ">= 0"),
            "margin": (0 <= self.margin <= 2, "0 to 2, a cosine distance"),
            "epochs": (0 <= self.epochs <= MAX_EPOCHS, f"0 to {MAX_EPOCHS}"),
            "warmup": (0 <= self.warmup < 1, "0 to < 1"),
            "batch_size": (self.batch_size >= 1, ">= 1"),
            "logit_scale": (self.logit_scale > 0, "> 0"),
            "beta": (self.beta >= 0, ">= 0"),
            "c": (self.c > 0, "> 0"),
            "adam_eps": (self.adam_eps > 0, "> 0"),
        }
        for name, (ok, valid) in checks.items():
            value = getattr(self, name)
            if isinstance(value, float) and not math.isfinite(value):
                raise TrainError(f"setting {name}={value!r} is not a finite number; no run could finish with it")
            if not ok:
                raise TrainError(f"setting {name}={value!r} is out of range ({valid}); see --help")

    def to_dict(self) -> dict[str, Any]:
        """Plain JSON-able dict of all fields."""
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> "Settings":
        """Inverse of ``to_dict``; unknown keys are an error, missing keys take the defaults."""
        return cls(**{_field_name(k): _parse_value(_field_name(k), v) for k, v in data.items()})

    def label(self, keys: Sequence[str]) -> str:
        """Short text of the given fields, e.g. ``"lr=0.001 alpha=2"`` (CSV/Markdown ``setting`` column)."""
        return " ".join(f"{ALIASES_OUT.get(k, k)}={_fmt(getattr(self, k))}" for k in keys)


FIELDS = {f.name: f for f in dataclasses.fields(Settings)}
# Fields that may differ between runs of one compiled program (per-run arrays); the others fix the program.
DYNAMIC_FIELDS = tuple(name for name, f in FIELDS.items() if f.metadata["kind"] == RUN)
ALIASES = {alias: name for name, f in FIELDS.items() for alias in f.metadata["aliases"]}
ALIASES_OUT = {name: f.metadata["shown_as"] for name, f in FIELDS.items() if f.metadata["shown_as"]}

# Searched on the validation split when no --grid is given: 2 learning rates x 3 alphas x 2 triplet
# weights x frozen or learned prototypes = 24 settings (the CE-only ablation collapses the lambda axis to 12); the
# linear probe searches C over 1e-6 .. 1e6 in half decades, the range of CoOp's coarse C grid at a step finer than
# its binary search's first. The CE acts on logits scaled by s = 100 while the triplet loss is in cosine units, so
# lambda needs to be of order 1-10 for the triplet term to matter (on synthetic modality-gap data lambda = 10 was
# clearly better). The paper's method figure marks both W and the text features T as trainable while its abstract
# calls the frozen text embeddings the prototypes: learn_text runs both readings and validation chooses.
DEFAULT_GRID: dict[str, tuple] = {"lr": (1e-2, 1e-3), "alpha": (0.5, 1.0, 2.0), "lam": (1.0, 10.0),
                                  "learn_text": (False, True),
                                  "c": tuple(float(f"{10 ** (k / 2):.6g}") for k in range(-12, 13))}
VIEWS_GRID: dict[str, tuple] = {"use_aug": (False, True)}  # added to the default grid when the cache has views


def default_grid(views: bool) -> dict[str, tuple]:
    """The grid searched when no --grid is given: ``DEFAULT_GRID``, plus ``VIEWS_GRID`` (training on the plain
    features or on a random cached view per image and epoch) when the training cache holds augmented views."""
    return {**DEFAULT_GRID, **(VIEWS_GRID if views else {})}


def _field_name(key: str) -> str:
    name = ALIASES.get(key, key)
    if name not in FIELDS:
        valid = ", ".join(sorted(set(FIELDS) | set(ALIASES)))
        raise TrainError(f"unknown setting {key!r}; valid settings: {valid}")
    return name


def _parse_value(name: str, value: Any) -> Any:
    kind = FIELDS[name].type
    try:
        if kind == "bool":
            if isinstance(value, str):
                if value.lower() not in ("1", "0", "true", "false", "yes", "no"):
                    raise ValueError(value)
                return value.lower() in ("1", "true", "yes")
            return bool(value)
        if kind == "int":
            as_float = float(value)
            if as_float != int(as_float):
                raise ValueError(value)
            return int(as_float)
        return float(value)
    except (TypeError, ValueError, OverflowError):  # OverflowError: an int setting of "1e400" (inf)
        raise TrainError(f"setting {name}={value!r} is not a valid {kind}") from None


def _fmt(value: Any) -> str:
    if isinstance(value, bool):
        return str(int(value))
    return f"{value:g}" if isinstance(value, float) else str(value)


def grid_keys_help() -> str:
    """One line per setting for ``--help``: ``name (aliases): help``."""
    return "\n".join(f"  {name}{' (' + ', '.join(f.metadata['aliases']) + ')' if f.metadata['aliases'] else ''}: "
                     f"{f.metadata['help']}" for name, f in FIELDS.items())


def parse_grid(specs: Sequence[str]) -> dict[str, tuple]:
    """Parse CLI strings like ``["lr=1e-3,1e-4", "alpha=1,2"]`` into ``{"lr": (0.001, 0.0001), "alpha": (1.0, 2.0)}``.

    A key may appear once; ``lambda``, ``wd``, ``bs`` and ``s`` are accepted aliases.
    """
    grid: dict[str, tuple] = {}
    for spec in specs:
        key, sep, values = spec.partition("=")
        if not sep or not values:
            raise TrainError(f"grid entry {spec!r} is not KEY=V1,V2,...; e.g. lr=1e-3,1e-4")
        name = _field_name(key.strip())
        if name in grid:
            raise TrainError(f"grid key {key!r} given twice; list all its values in one entry")
        grid[name] = tuple(_parse_value(name, v.strip()) for v in values.split(","))
    return grid


def expand_grid(grid: Mapping[str, Sequence[Any]], base: Settings = Settings()) -> list[Settings]:
    """All combinations of the grid values on top of ``base``; the first key varies slowest."""
    keys = list(grid)
    return [dataclasses.replace(base, **dict(zip(keys, combo))) for combo in itertools.product(*grid.values())]


def grid_to_json(grid: Mapping[str, Sequence[Any]]) -> str:
    """JSON text of a grid (keys are field names)."""
    return json.dumps({k: list(v) for k, v in grid.items()})


def grid_from_json(text: str) -> dict[str, tuple]:
    """Inverse of ``grid_to_json``."""
    data = json.loads(text)
    return {_field_name(k): tuple(_parse_value(_field_name(k), v) for v in vs) for k, vs in data.items()}
