"""ADM's center crop: box-halve while the short side >= 2*size, bicubic to size, center crop."""

from __future__ import annotations

import numpy as np
from PIL import Image


def adm_center_crop(image: Image.Image, size: int) -> np.ndarray:
    """Crop `image` to size x size RGB uint8 (HWC) exactly as ADM / DiT preprocess ImageNet."""
    image = image.convert("RGB")
    while min(image.size) >= 2 * size:
        image = image.resize((image.width // 2, image.height // 2), resample=Image.BOX)
    scale = size / min(image.size)
    image = image.resize(
        (round(image.width * scale), round(image.height * scale)), resample=Image.BICUBIC
    )
    pixels = np.asarray(image)
    top = (pixels.shape[0] - size) // 2
    left = (pixels.shape[1] - size) // 2
    return np.ascontiguousarray(pixels[top : top + size, left : left + size])
