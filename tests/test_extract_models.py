"""Model loading: local weights files (by path, with sha256), unknown names, an unreachable hub, custom configs."""
from __future__ import annotations

import json
import time
from pathlib import Path

import numpy as np
import open_clip
import pytest
import torch

from extract.errors import ExtractError
from extract.models import BUNDLED_CONFIGS, load_model, register_config, resolve_device, sha256_file
from helpers_extract import TINY, make_images, plain_image_features, tiny_model


def test_local_weights_file_gives_the_features_of_those_weights(tmp_path: Path) -> None:
    register_config(BUNDLED_CONFIGS / f"{TINY}.json")
    torch.manual_seed(123)
    source = open_clip.create_model(TINY).eval()
    weights = tmp_path / "tiny-weights.pt"
    torch.save(source.state_dict(), weights)
    loaded = load_model(TINY, str(weights))
    assert loaded.attrs["pretrained"] == "tiny-weights.pt" and loaded.attrs["weights_sha256"] == sha256_file(weights)
    make_images(tmp_path / "imgs", 3, seed=0)
    paths = sorted((tmp_path / "imgs").iterdir())
    got = plain_image_features(loaded.model, loaded.preprocess, paths)
    np.testing.assert_array_equal(got, plain_image_features(source, loaded.preprocess, paths))
    random_init = tiny_model()
    assert not np.allclose(got, plain_image_features(random_init.model, random_init.preprocess, paths), atol=1e-3)
    assert load_model(TINY, str(weights), sha256=sha256_file(weights)).attrs["weights_sha256"] == sha256_file(weights)
    with pytest.raises(ExtractError, match="sha256 is"):
        load_model(TINY, str(weights), sha256="0" * 64)


def test_bad_weights_files(tmp_path: Path) -> None:
    with pytest.raises(ExtractError, match="neither a weights file nor a pretrained tag"):
        load_model(TINY, str(tmp_path / "missing.pt"))
    garbage = tmp_path / "garbage.pt"
    garbage.write_bytes(b"not a checkpoint")
    with pytest.raises(ExtractError, match="cannot load these weights"):
        load_model(TINY, str(garbage))
    wrong = tmp_path / "wrong.pt"
    torch.save({"visual.proj": torch.zeros(3)}, wrong)
    with pytest.raises(ExtractError, match="cannot load these weights"):
        load_model(TINY, str(wrong))


def test_random_init_is_seeded() -> None:
    a, b = load_model(TINY, "random"), load_model(TINY, "random")
    assert all(torch.equal(x, y) for x, y in zip(a.model.state_dict().values(), b.model.state_dict().values()))
    assert a.attrs["pretrained"] == "" and a.attrs["weights_sha256"] == "" and a.attrs["embed_dim"] == 32
    assert json.loads(a.attrs["model_config"])["embed_dim"] == 32
    assert json.loads(a.attrs["preprocess"])["size"] == [32, 32]


def test_unknown_model_name_is_one_line() -> None:
    with pytest.raises(ExtractError, match=r"unknown model 'ViT-Q-99'.*list_models") as info:
        load_model("ViT-Q-99", "random")
    assert "\n" not in str(info.value)


def test_unreachable_hub_fails_within_seconds(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from huggingface_hub import constants

    monkeypatch.setattr(constants, "ENDPOINT", "http://127.0.0.1:9")  # nothing listens on the discard port
    start = time.monotonic()
    with pytest.raises(ExtractError, match=r"--pretrained /path/to/weights.pt and --model ViT-B-32-quickgelu"):
        load_model("ViT-B-32", "openai", cache_dir=str(tmp_path))
    assert time.monotonic() - start < 10


def test_model_config_file_registers_a_custom_architecture(tmp_path: Path) -> None:
    cfg = json.loads((Path(__file__).parents[1] / "extract/model_configs/cmm-tiny-vit.json").read_text())
    cfg["embed_dim"] = 16
    path = tmp_path / "my-tiny.json"
    path.write_text(json.dumps(cfg))
    loaded = load_model("", "random", model_config=path)
    assert loaded.attrs["model"] == "my-tiny" and loaded.attrs["embed_dim"] == 16
    assert json.loads(loaded.attrs["model_config"]) == cfg
    bad = tmp_path / "bad.json"
    bad.write_text('{"embed_dim": 4}')
    with pytest.raises(ExtractError, match="needs 'embed_dim', 'vision_cfg' and 'text_cfg'"):
        load_model("", "random", model_config=bad)


def test_device_choice() -> None:
    assert resolve_device("cpu") == "cpu"
    assert resolve_device("auto") == ("cuda:0" if torch.cuda.is_available() else "cpu")
    with pytest.raises(ExtractError, match="expected auto, cpu, cuda"):
        resolve_device("gpu")
    if not torch.cuda.is_available():
        with pytest.raises(ExtractError, match="no CUDA GPU"):
            resolve_device("cuda")
