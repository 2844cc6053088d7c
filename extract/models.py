"""Load a frozen open_clip model: a built-in name plus a pretrained tag, a local weights file (a state_dict or
OpenAI's TorchScript archive) or random init; or an `hf-hub:ORG/REPO` / `local-dir:FOLDER` name that brings its
own config and weights.

Custom or tiny architectures come from model-config JSON files registered with open_clip (the files in
`extract/model_configs/` are always registered). Weights trained with QuickGELU (OpenAI's, by their tag's config
or by being an OpenAI TorchScript archive) are always loaded into a QuickGELU model. When weights are not in the
local cache and the hub cannot be reached, loading fails within seconds with a message that says what to do.
"""
from __future__ import annotations

import hashlib
import json
import logging
import os
import pickle
import threading
import urllib.parse
import warnings
import zipfile
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import open_clip
import torch
from open_clip.factory import _find_checkpoint_in_dir, parse_model_name
from open_clip.pretrained import (download_pretrained, download_pretrained_from_hf, get_pretrained_cfg,
                                  list_pretrained_tags_by_model)
from open_clip.transform import PreprocessCfg, image_transform_v2
from open_clip.transformer import QuickGELU
from safetensors import SafetensorError

from extract.errors import ExtractError

RANDOM = "random"  # --pretrained value for random init (tests, demos); stored as pretrained="" in the cache
RANDOM_INIT_SEED = 0  # random init is always seeded, so pretrained="" plus the config identifies the weights
BUNDLED_CONFIGS = Path(__file__).parent / "model_configs"
HUB_TIMEOUT_S = 5.0
HUB_CONFIG = "open_clip_config.json"  # what an hf-hub: repository or a local-dir: folder holds besides the weights
_ARCHIVE_EXTRAS = ("input_resolution", "context_length", "vocab_size")  # OpenAI archive entries that are no weights
_LOAD_ERRORS = (RuntimeError, OSError, ValueError, KeyError, AttributeError, TypeError, EOFError,
                pickle.UnpicklingError, SafetensorError)  # what a weights file that is no state_dict raises
_custom_configs: dict[str, dict[str, Any]] = {}


@dataclass(frozen=True)
class LoadedModel:
    """An eval-mode model with its tokenizer, inference preprocessing and the cache attributes that identify it."""

    model: torch.nn.Module
    tokenizer: Callable[[list[str]], torch.Tensor]
    preprocess: Callable  # PIL image -> [3, H, W] float tensor (open_clip's inference transform)
    preprocess_cfg: dict[str, Any]  # size, mean, std, interpolation, resize_mode, ...
    attrs: dict[str, Any]  # model, pretrained, weights_sha256, model_config, preprocess (JSON), embed_dim,
    # activation, logit_scale, logit_bias

    @property
    def image_size(self) -> tuple[int, int]:
        size = self.preprocess_cfg["size"]
        return (size, size) if isinstance(size, int) else (int(size[0]), int(size[1]))


def register_config(path: str | Path) -> str:
    """Register a model-config JSON with open_clip; returns its model name (the file stem)."""
    path = Path(path)
    try:
        cfg = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise ExtractError(f"{path}: cannot read the model config ({e}); pass an open_clip model-config JSON") from None
    if not isinstance(cfg, dict) or not all(k in cfg for k in ("embed_dim", "vision_cfg", "text_cfg")):
        raise ExtractError(f"{path}: a model config needs 'embed_dim', 'vision_cfg' and 'text_cfg' "
                           "(see open_clip/model_configs/*.json)")
    if _custom_configs.get(path.stem) != cfg:
        open_clip.add_model_config(path)
        _custom_configs[path.stem] = cfg
    return path.stem


