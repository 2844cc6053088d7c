"""Load a frozen open_clip model: a name plus a pretrained tag, a local weights file, or random init.

Custom or tiny architectures come from model-config JSON files registered with open_clip (the files in
`extract/model_configs/` are always registered). When pretrained weights are not in the local cache and the hub
cannot be reached, loading fails within seconds with a message that says how to pass a local weights file.
"""
from __future__ import annotations

import hashlib
import json
import os
import pickle
import threading
import urllib.parse
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import open_clip
import torch
from open_clip.pretrained import download_pretrained, get_pretrained_cfg, list_pretrained_tags_by_model
from open_clip.transform import PreprocessCfg, image_transform_v2

from extract.errors import ExtractError

RANDOM = "random"  # --pretrained value for random init (tests, demos); stored as pretrained="" in the cache
RANDOM_INIT_SEED = 0  # random init is always seeded, so pretrained="" plus the config identifies the weights
BUNDLED_CONFIGS = Path(__file__).parent / "model_configs"
HUB_TIMEOUT_S = 5.0
_custom_configs: dict[str, dict[str, Any]] = {}


@dataclass(frozen=True)
class LoadedModel:
    """An eval-mode model with its tokenizer, inference preprocessing and the cache attributes that identify it."""

    model: torch.nn.Module
    tokenizer: Callable[[list[str]], torch.Tensor]
    preprocess: Callable  # PIL image -> [3, H, W] float tensor (open_clip's inference transform)
    preprocess_cfg: dict[str, Any]  # size, mean, std, interpolation, resize_mode, ...
    attrs: dict[str, Any]  # model, pretrained, weights_sha256, model_config, preprocess (JSON), embed_dim

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

    model_config: a model-config JSON to register first (its stem is the model name if `name` is empty).
    sha256: if given, the weights file (local or a tag's download) must have this hash. cache_dir: where tag
    weights are cached (default: the Hugging Face cache).
    """
    for path in sorted(BUNDLED_CONFIGS.glob("*.json")):
        register_config(path)
    if model_config is not None:
        stem = register_config(model_config)
        name = name or stem
    if name not in open_clip.list_models():
        raise ExtractError(f"unknown model {name!r}; list the names with `python -c 'import open_clip; "
                           "print(open_clip.list_models())'`, or pass --model-config FILE.json")
    weights, tag = _resolve_weights(name, pretrained, sha256, cache_dir)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(RANDOM_INIT_SEED)
        try:
            with _hub_offline():  # weights are local by now; never touch the network here
                model = open_clip.create_model(name, pretrained=tag or (str(weights) if weights else None),
                                               device=device, cache_dir=cache_dir)
        except (RuntimeError, OSError, ValueError, KeyError, pickle.UnpicklingError) as e:
            if weights is None:
                raise
            raise ExtractError(f"{pretrained}: cannot load these weights into {name} ({_first_line(e)}); "
                               "check that the file is a state_dict saved from this architecture") from None
    model.eval().requires_grad_(False)
    cfg = dict(model.visual.preprocess_cfg)
    preprocess = image_transform_v2(PreprocessCfg(**cfg), is_train=False)
    attrs = {
        "model": name,
        "pretrained": "" if pretrained == RANDOM else tag or weights.name,
        "weights_sha256": sha256_file(weights) if weights else "",
        "model_config": json.dumps(_custom_configs[name], sort_keys=True) if name in _custom_configs else "",
        "preprocess": json.dumps(cfg, sort_keys=True),
        "embed_dim": int(open_clip.get_model_config(name)["embed_dim"]),
    }
    return LoadedModel(model, open_clip.get_tokenizer(name), preprocess, cfg, attrs)


def _resolve_weights(name: str, pretrained: str, sha256: str, cache_dir: str | None) -> tuple[Path | None, str]:
    """(local weights file or None, open_clip tag or ""): check a file, or make sure a tag's weights are cached."""
    if pretrained == RANDOM:
        return None, ""
    tag = pretrained if get_pretrained_cfg(name, pretrained) else ""
    path = _cached_tag_weights(name, tag, cache_dir) if tag else Path(pretrained).expanduser()
    if not path.is_file():
        tags = list_pretrained_tags_by_model(name)
        raise ExtractError(f"{pretrained}: neither a weights file nor a pretrained tag of {name} "
                           f"(tags: {', '.join(tags) or 'none'}); pass a tag, a file path, or 'random'")
    if sha256 and (actual := sha256_file(path)) != sha256.lower():
        raise ExtractError(f"{path}: sha256 is {actual}, not the expected {sha256}; download the weights again")
    return path, tag


def _cached_tag_weights(name: str, tag: str, cache_dir: str | None) -> Path:
    """The local file of a tag's weights, downloading it only if the hub answers within HUB_TIMEOUT_S."""
    cfg = get_pretrained_cfg(name, tag)
    try:
        with _hub_offline():
            return Path(download_pretrained(cfg, cache_dir=cache_dir))
    except Exception:
        pass  # not cached yet
    problem = _hub_unreachable()
    if problem:
        hint = f" and --model {name}-quickgelu" if cfg.get("quick_gelu") and not name.endswith("-quickgelu") else ""
        raise ExtractError(f"cannot download the {name} '{tag}' weights ({problem}); download them on a machine "
                           f"with internet and pass the file with --pretrained /path/to/weights.pt{hint}")
    try:
        return Path(download_pretrained(cfg, cache_dir=cache_dir))
    except Exception as e:
        raise ExtractError(f"downloading the {name} '{tag}' weights failed ({_first_line(e)}); "
                           "pass a local file with --pretrained /path/to/weights.pt") from None


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
