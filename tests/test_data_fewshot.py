"""CoOp few-shot sampling: nested draws, counts, determinism, row-order independence, small classes, pools."""

import numpy as np
import pytest

from data.fewshot import FewClassWarning, pool_rows, sample_shots, sample_val, sample_val_from_train

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


def test_draws_are_nested_in_k():
    labels, paths = _split()
    for seed in (1, 2, 3):
        shots = [set(sample_shots(labels, paths, CLASSES, k, seed).tolist()) for k in (1, 2, 4, 7)]
        val = [set(sample_val(labels, paths, CLASSES, k, seed).tolist()) for k in (1, 2, 4, 7)]
        assert all(a < b for a, b in zip(shots, shots[1:]))
        assert all(a < b for a, b in zip(val[:3], val[1:3])) and val[2] == val[3]  # min(K, 4) stops at 4


def test_independent_of_row_order_and_of_str_or_bytes_paths():
    labels_a, paths_a = _split(seed=0)
    labels_b, paths_b = _split(seed=5)  # same images, other row order
    for seed in (1, 2, 3):
        a = sample_shots(labels_a, paths_a, CLASSES, 3, seed)
        b = sample_shots(labels_b, paths_b, CLASSES, 3, seed)
        assert sorted(paths_a[a]) == sorted(paths_b[b])
        as_bytes = np.array([p.encode() for p in paths_b], dtype=object)
        assert np.array_equal(b, sample_shots(labels_b, as_bytes, CLASSES, 3, seed))
        va = sample_val(labels_a, paths_a, CLASSES, 16, seed)
        vb = sample_val(labels_b, paths_b, CLASSES, 16, seed)
        assert sorted(paths_a[va]) == sorted(paths_b[vb])


def test_val_is_min_k_4_and_takes_all_of_small_classes_with_a_warning():
    labels, paths = _split(per_class=(9, 3, 12))
    assert np.bincount(labels[sample_val(labels, paths, CLASSES, 2, 1)]).tolist() == [2, 2, 2]
    with pytest.warns(FewClassWarning, match=r"fewer than 4 val images .*'dog' \(3\)"):
        assert np.bincount(labels[sample_val(labels, paths, CLASSES, 16, 1)]).tolist() == [4, 3, 4]


def test_val_from_train_avoids_the_shots():
    labels, paths = _split()
    for k in (1, 2, 3):
        shots = sample_shots(labels, paths, CLASSES, k, seed=2)
        val = sample_val_from_train(labels, paths, CLASSES, k, 2)
        assert np.bincount(labels[val]).tolist() == [min(k, 4)] * 3
        assert not set(val.tolist()) & set(shots.tolist())
    with pytest.warns(FewClassWarning, match=r"after 5 shots.*'dog' \(2\)"):
        val = sample_val_from_train(labels, paths, CLASSES, 5, 2)  # dog: 7 images, 5 shots, 2 left for 4 val
    assert np.bincount(labels[val]).tolist() == [4, 2, 4]


def test_a_class_smaller_than_k_contributes_all_it_has_with_a_warning():
    labels, paths = _split()
    with pytest.warns(FewClassWarning, match=r"1 classes have fewer than 8 train images .*'dog' \(7\)"):
        rows = sample_shots(labels, paths, CLASSES, 8, seed=1)
    assert np.bincount(labels[rows]).tolist() == [8, 7, 8]


@pytest.mark.parametrize("val_from_train", [False, True])
def test_pool_holds_every_draw_of_its_seeds_up_to_its_shots(val_from_train):
    labels, paths = _split(per_class=(30, 25, 40))
    pool = set(pool_rows(labels, paths, CLASSES, (1, 2), 4, val_from_train).tolist())
    for seed in (1, 2):
        for k in (1, 2, 4):
            assert set(sample_shots(labels, paths, CLASSES, k, seed).tolist()) <= pool
            if val_from_train:
                assert set(sample_val_from_train(labels, paths, CLASSES, k, seed).tolist()) <= pool
    assert len(pool) <= 2 * 3 * (4 + 4 * val_from_train)
    assert not set(sample_shots(labels, paths, CLASSES, 8, 1).tolist()) <= pool