def sha256_file(path: str | Path) -> str:
    """Hex sha256 of a file, read in 1 MiB blocks."""
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def load_model(name: str, pretrained: str, *, model_config: str | Path | None = None, device: str = "cpu",
               sha256: str = "", cache_dir: str | None = None) -> LoadedModel:
    """Build `name` with weights from `pretrained`: an open_clip tag, a local weights file, or "random".

    name: a built-in (or registered) open_clip name, or `hf-hub:ORG/REPO` / `local-dir:FOLDER`, whose weights come
    with the name (then `pretrained` must be ""). model_config: a model-config JSON to register first (its stem is
    the model name if `name` is empty). sha256: if given, the weights file (local or downloaded) must have this
    hash. cache_dir: where hub weights are cached (default: the Hugging Face cache).
    """
    for path in sorted(BUNDLED_CONFIGS.glob("*.json")):
        register_config(path)
    if model_config is not None:
        stem = register_config(model_config)
        name = name or stem
    schema, identifier = _parse_name(name)
    if schema:
        if model_config is not None or pretrained:
            option = "--model-config" if model_config is not None else f"--pretrained {pretrained}"
            raise ExtractError(f"{option}: --model {name} brings its own config and weights; drop {option.split()[0]}")
        name, weights, full_config = _named_source(schema, identifier, cache_dir)
        model_cfg, tag, config_text = full_config["model_cfg"], "", json.dumps(full_config, sort_keys=True)
    else:
        if name not in open_clip.list_models():
            raise ExtractError(f"unknown model {name!r}; list the names with `python -c 'import open_clip; "
                               "print(open_clip.list_models())'`, pass --model-config FILE.json, or use "
                               "hf-hub:ORG/REPO or local-dir:FOLDER")
        if not pretrained:
            raise ExtractError(f"--pretrained is required with --model {name}: an open_clip tag "
                               f"({', '.join(list_pretrained_tags_by_model(name)) or 'none'}), a weights file, "
                               "or 'random'")
        weights, tag = _resolve_weights(name, pretrained, cache_dir)
        model_cfg = open_clip.get_model_config(name)
        config_text = json.dumps(_custom_configs[name], sort_keys=True) if name in _custom_configs else ""
    if weights is not None and sha256 and (actual := sha256_file(weights)) != sha256.lower():
        raise ExtractError(f"{weights}: sha256 is {actual}, not the expected {sha256}; download the weights again")
    archive = _read_archive(weights) if weights and not schema and is_torchscript_archive(weights) else None
    quick_gelu = weights_quick_gelu(get_pretrained_cfg(name, tag) if tag else {}, archive)
    if quick_gelu is False and model_cfg.get("quick_gelu"):
        raise ExtractError(f"{weights}: these weights were trained with GELU but {name} is built with QuickGELU; "
                           f"use --model {name.removesuffix('-quickgelu')}")
    by_open_clip = None if archive is not None or schema else tag or (str(weights) if weights else None)
    try:
        model = _build(name, by_open_clip, archive, bool(quick_gelu), device, cache_dir)
    except _LOAD_ERRORS as e:
        if weights is None:
            raise
        raise ExtractError(f"{weights}: cannot load these weights into {name} ({_first_line(e)}); check that the "
                           "file is a state_dict (or OpenAI's TorchScript archive) of this architecture") from None
    model.eval().requires_grad_(False)
    cfg = dict(model.visual.preprocess_cfg)
    preprocess = image_transform_v2(PreprocessCfg(**cfg), is_train=False)
    attrs = {
        "model": name,
        "pretrained": "" if weights is None else tag or weights.name,
        "weights_sha256": sha256_file(weights) if weights else "",
        "model_config": config_text,
        "preprocess": json.dumps(cfg, sort_keys=True),
        "embed_dim": int(model_cfg["embed_dim"]),
        **model_traits(model),
    }
    tokenizer = _from_hub(lambda: open_clip.get_tokenizer(name, cache_dir=cache_dir), f"the tokenizer of {name}",
                          "download it on a machine with internet, or use a model with open_clip's own tokenizer")
    return LoadedModel(model, tokenizer, preprocess, cfg, attrs)


def model_traits(model: torch.nn.Module) -> dict[str, Any]:
    """The model's own activation ("quick_gelu"/"gelu"), logit scale exp(logit_scale) and logit bias (0 if none)."""
    bias = getattr(model, "logit_bias", None)
    return {"activation": "quick_gelu" if any(isinstance(m, QuickGELU) for m in model.modules()) else "gelu",
            "logit_scale": float(model.logit_scale.detach().float().exp()),
            "logit_bias": float(bias.detach().float()) if bias is not None else 0.0}


def weights_quick_gelu(tag_cfg: dict[str, Any], archive: torch.jit.ScriptModule | None) -> bool | None:
    """Whether the weights were trained with QuickGELU: True, False, or None when unknown (the config decides).

    A tag says so in its pretrained config (OpenAI's, DFN, MetaCLIP, ...). A TorchScript archive is OpenAI's
    (QuickGELU, as open_clip's OpenAI loader assumes) unless its modules show GELU (an open_clip model scripted).
    """
    if archive is not None:
        return not any(getattr(m, "original_name", "") == "GELU" for m in archive.modules())
    return True if tag_cfg.get("quick_gelu") else None


