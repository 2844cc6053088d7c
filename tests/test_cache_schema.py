"""The cache schema is declared once (``data.cache_schema.SCHEMA``): the writer's files hold exactly it, the README
table names it, and the reading stage never loads the writer."""
from __future__ import annotations

import ast
import re
import subprocess
import sys
from pathlib import Path

import h5py
import numpy as np

from data.cache_schema import SCHEMA, required
from data.cache_writer import write_cache

REPO = Path(__file__).resolve().parents[1]


def _write(path: Path, aug_views: int) -> Path:
    rng = np.random.default_rng(0)
    unit = lambda x: (x / np.linalg.norm(x, axis=-1, keepdims=True)).astype(np.float32)  # noqa: E731
    splits = {}
    for name, n in (("train", 5), ("test", 3)):
        rows = {"features": unit(rng.normal(size=(n, 4))), "labels": np.arange(n) % 2,
                "paths": np.array([f"{name}/{i}.png" for i in range(n)])}
        if aug_views and name == "train":
            rows["aug_features"] = unit(rng.normal(size=(n, aug_views, 4)))
        splits[name] = rows
    return write_cache(path, attrs={"dataset": "toy", "model": "m"}, classnames=["a", "b"], templates=["{}."],
                       text_features=unit(rng.normal(size=(2, 1, 4)))[:, :, :], splits=splits)


def test_written_file_holds_exactly_the_schema(tmp_path: Path) -> None:
    path = _write(tmp_path / "c.h5", aug_views=2)
    with h5py.File(path, "r") as f:
        found = set()
        f.visititems(lambda name, obj: found.add(name) if isinstance(obj, h5py.Dataset) else None)
        expected = set()
        for spec in SCHEMA:
            for split in (("train", "test") if spec.per_split else ("",)):
                if not spec.applies(split, 2):
                    continue
                expected.add(spec.at(split))
                d = f[spec.at(split)]
                dims = {"C": 2, "P": 1, "D": 4, "A": 2, "N": 5 if split == "train" else 3,
                        "M": 5 if split == "train" else 3, "B": 0}
                assert d.shape == spec.shape(dims), spec.path
                assert d.fletcher32 == spec.checksummed, spec.path
                assert (d.maxshape[0] is None) == (spec.growable or d.shape[0] == 0), spec.path
                if spec.dtype == "str":
                    assert h5py.check_string_dtype(d.dtype) is not None, spec.path
                elif spec.dtype == "features":
                    assert d.dtype == np.float32, spec.path
                else:
                    assert d.dtype == np.dtype(spec.dtype), spec.path
                if spec.checksummed:
                    assert d.chunks[0] == (spec.chunk_rows if spec.growable else min(d.shape[0], spec.chunk_rows))
        assert found == expected


def test_a_cache_without_views_has_no_views_dataset(tmp_path: Path) -> None:
    with h5py.File(_write(tmp_path / "c.h5", aug_views=0), "r") as f:
        assert "aug_features" not in f["splits/train"]
    assert {s.name for s in required(per_split=True)} == {"labels", "paths", "status", "slot", "features", "norms"}


def test_readme_table_names_every_dataset() -> None:
    text = (REPO / "README.md").read_text()
    table = text[text.index("## Cache schema"):]
    cells = set(re.findall(r"`/([a-z_/<>{}]+)`", table))
    for spec in SCHEMA:
        assert "/" + spec.path.replace("{split}", "<split>") in {"/" + c for c in cells}, spec.path


def test_train_jax_only_reads() -> None:
    writer_names = {"CacheWriter", "write_cache", "reopen_complete", "complete_status", "listing_diff"}
    for path in sorted((REPO / "train_jax").glob("*.py")):
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.ImportFrom) and node.module:
                assert node.module != "data.cache_writer", path
                if node.module == "data.cache":
                    assert not writer_names & {a.name for a in node.names}, path
            if isinstance(node, ast.Import):
                assert all(a.name != "data.cache_writer" for a in node.names), path
    code = "import sys, data.cache, train_jax.experiment; print('data.cache_writer' in sys.modules)"
    out = subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True, check=True,
                         env={"PYTHONPATH": str(REPO), "JAX_PLATFORMS": "cpu", "PATH": "/usr/bin:/bin"})
    assert out.stdout.strip() == "False"
