"""Model loading: local weights files (state_dicts and TorchScript archives, by path, with sha256), the activation
the weights were trained with, hf-hub:/local-dir: names, the model's logit scale, unknown names, an unreachable hub,
custom configs, files that are no weights."""
from __future__ import annotations

import json
import time
from pathlib import Path

import numpy as np
import open_clip
import pytest
import torch

from extract.errors import ExtractError
from extract.models import (BUNDLED_CONFIGS, is_torchscript_archive, load_model, register_config, resolve_device,
                            sha256_file, weights_quick_gelu)
from helpers_extract import TINY, make_images, make_local_dir, plain_image_features, seeded_tiny, tiny_model


def _features(model: torch.nn.Module, folder: Path) -> np.ndarray:
    if not folder.is_dir():
        make_images(folder, 3, seed=0)
    return plain_image_features(model, tiny_model().preprocess, sorted(folder.iterdir()))


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


@pytest.mark.parametrize("kind", ["bare-tensor.pt", "empty.pt", "random-bytes.pt", "random-bytes.safetensors"])
def test_weights_files_that_are_no_state_dict_are_one_line(tmp_path: Path, kind: str) -> None:
    path = tmp_path / kind
    if kind == "bare-tensor.pt":
        torch.save(torch.zeros(3, 4), path)
    else:
        path.write_bytes(b"" if kind == "empty.pt" else np.random.default_rng(0).bytes(4096))
    with pytest.raises(ExtractError, match=f"{path}: cannot load these weights into {TINY}") as info:
        load_model(TINY, str(path))
    assert "\n" not in str(info.value)


@pytest.mark.parametrize("quick_gelu", [False, True])
def test_torchscript_archive_loads_like_its_state_dict(tmp_path: Path, quick_gelu: bool) -> None:
    source = seeded_tiny(7, force_quick_gelu=quick_gelu)
    archive, state = tmp_path / "scripted.pt", tmp_path / "state.pt"
    torch.jit.save(torch.jit.script(source), archive)
    torch.save(source.state_dict(), state)
    assert is_torchscript_archive(archive) and not is_torchscript_archive(state)
    loaded = load_model(TINY, str(archive))  # TINY's config says GELU: the archive's activation wins
    assert loaded.attrs["activation"] == ("quick_gelu" if quick_gelu else "gelu")
    assert loaded.attrs["pretrained"] == "scripted.pt" and loaded.attrs["weights_sha256"] == sha256_file(archive)
    got = _features(loaded.model, tmp_path / "imgs")
    np.testing.assert_array_equal(got, _features(source, tmp_path / "imgs"))
    as_state = load_model(TINY, str(state))
    assert as_state.attrs["activation"] == "gelu"  # a state_dict does not say; the config decides
    assert np.allclose(got, _features(as_state.model, tmp_path / "imgs"), atol=1e-6) != quick_gelu


def test_gelu_archive_into_a_quickgelu_model_is_refused(tmp_path: Path) -> None:
    archive = tmp_path / "scripted.pt"
    torch.jit.save(torch.jit.script(seeded_tiny(7)), archive)
    cfg = json.loads((BUNDLED_CONFIGS / f"{TINY}.json").read_text())
    config = tmp_path / "tiny-quickgelu.json"
    config.write_text(json.dumps({**cfg, "quick_gelu": True}))
    with pytest.raises(ExtractError, match="trained with GELU but tiny-quickgelu is built with QuickGELU; "
                                           "use --model tiny"):
        load_model("", str(archive), model_config=config)


