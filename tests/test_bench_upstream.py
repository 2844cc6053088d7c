"""The side-by-side bench: CoOp's search as transcribed visits upstream's C values, upstream Tip-Adapter's search
as transcribed picks what this project's search picks, and the script runs end to end (no timing is checked)."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from bench import bench_upstream, coop_lpclip, tip_adapter_torch
from train_jax.baselines import search


class _Stub:
    """A fitted model whose validation accuracy peaks at log10(C) = 0.3 (rows predicted right: fewer away from it)."""

    def __init__(self, c: float):
        self.right = 100 - int(round(20 * abs(np.log10(c) - 0.3)))

    def predict(self, x):
        return np.where(np.arange(len(x)) < self.right, 0, 1)


def test_coop_search_visits_upstreams_c_values(monkeypatch):
    seen = []
    monkeypatch.setattr(coop_lpclip, "_fit", lambda x, y, c: seen.append(c) or _Stub(c))
    y = np.zeros(100, int)
    result = coop_lpclip.search(np.zeros((4, 2)), np.zeros(4), np.zeros((100, 2)), y, np.zeros((100, 2)), y)
    assert seen[:7] == coop_lpclip.SEARCH_LIST and result.fits == len(seen) == 23
    # best coarse C is 1: [0.1, 10]; 10 wins -> [1, 10]; 1 wins -> [1, 10^0.5]; 10^0.5 wins -> [10^0.25, 10^0.5]
    np.testing.assert_allclose(seen[7:13], [0.1, 10, 1, 10, 1, 10**0.5], rtol=1e-12)
    np.testing.assert_allclose(seen[13:15], [10**0.25, 10**0.5], rtol=1e-12)
    assert abs(np.log10(result.c) - 0.3) < 0.02 and result.test_acc == pytest.approx(100 * _Stub(result.c).right / 100)


def test_tip_adapter_transcription_searches_as_this_project():
    rng = np.random.default_rng(0)
    unit = lambda x: (x / np.linalg.norm(x, axis=-1, keepdims=True)).astype(np.float32)  # noqa: E731
    keys, text = unit(rng.normal(size=(12, 8))), unit(rng.normal(size=(4, 8)))
    labels = np.repeat(np.arange(4), 3)
    val_y = rng.integers(0, 4, 40)
    val = unit(keys[val_y * 3] + 0.8 * rng.normal(size=(40, 8)))
    values = np.eye(4, dtype=np.float32)[labels]
    adapter = torch.nn.Linear(8, 12, bias=False)
    adapter.weight = torch.nn.Parameter(torch.from_numpy(keys))
    with torch.no_grad():
        upstream = tip_adapter_torch.search_hp((7, 3), (200, 20), torch.from_numpy(values), torch.from_numpy(val),
                                               torch.from_numpy(val_y), torch.from_numpy(text.T.copy()), adapter)
    ours = search({"keys": keys}, {"values": values}, val, val_y, text, (7, 3), logit_scale=100.0)
    assert ours == pytest.approx(upstream, rel=1e-5)


def test_bench_upstream_runs_every_pair(capsys):
    argv = ["--classes", "4", "--dim", "8", "--train", "3", "--test", "3", "--views", "2", "--shots", "1", "2",
            "--seeds", "1"]
    assert bench_upstream.main(argv) == 0
    out = capsys.readouterr().out.strip().splitlines()
    assert [line.split(":")[0] for line in out[-3:]] == ["probe", "cmm", "tip"]
    assert "targets: >= 10x CoOp's search" in out[-3]
    rows = [line for line in out if line.startswith("|") and line.split("|")[3].strip() in bench_upstream.PAIRS]
    assert len(rows) == 2 * 3 * 2  # (shots x pairs), printed as measured and in the final table
