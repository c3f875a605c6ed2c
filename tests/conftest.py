"""Shared pytest fixtures for the redi tests."""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

# Set at import time, before any test module imports huggingface_hub (through diffusers / timm).
os.environ["HF_HUB_OFFLINE"] = "1"

# --- tiny ImageNet-style image folder (data / shard / CLI tests) ---------------------------------

# class -> [(file name, (width, height))]: odd sizes, PNG and JPEG, some with a long side
# >= 2 * 16 so that a 16 px ADM crop box-halves them first.
TINY_FOLDER_LAYOUT: dict[str, list[tuple[str, tuple[int, int]]]] = {
    "a": [("img0.png", (37, 23)), ("img1.jpg", (50, 41))],
    "b": [("img0.png", (29, 64)), ("img1.png", (33, 33)), ("img2.jpeg", (70, 19))],
    "c": [("img0.jpg", (41, 52))],
}


def _tiny_pixels(rng: np.random.Generator, width: int, height: int) -> np.ndarray:
    """A smooth gradient plus noise, so crops and resizes have something to get wrong."""
    y, x = np.mgrid[0:height, 0:width]
    base = np.stack([x * 255 / max(width - 1, 1), y * 255 / max(height - 1, 1),
                     (x + y) * 127 / max(width + height - 2, 1)], axis=-1)
    noise = rng.normal(0, 25, size=(height, width, 3))
    return np.clip(base + noise, 0, 255).astype(np.uint8)


def write_tiny_image_folder(root: Path, seed: int = 0) -> Path:
    """Write TINY_FOLDER_LAYOUT under `root` and return `root`."""
    rng = np.random.default_rng(seed)
    for name, files in TINY_FOLDER_LAYOUT.items():
        folder = root / name
        folder.mkdir(parents=True, exist_ok=True)
        for file_name, (width, height) in files:
            image = Image.fromarray(_tiny_pixels(rng, width, height))
            fmt = "PNG" if file_name.endswith(".png") else "JPEG"
            image.save(folder / file_name, format=fmt, **({"quality": 90} if fmt == "JPEG" else {}))
    return root


@pytest.fixture
def tiny_image_folder(tmp_path: Path) -> Path:
    """<tmp>/images/<class>/<file>: classes a, b, c with 2, 3 and 1 small RGB PNG/JPEG images."""
    return write_tiny_image_folder(tmp_path / "images")


@pytest.fixture
def tiny_folder_layout() -> dict[str, list[tuple[str, tuple[int, int]]]]:
    """What tiny_image_folder writes: class -> [(file name, (width, height))]."""
    return {name: list(files) for name, files in TINY_FOLDER_LAYOUT.items()}


# --- end of tiny image folder fixtures ------------------------------------------------------------


@pytest.fixture(scope="module")
def single_thread():
    """Small CPU models: intra-op threads only add overhead on a busy machine; restored afterwards."""
    import torch

    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


# --- tiny diffusers VAE (encoder / sampling tests) ------------------------------------------------

def write_tiny_vae(folder: Path, seed: int = 0) -> Path:
    """Save a 2-level AutoencoderKL (f = 2, 4 latent channels) with random weights into `folder`."""
    import torch
    from diffusers import AutoencoderKL

    torch.manual_seed(seed)
    vae = AutoencoderKL(
        in_channels=3, out_channels=3, latent_channels=4,
        down_block_types=["DownEncoderBlock2D"] * 2, up_block_types=["UpDecoderBlock2D"] * 2,
        block_out_channels=[8, 16], layers_per_block=1, norm_num_groups=8, sample_size=16,
    )
    vae.save_pretrained(folder)
    return folder
