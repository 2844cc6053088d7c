"""One experiment's configuration as data: ``RunConfig``, what ``python -m train_jax`` is asked to do (the CLI
parses its arguments into one; ``experiment.train_and_evaluate`` runs it). ``Settings`` (``config.py``) is one
run's hyperparameters; the grid of them is ``RunConfig.grid``."""

from __future__ import annotations

import dataclasses
import json
from dataclasses import dataclass
from typing import Any, Mapping

from train_jax.config import DEFAULT_GRID, default_grid, grid_from_json, grid_to_json
from train_jax.evaluate import SELECT_MODES, VALIDATION_FREE
from train_jax.methods import DEFAULT_METHODS, default_methods
from train_jax.protocols import FEW_SHOT

DEFAULT_SHOTS = (1, 2, 4, 8, 16)
DEFAULT_SEEDS = (1, 2, 3)
_TUPLES = ("eval_caches", "shots", "seeds", "methods", "transfer_caches")  # tuple fields, JSON lists


@dataclass(frozen=True)
class RunConfig:
    """What to train and evaluate, and where it runs.

    cache: the training cache (.h5); eval_caches: shift caches (test split only); shots: shots per class, as asked
    (``shot_list`` sorts and dedups); fit_shots: drop, with a warning, the shots a class cannot give (else an
    error); seeds: few-shot draw seeds, as asked; methods: names of ``methods.METHODS``, as asked (None: the
    defaults for the cache, ``methods_for``); grid: setting name -> values (``config.parse_grid``; None: the
    default grid for the cache, ``grid_for``); select: one of ``SELECT_MODES`` ("none": validation-free, each
    method at its fixed default);
    compare_to: the reference method of the paired comparisons (``train_jax.compare_report``);
    prompt: "single", "ensemble" or None (the dataset's default); memory_gb: memory for the run axis (None: half
    the free memory); devices: the first N JAX devices (None: all); compile_cache, no_compile_cache: JAX's
    persistent compilation cache folder, or none; protocol: one of ``protocols.PROTOCOLS`` (base-to-new trains
    on the base classes and scores the new ones; cross-dataset scores the selected models on ``transfer_caches``,
    caches of the same model, each against its own prototypes).
    """

    cache: str
    eval_caches: tuple[str, ...] = ()
    shots: tuple[int, ...] = DEFAULT_SHOTS
    fit_shots: bool = False
    seeds: tuple[int, ...] = DEFAULT_SEEDS
    methods: tuple[str, ...] | None = None
    grid: Mapping[str, tuple] | None = None
    select: str = SELECT_MODES[0]
    compare_to: str = "cmm"
    prompt: str | None = None
    memory_gb: float | None = None
    devices: int | None = None
    compile_cache: str | None = None
    no_compile_cache: bool = False
    protocol: str = FEW_SHOT
    transfer_caches: tuple[str, ...] = ()

    @property
    def shot_list(self) -> list[int]:
        """The shots values, sorted, each once."""
        return sorted(set(self.shots))

    @property
    def seed_list(self) -> list[int]:
        """The seeds, each once, in the order given."""
        return list(dict.fromkeys(self.seeds))

    @property
    def method_list(self) -> list[str]:
        """The methods, each once, in the order given (``DEFAULT_METHODS`` when none were given)."""
        return list(dict.fromkeys(self.methods or DEFAULT_METHODS))

    def methods_for(self, views: bool) -> list[str]:
        """The methods trained on a cache with (or without) augmented views: as given, else
        ``methods.default_methods(views)``."""
        return default_methods(views) if self.methods is None else self.method_list

    def grid_for(self, views: bool) -> dict[str, tuple]:
        """The grid searched on a cache with (or without) augmented views: ``grid``, else
        ``config.default_grid(views)``; validation-free (select "none"): ``grid`` or none (nothing is searched:
        its single values override the methods' fixed defaults)."""
        if self.grid:
            return dict(self.grid)
        return {} if self.select == VALIDATION_FREE else default_grid(views)

    @property
    def settings_grid(self) -> dict[str, tuple]:
        """The grid searched: ``grid``, or ``DEFAULT_GRID`` when none was given."""
        return dict(self.grid) if self.grid else dict(DEFAULT_GRID)

    @property
    def budget(self) -> int | None:
        """``memory_gb`` in bytes (None: the runner's default)."""
        return int(self.memory_gb * 2**30) if self.memory_gb else None

    def to_json(self) -> dict[str, Any]:
        """A JSON-able dict, one key per field (the grid as ``config.grid_to_json``)."""
        out = {f.name: getattr(self, f.name) for f in dataclasses.fields(self)}
        return {**out, **{k: list(out[k]) for k in _TUPLES if out[k] is not None},
                "grid": None if self.grid is None else json.loads(grid_to_json(self.grid))}

    @classmethod
    def from_json(cls, data: Mapping[str, Any]) -> "RunConfig":
        """Inverse of ``to_json``."""
        data = dict(data)
        grid = data.pop("grid", None)
        return cls(**{**data, **{k: tuple(data[k]) for k in _TUPLES if data.get(k) is not None}},
                   grid=None if grid is None else grid_from_json(json.dumps(grid)))
