"""Hostile input found by machine: Hypothesis drives each command line in-process (`extract run`, `train_jax`,
`train_jax predict`, `train_jax.report`, `data`) with generated arguments (numbers out of range, NaN, infinities,
negatives, empty strings, words, missing, damaged and unwritable paths) on top of a valid command. Every outcome
must be a success (exit 0) or exactly one `error:` line with exit status 2; never a traceback.

Examples are few and derandomized, so the file takes seconds in CI and fails the same way on every machine; set
HYPOTHESIS_PROFILE=thorough for a longer random search.
"""
from __future__ import annotations

import gzip
import itertools
import os
import struct
from pathlib import Path

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from data.__main__ import main as data_main
from extract.__main__ import main as extract_main
from helpers_extract import TINY, make_class_folder
from helpers_train import GapWorld, write_gap_cache
from train_jax.__main__ import main as train_main
from train_jax.report import main as report_main

settings.register_profile("ci", max_examples=15, deadline=None, derandomize=True, print_blob=True,
                          suppress_health_check=[HealthCheck.too_slow, HealthCheck.function_scoped_fixture])
settings.register_profile("thorough", max_examples=int(os.environ.get("HYPOTHESIS_EXAMPLES", 200)), deadline=None,
                          print_blob=True,
                          suppress_health_check=[HealthCheck.too_slow, HealthCheck.function_scoped_fixture])
settings.load_profile(os.environ.get("HYPOTHESIS_PROFILE", "ci"))

NUMBERS = ["-1", "0", "1", "2", "-0", "0.5", "nan", "inf", "-inf", "1e400", "99999999999999999999", str(2**31),
           "", "abc", " "]
PATHS = ["missing", "folder", "garbage", "empty", "under-a-file", "missing-folder/x"]  # see `hostile`


class World:
    """The files every example starts from (made once), and a fresh folder per example."""

    def __init__(self, root: Path):
        self.root = root
        self.images = make_class_folder(root / "imgs", per_class=3)
        self.cache = write_gap_cache(root / "synth.h5", GapWorld(5, classes=3, dim=16), train=4, val=2, test=3)
        self.run = root / "run"
        assert train_main(["--cache", str(self.cache), "--out", str(self.run), "--shots", "1", "--seeds", "1",
                           "--methods", "zeroshot", "cmm", "--grid", "epochs=1", "--prompt", "single",
                           "--no-compile-cache"]) == 0
        self.idx = root / "idx"
        self.idx.mkdir()
        rng = np.random.default_rng(0)
        for split, n in (("train", 40), ("t10k", 20)):
            labels = np.arange(n, dtype=np.uint8) % 10
            images = rng.integers(0, 256, size=(n, 28, 28), dtype=np.uint8)
            for kind, array in (("images", images), ("labels", labels)):
                header = bytes([0, 0, 0x08, array.ndim]) + b"".join(struct.pack(">I", d) for d in array.shape)
                (self.idx / f"{split}-{kind}-idx{array.ndim}-ubyte.gz").write_bytes(
                    gzip.compress(header + array.tobytes()))
        self._count = itertools.count()

    def fresh(self) -> Path:
        """A folder of its own for one example: its outputs, and the hostile files `hostile` names."""
        folder = self.root / "examples" / str(next(self._count))
        (folder / "folder").mkdir(parents=True)
        (folder / "garbage").write_bytes(b"\x89HDF\r\n\x1a\n not really")
        (folder / "empty").write_bytes(b"")
        (folder / "file").write_text("x")
        return folder


def hostile(folder: Path) -> st.SearchStrategy:
    """Paths in an example's folder: missing, a folder, damaged or empty files, under a file, in a missing
    folder."""
    return st.sampled_from(PATHS).map(lambda kind: str(folder / ("file/x" if kind == "under-a-file" else kind)))


@pytest.fixture(scope="module")
def world(tmp_path_factory) -> World:
    return World(tmp_path_factory.mktemp("hostile"))


def outcome(main, argv: list[str], capsys: pytest.CaptureFixture) -> None:
    """Run main(argv); assert success, or one `error:` line and exit 2; never a traceback (an exception escaping
    main fails the test with its traceback)."""
    capsys.readouterr()
    try:
        code = main(argv)
    except SystemExit as e:  # argparse's own errors
        code = e.code
    err = capsys.readouterr().err
    assert "Traceback" not in err, (argv, err)
    if code != 0:
        lines = [ln for ln in err.splitlines() if "error: " in ln]
        assert code == 2 and len(lines) == 1, (argv, code, err)


def mutated(base: dict[str, str | None], values: dict[str, st.SearchStrategy]) -> st.SearchStrategy:
    """argv strategies: `base` (option -> value, None for a flag) with some options given hostile values or left
    out."""
    def build(changes: dict[str, str | None], dropped: list[str]) -> list[str]:
        argv: list[str] = []
        for option, value in {**base, **changes}.items():
            if option in dropped:
                continue
            argv += [option] if value is None else [option, value]
        return argv

    changes = st.dictionaries(st.sampled_from(sorted(values)), st.none(), min_size=1, max_size=3).flatmap(
        lambda keys: st.fixed_dictionaries({k: values[k] for k in keys}))
    return st.builds(build, changes, st.lists(st.sampled_from(sorted(base)), max_size=1))


