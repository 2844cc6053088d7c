"""CoOp few-shot sampling: counts, determinism, independence of the cache's row order, clear errors."""

import numpy as np
import pytest

from data.errors import DataError
from data.fewshot import sample_shots, sample_val, sample_val_from_train

CLASSES = ["cat", "dog", "newt"]


def _split(per_class=(9, 7, 12), seed=0):
    labels = np.concatenate([np.full(n, c) for c, n in enumerate(per_class)])
    paths = np.array([f"c{y}/img{i:03d}.jpg" for i, y in enumerate(labels)], dtype=object)
    order = np.random.default_rng(seed).permutation(len(labels))
    return labels[order], paths[order]


def test_k_per_class_deterministic_and_seeded():
    labels, paths = _split()
    rows = sample_shots(labels, paths, CLASSES, 4, seed=1)
    assert np.bincount(labels[rows]).tolist() == [4, 4, 4]
    assert len(set(rows.tolist())) == 12
    assert np.array_equal(rows, sample_shots(labels, paths, CLASSES, 4, seed=1))
    assert not np.array_equal(rows, sample_shots(labels, paths, CLASSES, 4, seed=2))


def test_independent_of_row_order():
    labels_a, paths_a = _split(seed=0)
    labels_b, paths_b = _split(seed=5)  # same images, other row order
    for seed in (1, 2, 3):
        a = sample_shots(labels_a, paths_a, CLASSES, 3, seed)
        b = sample_shots(labels_b, paths_b, CLASSES, 3, seed)
        assert sorted(paths_a[a]) == sorted(paths_b[b])
        va = sample_val(labels_a, paths_a, 3, 16, seed)
        vb = sample_val(labels_b, paths_b, 3, 16, seed)
        assert sorted(paths_a[va]) == sorted(paths_b[vb])


def test_val_is_min_k_4_and_takes_all_of_small_classes():
    labels, paths = _split(per_class=(9, 3, 12))
    assert np.bincount(labels[sample_val(labels, paths, 3, 2, 1)]).tolist() == [2, 2, 2]
    assert np.bincount(labels[sample_val(labels, paths, 3, 16, 1)]).tolist() == [4, 3, 4]


def test_val_from_train_avoids_the_shots():
    labels, paths = _split()
    shots = sample_shots(labels, paths, CLASSES, 3, seed=2)
    val = sample_val_from_train(labels, paths, CLASSES, 3, 2, shots)
    assert np.bincount(labels[val]).tolist() == [3, 3, 3]
    assert not set(val.tolist()) & set(shots.tolist())
    with pytest.raises(DataError, match="class 'cat' has 2 train images left after 7 shots"):
        sample_val_from_train(labels, paths, CLASSES, 7, 2, sample_shots(labels, paths, CLASSES, 7, seed=2))


def test_too_many_shots_names_the_class():
    labels, paths = _split()
    message = r"8 shots requested but class 'dog' has only 7 train images; use --shots <= 7"
    with pytest.raises(DataError, match=message):
        sample_shots(labels, paths, CLASSES, 8, seed=1)