def is_torchscript_archive(path: Path) -> bool:
    """Whether `path` is a TorchScript archive (torch.jit.save, OpenAI's RN50.pt, ...) rather than a state_dict."""
    if not zipfile.is_zipfile(path):
        return False
    with zipfile.ZipFile(path) as archive:
        return any(n.rsplit("/", 1)[-1] == "constants.pkl" for n in archive.namelist())


def _read_archive(path: Path) -> torch.jit.ScriptModule:
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", FutureWarning)  # "torch.jit.load is deprecated": still how they load
            return torch.jit.load(str(path), map_location="cpu")
    except RuntimeError as e:
        raise ExtractError(f"{path}: cannot read this TorchScript archive ({_first_line(e)}); "
                           "download the weights again") from None


def _build(name: str, weights: str | None, archive: torch.jit.ScriptModule | None, quick_gelu: bool, device: str,
           cache_dir: str | None) -> torch.nn.Module:
    """open_clip's model `name` with `weights` (a tag or file, loaded by open_clip), an archive's weights, or (for
    hf-hub:/local-dir: names) the weights that come with the name."""
    with torch.random.fork_rng(devices=[]), _hub_offline(), _quiet(archive is not None):
        torch.manual_seed(RANDOM_INIT_SEED)  # weights are local by now: no network in here
        model = open_clip.create_model(name, pretrained=weights, device=device, cache_dir=cache_dir,
                                       force_quick_gelu=quick_gelu)
        if archive is not None:  # OpenAI's key layout is open_clip's CLIP layout
            model.load_state_dict(_archive_weights(archive, model), strict=True)
    return model


def _archive_weights(archive: torch.jit.ScriptModule, model: torch.nn.Module) -> dict[str, torch.Tensor]:
    """The archive's state_dict less what is no weight: OpenAI's extras and the model's non-persistent buffers."""
    transient = {n for n, _ in model.named_buffers()} - set(model.state_dict())  # e.g. attn_mask
    return {k: v for k, v in archive.state_dict().items() if k not in _ARCHIVE_EXTRAS and k not in transient}


def _parse_name(name: str) -> tuple[str | None, str]:
    """("hf-hub" | "local-dir" | None, the rest of the name)."""
    try:
        return parse_model_name(name)
    except ValueError:
        raise ExtractError(f"--model {name!r}: name the repository or folder, e.g. hf-hub:timm/ViT-B-16-SigLIP2 "
                           "or local-dir:/path/to/folder") from None


