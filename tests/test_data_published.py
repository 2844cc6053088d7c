"""data/published.json and its loader: every row checked against the registry and its source, the model matched by
name and weights (tag or sha256), zero-shot rows holding for any shot count, a damaged file a one-line error."""

import json
from pathlib import Path

import pytest

from data.errors import DataError
from data.published import PATH, PROMPTS, SHOTS, load
from data.registry import dataset_names

RN50_SHA = "afeb0e10f9e5a86da6080e35cf09123aca3b358a0c3e3b6c78a7b63bc04b6762"


def test_file_loads_and_every_row_is_sourced():
    published = load()
    assert published.rows and all(r.source in published.sources for r in published.rows)
    assert all(published.sources[s]["url"].startswith("https://") for s in published.sources)
    assert {r.prompt for r in published.rows} <= set(PROMPTS)
    assert all(r.shots is None or r.shots in SHOTS for r in published.rows)


def test_zero_shot_for_rn50_and_vit_b16_on_every_benchmark():
    published = load()
    for model, prompt in (("RN50/openai", "single"), ("RN50/openai", "openai"), ("ViT-B/16/openai", "openai")):
        have = {r.dataset for r in published.rows if (r.model, r.method, r.prompt) == (model, "zeroshot", prompt)}
        missing = set(dataset_names("benchmark")) - have - ({"UCF101"} if prompt == "openai" else set())
        assert not missing, (model, prompt, missing)  # CLIP_benchmark has no UCF101
    # Tip-Adapter-F and GDA at every shot count on every benchmark (RN50)
    for method in ("tip_adapter_f", "gda"):
        for dataset in dataset_names("benchmark"):
            shots = {r.shots for r in published.rows if (r.model, r.method, r.dataset) == ("RN50/openai", method, dataset)}
            assert shots == set(SHOTS), (method, dataset)


def test_values_transcribed_from_the_sources():
    published = load()
    # spot checks against the cited logs (Tip-Adapter exp.log 30d2598, GDA exp.log c83409b, CoOp Table 1)
    assert published.lookup("ImageNet", "RN50/openai", "zeroshot", "ensemble", 4).accuracy == 60.32
    assert published.lookup("ImageNet", "RN50/openai", "zeroshot", "single", 1).accuracy == 58.18
    assert published.lookup("EuroSAT", "RN50/openai", "tip_adapter_f", "single", 16).accuracy == 84.54
    assert published.lookup("FGVCAircraft", "RN50/openai", "gda", "single", 16).accuracy == 40.61
    assert published.lookup("ImageNet", "RN50/openai", "linear_probe", "ensemble", 16).accuracy == 55.87  # any prompt
    assert published.lookup("ImageNet", "RN50/openai", "linear_probe", "single", 8) is None
    assert published.lookup("ImageNet", "RN50/openai", "tip_adapter_f", "single", 16) is None  # upstream: ensemble
    assert published.lookup("OxfordPets", "RN50/openai", "cmm", "single", 16) is None


@pytest.mark.parametrize("attrs, key", [
    ({"model": "RN50-quickgelu", "pretrained": "openai", "weights_sha256": "x"}, "RN50/openai"),
    ({"model": "RN50", "pretrained": "RN50.pt", "weights_sha256": RN50_SHA}, "RN50/openai"),  # OpenAI's own file
    ({"model": "RN50-quickgelu", "pretrained": "my.pt", "weights_sha256": "0" * 64}, None),  # other weights
    ({"model": "RN50", "pretrained": "yfcc15m", "weights_sha256": ""}, None),
    ({"model": "ViT-B-16", "pretrained": "openai", "weights_sha256": ""}, "ViT-B/16/openai"),
    ({"model": "ViT-B-32", "pretrained": "openai", "weights_sha256": ""}, None),  # no published rows: no match
    ({"model": "synthetic", "pretrained": "", "weights_sha256": ""}, None),
])
def test_model_key_needs_name_and_weights(attrs, key):
    assert load().model_key(attrs) == key


def _damaged(tmp_path: Path, edit) -> Path:
    data = json.loads(PATH.read_text())
    edit(data)
    path = tmp_path / "published.json"
    path.write_text(json.dumps(data))
    return path


@pytest.mark.parametrize("edit, message", [
    (lambda d: d["few_shot"][0].update(dataset="Imagenet1k"), "unknown dataset 'Imagenet1k'"),
    (lambda d: d["few_shot"][0].update(source="nowhere"), "unknown source 'nowhere'"),
    (lambda d: d["few_shot"][-1].update(accuracy={"3": 50.0}), "shots '3'"),
    (lambda d: d["few_shot"][0].update(accuracy=155.0), "not a percentage"),
    (lambda d: d.pop("models"), "cannot read it"),
])
def test_damaged_file_is_one_line_error(tmp_path, edit, message):
    with pytest.raises(DataError) as err:
        load(_damaged(tmp_path, edit))
    assert message in str(err.value) and "\n" not in str(err.value) and "published.json" in str(err.value)
