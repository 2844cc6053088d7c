"""Shift-set classes map to training columns by the registry's labels (index / wnid), never merging CLIP's repeated
ImageNet names; user folders map by name, and an ambiguous name is an error."""

import numpy as np
import pytest

from data.registry import get_dataset, prompt_classname
from train_jax.errors import TrainError
from train_jax.evaluate import class_map


def _names(dataset):
    return [prompt_classname(c) for c in get_dataset(dataset).classnames]


IMAGENET = _names("ImageNet")


def test_real_imagenet_list_repeats_two_names():
    assert [i for i, c in enumerate(IMAGENET) if c == "missile"] == [657, 744]
    assert [i for i, c in enumerate(IMAGENET) if c == "sunglasses"] == [836, 837]


@pytest.mark.parametrize("shift", ["ImageNetV2", "ImageNetSketch"])
def test_full_shift_sets_keep_every_column(shift):
    mapped = class_map(IMAGENET, _names(shift), shift, "ImageNet", shift)
    assert mapped.tolist() == list(range(1000))  # 744 and 837 included: no two classes share a column


def test_subset_shift_sets_map_by_wnid():
    wnids = get_dataset("ImageNet").class_folders
    for shift in ("ImageNetA", "ImageNetR"):
        info = get_dataset(shift)
        mapped = class_map(IMAGENET, _names(shift), shift, "ImageNet", shift)
        assert [wnids[i] for i in mapped] == list(info.class_folders)
        assert len(set(mapped.tolist())) == 200
    r_names = _names("ImageNetR")
    assert class_map(IMAGENET, r_names, "r", "ImageNet", "ImageNetR")[r_names.index("missile")] == 657


def test_user_folders_by_name_and_ambiguous_names_refused():
    assert class_map(["Cat", "dog", "bird"], [" bird", "CAT"], "user").tolist() == [2, 0]
    with pytest.raises(TrainError, match="'fish'"):
        class_map(["cat", "dog"], ["fish"], "user")
    # an unregistered copy of ImageNet's list: names cannot tell 657 from 744, so no silent merge
    with pytest.raises(TrainError, match=r"'missile' names training classes \[657, 744\]"):
        class_map(IMAGENET, _names("ImageNetV2"), "v2", "my_imagenet", "my_v2")


def test_registered_name_with_other_classes_falls_back_to_names():
    classes = ["missile", "tench"]
    assert class_map(classes, ["tench"], "x", "ImageNet", "ImageNetR").tolist() == [1]
    assert np.array_equal(class_map(IMAGENET, IMAGENET, "in", "ImageNet", "ImageNet"), np.arange(1000))