def _named_source(schema: str, identifier: str, cache_dir: str | None) -> tuple[str, Path, dict[str, Any]]:
    """(full model name, weights file, open_clip_config.json) of an hf-hub: or local-dir: name, all local."""
    if schema == "local-dir":
        folder = Path(identifier).expanduser().resolve()
        config_path, weights = folder / HUB_CONFIG, None
        if config_path.is_file():
            found = _find_checkpoint_in_dir(folder)
            weights = Path(found) if found else None
        if weights is None:
            raise ExtractError(f"local-dir:{folder}: a local-dir: folder needs {HUB_CONFIG} and the weights "
                               "(open_clip_model.safetensors, open_clip_pytorch_model.bin, ...); download them "
                               "with `huggingface-cli download ORG/REPO --local-dir FOLDER`")
        name = f"local-dir:{folder}"
    else:
        hint = (f"download it on a machine with internet (`huggingface-cli download {identifier} --local-dir "
                "FOLDER`) and pass --model local-dir:FOLDER")

        def fetch() -> tuple[Path, Path]:
            return (Path(download_pretrained_from_hf(identifier, filename=HUB_CONFIG, cache_dir=cache_dir)),
                    Path(download_pretrained_from_hf(identifier, cache_dir=cache_dir)))

        config_path, weights = _from_hub(fetch, f"hf-hub:{identifier}", hint)
        name = f"hf-hub:{identifier}"
    try:
        config = json.loads(config_path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise ExtractError(f"{config_path}: cannot read the model config ({e}); download it again") from None
    if not isinstance(config, dict) or not isinstance(config.get("model_cfg"), dict) \
            or "embed_dim" not in config["model_cfg"]:
        raise ExtractError(f"{config_path}: an {HUB_CONFIG} needs a 'model_cfg' with 'embed_dim' (and usually a "
                           "'preprocess_cfg'); this is not an open_clip model folder")
    return name, weights, config


def _resolve_weights(name: str, pretrained: str, cache_dir: str | None) -> tuple[Path | None, str]:
    """(local weights file or None, open_clip tag or ""): check a file, or make sure a tag's weights are cached."""
    if pretrained == RANDOM:
        return None, ""
    tag = pretrained if get_pretrained_cfg(name, pretrained) else ""
    path = _cached_tag_weights(name, tag, cache_dir) if tag else Path(pretrained).expanduser()
    if not path.is_file():
        tags = list_pretrained_tags_by_model(name)
        raise ExtractError(f"{pretrained}: neither a weights file nor a pretrained tag of {name} "
                           f"(tags: {', '.join(tags) or 'none'}); pass a tag, a file path, or 'random'")
    return path, tag


def _cached_tag_weights(name: str, tag: str, cache_dir: str | None) -> Path:
    """The local file of a tag's weights, downloading it only if the hub answers within HUB_TIMEOUT_S."""
    cfg = get_pretrained_cfg(name, tag)
    hint = f" and --model {name}-quickgelu" if cfg.get("quick_gelu") and not name.endswith("-quickgelu") else ""
    return _from_hub(lambda: Path(download_pretrained(cfg, cache_dir=cache_dir)), f"the {name} '{tag}' weights",
                     f"download them on a machine with internet and pass the file with --pretrained "
                     f"/path/to/weights.pt{hint}")


def _from_hub(fetch: Callable[[], Any], what: str, hint: str) -> Any:
    """fetch() from the local hub cache, else from the hub if it answers within HUB_TIMEOUT_S; else `hint`."""
    try:
        with _hub_offline():
            return fetch()
    except Exception:
        pass  # not cached yet
    problem = _hub_unreachable()
    if problem:
        raise ExtractError(f"cannot download {what} ({problem}); {hint}")
    try:
        return fetch()
    except Exception as e:
        raise ExtractError(f"downloading {what} failed ({_first_line(e)}); {hint}") from None


def _first_line(e: BaseException) -> str:
    return (str(e).strip().splitlines() or [type(e).__name__])[0]


def _hub_unreachable() -> str:
    """"" if a TCP connection to the Hugging Face hub (HF_ENDPOINT) opens within HUB_TIMEOUT_S, else why not."""
    from huggingface_hub import constants

    if constants.HF_HUB_OFFLINE:
        return "HF_HUB_OFFLINE is set"
    parts = urllib.parse.urlsplit(constants.ENDPOINT)
    host, port = parts.hostname or "", parts.port or (80 if parts.scheme == "http" else 443)
    result: list[str] = [f"no answer within {HUB_TIMEOUT_S:.0f} s"]

    def probe() -> None:
        import socket

        try:
            socket.create_connection((host, port), timeout=HUB_TIMEOUT_S).close()
            result[0] = ""
        except OSError as e:
            result[0] = f"{host} unreachable: {e.strerror or e}"

    thread = threading.Thread(target=probe, daemon=True)  # getaddrinfo has no timeout of its own
    thread.start()
    thread.join(HUB_TIMEOUT_S)
    return result[0]


@contextmanager
def _hub_offline() -> Iterator[None]:
    """Make huggingface_hub serve from its local cache only (no request, no retries) inside the block."""
    from huggingface_hub import constants

    old = constants.HF_HUB_OFFLINE
    constants.HF_HUB_OFFLINE = True
    try:
        yield
    finally:
        constants.HF_HUB_OFFLINE = old


@contextmanager
def _quiet(quiet: bool) -> Iterator[None]:
    """Hide open_clip's "initialized randomly" warning inside the block when the weights are loaded after it."""
    previous = logging.root.manager.disable
    if quiet:
        logging.disable(logging.WARNING)
    try:
        yield
    finally:
        logging.disable(previous)


def resolve_device(text: str) -> str:
    """'auto' -> CUDA (this process's LOCAL_RANK GPU under torchrun) when available, else 'cpu'; checks the rest."""
    if text == "auto":
        return f"cuda:{int(os.environ.get('LOCAL_RANK', 0))}" if torch.cuda.is_available() else "cpu"
    try:
        device = torch.device(text)
    except RuntimeError:
        raise ExtractError(f"--device {text!r}: expected auto, cpu, cuda or cuda:N") from None
    if device.type == "cuda" and not torch.cuda.is_available():
        raise ExtractError(f"--device {text}: no CUDA GPU is available here; use --device cpu (or auto)")
    if device.type not in ("cpu", "cuda"):
        raise ExtractError(f"--device {text!r}: only cpu and cuda are supported")
    return text
