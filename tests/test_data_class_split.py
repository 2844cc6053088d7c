"""CoCoOp's base-to-new class split (data/class_split.py) and the class-subset cache view (data/class_subset.py).

The oracle is a plain-Python transcription of CoCoOp's ``subsample_classes`` (KaiyangZhou/CoOp, commit
1fbb1a6f0eee67d45302bbab6c01192b06412a13, ``datasets/oxford_pets.py``; the other datasets of that repository call
the same function): the sorted set of labels of the first dataset passed (the few-shot train split), n of them;
base = the first ceil(n/2), new = the rest; every split keeps the items of the chosen half, relabelled by their
position in it.
"""

import math
import random
from collections import namedtuple

import numpy as np
import pytest

from data.cache import CacheError, open_cache
from data.class_split import SUBSETS, base_new_split, relabel
from data.class_subset import class_subset
from data.fewshot import sample_shots
from data.registry import dataset_names, get_dataset
from helpers_train import GapWorld, write_gap_cache

Datum = namedtuple("Datum", "impath label classname")


def cocoop_subsample(*splits, subsample):
    """Oracle: CoCoOp's subsample_classes on lists of Datum (see the module docstring)."""
    labels = sorted({item.label for item in splits[0]})
    m = math.ceil(len(labels) / 2)
    chosen = labels[:m] if subsample == "base" else labels[m:]
    new_label = {y: i for i, y in enumerate(chosen)}
    return [[Datum(d.impath, new_label[d.label], d.classname) for d in split if d.label in chosen]
            for split in splits]


def _split(classnames, per_class, rng, name):
    items = [Datum(f"{name}/{c}/{i}.jpg", c, classnames[c]) for c in range(len(classnames)) for i in range(per_class)]
    rng.shuffle(items)
    return items


@pytest.mark.parametrize("dataset", dataset_names("benchmark"))
def test_split_equals_cocoops_subsample_classes_for_every_registered_benchmark(dataset):
    classnames = get_dataset(dataset).classnames
    rng = random.Random(0)
    train, val, test = (_split(classnames, n, rng, s) for s, n in (("train", 2), ("val", 1), ("test", 3)))
    split = base_new_split(np.array([d.label for d in train]))
    for subset in SUBSETS:
        expected = cocoop_subsample(train, val, test, subsample=subset)
        classes = split.classes(subset)
        for got_split, want in zip((train, val, test), expected):
            keep, labels = relabel(np.array([d.label for d in got_split]), classes)
            got = [Datum(d.impath, int(y), d.classname) for d, y in zip([d for d, k in zip(got_split, keep) if k], labels)]
            assert got == want
        # the names a subset's prompts are built from: the first ceil(C/2) class names, then the rest
        m = math.ceil(len(classnames) / 2)
        assert [classnames[c] for c in classes] == list(classnames[:m] if subset == "base" else classnames[m:])
    assert len(split.base) + len(split.new) == len(classnames)


def test_split_counts_and_odd_class_counts():
    assert [len(x) for x in vars(base_new_split(np.arange(37))).values()] == [19, 18]  # OxfordPets
    assert [len(x) for x in vars(base_new_split(np.arange(1000))).values()] == [500, 500]
    split = base_new_split(np.array([4, 2, 2, 9, 7]))  # labels present, sorted: 2 4 7 9
    assert split.base.tolist() == [2, 4] and split.new.tolist() == [7, 9]
    with pytest.raises(ValueError):
        split.classes("all")


def test_relabel_follows_the_given_class_order():
    keep, labels = relabel(np.array([5, 1, 3, 5, 0]), np.array([5, 3]))
    assert keep.tolist() == [True, False, True, True, False] and labels.tolist() == [0, 1, 0]


@pytest.fixture(scope="module")
def cache(tmp_path_factory):
    world = GapWorld(seed=3, classes=7, dim=16)
    return open_cache(write_gap_cache(tmp_path_factory.mktemp("subset") / "c.h5", world, train=5, val=3, test=4))


@pytest.mark.parametrize("subset", SUBSETS)
def test_class_subset_reads_the_subsets_rows_relabelled(cache, subset):
    classes = base_new_split(cache.listing("train").labels).classes(subset)
    view = class_subset(cache, classes)
    assert view.classnames == [cache.classnames[c] for c in classes]
    np.testing.assert_array_equal(view.prototypes(0), cache.prototypes(0)[classes])
    for split in ("train", "val", "test"):
        full, mine = cache.listing(split), view.listing(split)
        rows = np.flatnonzero(np.isin(full.labels, classes))
        np.testing.assert_array_equal(classes[mine.labels], full.labels[rows])
        np.testing.assert_array_equal(mine.paths, full.paths[rows])
        # features of the view's rows (any order) are the file's rows, exactly: the same bytes are read
        pick = np.arange(len(mine.labels))[::-1]
        np.testing.assert_array_equal(view.read(split, pick)[0], cache.read(split, rows[pick])[0])


def test_the_few_shot_draw_of_the_base_view_is_the_full_draw_restricted_to_base_classes(cache):
    """CoCoOp draws the shots of every class, then keeps the base classes': the same rows."""
    full = cache.listing("train")
    split = base_new_split(full.labels)
    view = class_subset(cache, split.base)
    mine = view.listing("train")
    for seed in (1, 2, 3):
        everything = sample_shots(full.labels, full.paths, cache.classnames, 2, seed)
        want = everything[np.isin(full.labels[everything], split.base)]
        got = view.file_rows["train"][sample_shots(mine.labels, mine.paths, view.classnames, 2, seed)]
        np.testing.assert_array_equal(np.sort(got), np.sort(want))


def test_class_subset_refuses_unknown_or_repeated_classes(cache):
    for bad in ([0, 0], [7], [-1]):
        with pytest.raises(CacheError, match="not distinct classes"):
            class_subset(cache, bad)