def test_quickgelu_tag_builds_quickgelu_whatever_the_name(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    assert weights_quick_gelu(open_clip.get_pretrained_cfg("RN50", "openai"), None) is True
    assert weights_quick_gelu(open_clip.get_pretrained_cfg("ViT-B-32", "laion2b_s34b_b79k"), None) is None
    source = seeded_tiny(11, force_quick_gelu=True)
    weights = tmp_path / "openai-like.pt"
    torch.save(source.state_dict(), weights)
    from open_clip import pretrained

    monkeypatch.setitem(pretrained._PRETRAINED, TINY, {"fakeopenai": {"file": str(weights), "quick_gelu": True}})
    with pytest.warns() as caught:  # no "QuickGELU mismatch" warning: the mismatch is corrected, not reported
        loaded = load_model(TINY, "fakeopenai")
        import warnings
        warnings.warn("sentinel")
    assert [str(w.message) for w in caught] == ["sentinel"]
    assert loaded.attrs["activation"] == "quick_gelu" and loaded.attrs["pretrained"] == "fakeopenai"
    np.testing.assert_array_equal(_features(loaded.model, tmp_path / "imgs"), _features(source, tmp_path / "imgs"))


def test_local_dir_name_gives_the_features_of_its_weights(tmp_path: Path) -> None:
    source = seeded_tiny(5)
    config = make_local_dir(tmp_path / "model", source)
    loaded = load_model(f"local-dir:{tmp_path / 'model'}", "")
    assert loaded.attrs["model"] == f"local-dir:{(tmp_path / 'model').resolve()}"
    assert loaded.attrs["pretrained"] == "open_clip_pytorch_model.bin"
    assert loaded.attrs["weights_sha256"] == sha256_file(tmp_path / "model/open_clip_pytorch_model.bin")
    assert json.loads(loaded.attrs["model_config"]) == config and loaded.attrs["embed_dim"] == 32
    assert json.loads(loaded.attrs["preprocess"])["mean"] == [0.5, 0.5, 0.5]
    make_images(tmp_path / "imgs", 3, seed=0)
    paths = sorted((tmp_path / "imgs").iterdir())
    np.testing.assert_array_equal(plain_image_features(loaded.model, loaded.preprocess, paths),
                                  plain_image_features(source, loaded.preprocess, paths))
    assert torch.equal(loaded.tokenizer(["a cat"]), tiny_model().tokenizer(["a cat"]))
    with pytest.raises(ExtractError, match="brings its own config and weights; drop --pretrained"):
        load_model(f"local-dir:{tmp_path / 'model'}", "random")
    with pytest.raises(ExtractError, match="needs open_clip_config.json and the weights"):
        load_model(f"local-dir:{tmp_path / 'imgs'}", "")
    (tmp_path / "model/open_clip_config.json").write_text('{"preprocess_cfg": {}}')
    with pytest.raises(ExtractError, match="needs a 'model_cfg' with 'embed_dim'"):
        load_model(f"local-dir:{tmp_path / 'model'}", "")


def test_hub_name_without_network_fails_fast_with_the_hint(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from huggingface_hub import constants

    monkeypatch.setattr(constants, "ENDPOINT", "http://127.0.0.1:9")  # nothing listens on the discard port
    start = time.monotonic()
    with pytest.raises(ExtractError, match=r"cannot download hf-hub:timm/ViT-B-16-SigLIP2 .*huggingface-cli "
                                           r"download timm/ViT-B-16-SigLIP2 .*--model local-dir:FOLDER") as info:
        load_model("hf-hub:timm/ViT-B-16-SigLIP2", "", cache_dir=str(tmp_path))
    assert time.monotonic() - start < 10 and "\n" not in str(info.value)


def test_the_model_records_its_own_logit_scale_and_bias(tmp_path: Path) -> None:
    attrs = tiny_model().attrs
    assert attrs["logit_scale"] == pytest.approx(1 / 0.07, rel=1e-6) and attrs["logit_bias"] == 0.0
    cfg = json.loads((BUNDLED_CONFIGS / f"{TINY}.json").read_text())
    config = tmp_path / "tiny-biased.json"
    config.write_text(json.dumps({**cfg, "init_logit_scale": np.log(10), "init_logit_bias": -10}))
    attrs = load_model("", "random", model_config=config).attrs
    assert attrs["logit_scale"] == pytest.approx(10, rel=1e-6) and attrs["logit_bias"] == -10


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
