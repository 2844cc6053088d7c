"""Image decoding: transparent images of every mode are composited on one background before preprocessing."""
from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from extract.images import BACKGROUND, ImageRows
from helpers_extract import BATCH_ATOL, tiny_model


def _files(folder: Path) -> dict[str, str]:
    """One visible picture (grey pixels, half of them transparent) saved as RGBA, LA, P + transparency, L + tRNS
    and as the opaque RGB picture on the documented background."""
    rng = np.random.default_rng(0)
    grey = rng.integers(0, 255, size=(40, 48), dtype=np.uint8)  # < 255: palette index 255 is the transparent one
    shown = rng.random((40, 48)) > 0.5
    alpha = np.where(shown, 255, 0).astype(np.uint8)
    visible = np.where(shown[..., None], grey[..., None], np.array(BACKGROUND, dtype=np.uint8)).astype(np.uint8)
    Image.fromarray(np.stack([grey, grey, grey, alpha], axis=-1), "RGBA").save(folder / "rgba.png")
    Image.fromarray(np.stack([grey, alpha], axis=-1), "LA").save(folder / "la.png")
    palette = Image.fromarray(np.where(shown, grey, 255).astype(np.uint8), "P")
    palette.putpalette([v for i in range(256) for v in (i, i, i)])
    palette.save(folder / "p.png", transparency=255)
    Image.fromarray(np.where(shown, grey, 255).astype(np.uint8), "L").save(folder / "l_trns.png", transparency=255)
    Image.fromarray(visible, "RGB").save(folder / "rgb.png")
    return {mode: f"{mode}.png" for mode in ("rgba", "la", "p", "l_trns", "rgb")}


@torch.inference_mode()
def test_transparent_modes_give_the_features_of_the_visible_picture(tmp_path: Path) -> None:
    files = _files(tmp_path)
    loaded = tiny_model()
    rows = ImageRows(tmp_path, list(files.values()), list(range(len(files))),
                     loaded.preprocess, None, loaded.image_size)
    items = [rows[i] for i in range(len(files))]
    assert all(item["error"] == "" for item in items)
    features = torch.nn.functional.normalize(
        loaded.model.encode_image(torch.stack([item["image"] for item in items])), dim=-1).numpy()
    for mode, i in zip(files, range(len(files))):
        assert np.array_equal(items[i]["image"].numpy(), items[-1]["image"].numpy()), mode  # the same pixels, so
        # the same features up to the rounding of another position in the batch
        np.testing.assert_allclose(features[i], features[-1], atol=BATCH_ATOL, rtol=0, err_msg=mode)
    assert Image.open(tmp_path / "p.png").mode == "P" and Image.open(tmp_path / "l_trns.png").info["transparency"]


@pytest.mark.parametrize("mode", ["RGBA", "LA"])
def test_opaque_images_with_alpha_channel_keep_their_pixels(tmp_path: Path, mode: str) -> None:
    pixels = np.random.default_rng(1).integers(0, 256, size=(8, 8, len(mode) - 1), dtype=np.uint8)
    full = np.concatenate([pixels, np.full((8, 8, 1), 255, np.uint8)], axis=-1)
    Image.fromarray(full, mode).save(tmp_path / "x.png")
    from extract.images import load_rgb

    expected = np.asarray(Image.fromarray(full[..., :-1].squeeze(-1) if mode == "LA" else full[..., :3]).convert("RGB"))
    assert np.array_equal(np.asarray(load_rgb(tmp_path / "x.png")), expected)
