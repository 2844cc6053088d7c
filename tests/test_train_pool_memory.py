"""The training pool held once: runs with views train seed by seed on a CPU device (each seed's views only) with
the results of one pool of every seed; the pool is one aligned host array a CPU device uses in place; the reader
fills a given array; in-place normalisation equals ``l2_normalize``."""

import jax
import numpy as np
import pytest

from data.cache import open_cache
from data.vectors import l2_normalize, l2_normalize_rows_inplace
from helpers_train import GapWorld, write_gap_cache
from train_jax import experiment
from train_jax.config import Settings
from train_jax.runner import HOST_ALIGN, host_array


@pytest.fixture(scope="module")
def cache(tmp_path_factory):
    world = GapWorld(5, classes=4, dim=16)
    return write_gap_cache(tmp_path_factory.mktemp("pool") / "views.h5", world, train=10, val=4, test=12,
                           aug_views=3)


def test_views_by_seed_equal_one_pool_of_every_seed(cache, monkeypatch):
    task = experiment.load_task(cache, prompt="single")
    grid = [Settings(epochs=3, lr=1e-2, batch_size=4, use_aug=True),
            Settings(epochs=3, lr=3e-2, alpha=2.0, batch_size=4, use_aug=True), Settings(epochs=3, batch_size=4)]
    reads = []
    pool = experiment._pool
    monkeypatch.setattr(experiment, "_pool", lambda task, rows, use_aug, size=0: reads.append(
        (len(rows), use_aug)) or pool(task, rows, use_aug, size))
    assert experiment._views_by_seed(experiment.Placement())  # tests run on CPU
    by_seed = experiment.run_shots(task, 4, [1, 2, 3], ["cmm"], grid, ["lr", "alpha", "use_aug"])
    # the shared pool without views, then each seed's own rows (4 shots x 4 classes) with views
    assert reads[0][1] is False and reads[0][0] > 16 and reads[1:] == [(16, True)] * 3
    monkeypatch.setattr(experiment, "_views_by_seed", lambda place: False)
    reads.clear()
    one_pool = experiment.run_shots(task, 4, [1, 2, 3], ["cmm"], grid, ["lr", "alpha", "use_aug"])
    assert [use_aug for _, use_aug in reads] == [True]
    # different programs (one seed's pool vs all seeds'), the same float32 operations: the equivalence tests' tolerance
    for a, b in zip(by_seed.records, one_pool.records):
        assert (a.method, a.seed, a.settings, a.selected) == (b.method, b.seed, b.settings, b.selected)
        np.testing.assert_allclose(a.test_acc, b.test_acc, atol=1e-9)
        np.testing.assert_allclose(a.final_loss, b.final_loss, rtol=1e-5, atol=1e-6)
        np.testing.assert_allclose(np.array(a.loss_curve, float), np.array(b.loss_curve, float), rtol=1e-5, atol=1e-6)
    for key in by_seed.learned:
        for x, y in zip(jax.tree.leaves(by_seed.learned[key].params), jax.tree.leaves(one_pool.learned[key].params)):
            np.testing.assert_allclose(x, y, rtol=1e-5, atol=1e-6)


def test_host_array_is_aligned_zeroed_and_used_in_place_by_a_cpu_device():
    x = host_array((5, 3, 7))
    assert x.dtype == np.float32 and x.flags.c_contiguous and x.ctypes.data % HOST_ALIGN == 0
    assert not x.any()
    x[:] = np.arange(x.size, dtype=np.float32).reshape(x.shape)
    on_device = jax.device_put(x, jax.devices("cpu")[0])
    assert on_device.unsafe_buffer_pointer() == x.ctypes.data  # no copy
    np.testing.assert_array_equal(np.asarray(on_device), x)


def test_read_into_a_given_array_equals_a_plain_read(cache):
    reader = open_cache(cache)
    rows = np.array([7, 2, 2, 30])
    plain, views = reader.read("train", rows, views=True)
    out = host_array((6, 1 + reader.aug_views("train"), plain.shape[1]))
    got, got_views = reader.read("train", rows, views=True, out=out)
    assert got.base is out.base or np.shares_memory(got, out)
    np.testing.assert_array_equal(out[:4, 0], plain)
    np.testing.assert_array_equal(out[:4, 1:], views)
    assert not out[4:].any()  # rows past the read ones untouched
    with pytest.raises(ValueError, match="cannot hold"):
        reader.read("train", rows, views=True, out=np.zeros((3, 4, plain.shape[1]), np.float32))


def test_in_place_normalisation_equals_l2_normalize():
    x = np.random.default_rng(0).normal(size=(9, 3, 5)).astype(np.float32) * 3
    x[2, 1] = 0.0  # a zero vector stays zero
    expected = l2_normalize(x)
    assert l2_normalize_rows_inplace(x, block=4) is x
    np.testing.assert_array_equal(x, expected)