def numbers(*extra: str) -> st.SearchStrategy:
    return st.sampled_from([*NUMBERS, *extra])


@given(data=st.data())
def test_extract_run(world: World, capsys, data) -> None:
    out = world.fresh()
    base = {"--folder": str(world.images), "--out": str(out / "c.h5"), "--model": TINY, "--pretrained": "random",
            "--workers": "0", "--batch-size": "4", "--no-progress": None}
    no_workers = st.sampled_from([v for v in NUMBERS if v not in ("1", "2")])  # no fork: JAX runs in this process
    values = {"--batch-size": numbers(), "--workers": no_workers, "--aug-views": numbers(), "--aug-seed": numbers(),
              "--pool-shots": numbers(), "--pool-seeds": numbers(), "--split-seed": numbers(),
              "--split-ratio": st.sampled_from(["nan,0.5,0.5", "-1,1,1", "1,0,0", "0.5,0.5", "", "inf,0,0"]),
              "--device": st.sampled_from(["", "bogus", "cuda", "cuda:99", "cpu", "mps"]),
              "--splits": st.sampled_from(["", ",", "train", "nope", "test,test"]),
              "--template": st.sampled_from(["", "{}", "{} {}", "{0}", "a photo"]),
              "--folder": hostile(out), "--out": hostile(out),
              "--classnames": hostile(out), "--templates-file": hostile(out),
              "--dry-run": st.none(), "--overwrite": st.none(), "--float16": st.none()}
    outcome(extract_main, ["run", *data.draw(mutated(base, values))], capsys)


@given(data=st.data())
def test_train_jax(world: World, capsys, data) -> None:
    out = world.fresh()
    base = {"--cache": str(world.cache), "--out": str(out / "run"), "--shots": "1", "--seeds": "1",
            "--methods": "zeroshot", "--grid": "epochs=1", "--prompt": "single", "--no-compile-cache": None}
    grid = st.tuples(st.sampled_from(["epochs", "lr", "batch_size", "alpha", "margin", "warmup", "C", "use_aug",
                                      "nope", ""]), numbers()).map(lambda kv: f"{kv[0]}={kv[1]}")
    values = {"--shots": numbers(), "--seeds": numbers(), "--memory-gb": numbers(), "--devices": numbers(),
              "--grid": grid, "--select": st.sampled_from(["", "mean", "best"]),
              "--cache": hostile(out), "--eval-cache": hostile(out),
              "--out": hostile(out), "--fit-shots": st.none()}
    outcome(train_main, data.draw(mutated(base, values)), capsys)


@given(data=st.data())
def test_train_jax_predict(world: World, capsys, data) -> None:
    out = world.fresh()
    base = {"--run": str(world.run), "--cache": str(world.cache), "--out": str(out / "p.csv")}
    values = {"--shots": numbers(), "--seed": numbers(), "--method": st.sampled_from(["", "cmm", "zeroshot", "x"]),
              "--split": st.sampled_from(["", "test", "train", "nope"]), "--run": hostile(out),
              "--cache": hostile(out), "--out": hostile(out), "--overwrite": st.none()}
    outcome(train_main, ["predict", *data.draw(mutated(base, values))], capsys)


@given(data=st.data())
def test_train_jax_report(world: World, capsys, data) -> None:
    out = world.fresh()
    runs = data.draw(st.lists(st.one_of(st.just(str(world.run)), hostile(out)), min_size=0, max_size=2))
    target = data.draw(st.one_of(st.just(str(out / "summary")), hostile(out)))
    compare = data.draw(st.sampled_from([[], ["--compare-to", "zeroshot"], ["--compare-to", ""],
                                         ["--compare-to", "nope"]]))
    outcome(report_main, [*runs, "--out", target, *compare], capsys)


@given(data=st.data())
def test_data(world: World, capsys, data) -> None:
    out = world.fresh()
    names = st.sampled_from(["", "DTD", "dtd", "imagenet", "FashionMNIST", "nope", "../x"])
    command = data.draw(st.sampled_from(["list", "info", "check", "resolve", "download", "fashion-mnist"]))
    if command == "list":
        argv = ["list", *data.draw(st.sampled_from([[], ["--group", "shift"], ["--group", ""], ["--group", "x"]]))]
    elif command == "info":
        argv = ["info", data.draw(names)]
    elif command == "resolve":
        argv = ["resolve", *data.draw(st.lists(st.one_of(names, st.just("DTD,EuroSAT"), st.just(", ,")),
                                               max_size=3))]
    elif command == "check":
        argv = ["check", data.draw(names), "--root", data.draw(hostile(out))]
    elif command == "download":  # never a registered name: nothing may be fetched
        argv = ["download", data.draw(st.sampled_from(["", "nope", "../x"])), "--root", str(out)]
    else:  # always from local IDX files (valid or not): the Debian package is never fetched
        base = {"--out": str(out / "fm"), "--idx-dir": str(world.idx), "--train-per-class": "2",
                "--val-per-class": "1", "--test-per-class": "1", "--cache": str(out / "deb")}
        values = {"--train-per-class": numbers(), "--val-per-class": numbers(), "--test-per-class": numbers(),
                  "--seed": numbers(), "--out": hostile(out), "--idx-dir": hostile(out)}
        argv = ["fashion-mnist", *data.draw(mutated(base, values).filter(lambda a: "--idx-dir" in a))]
    outcome(data_main, argv, capsys)
