"""ADM's center crop: box-halve while the short side >= 2*size, bicubic to size, center crop."""

from __future__ import annotations

import numpy as np
from PIL import Image


def to_rgb8(image: Image.Image) -> Image.Image:
    """8-bit RGB of an image of any mode, scaling high-bit-depth greys instead of clipping them.

    16-bit (I;16*) and 32-bit integer (I) greys map 0..65535 to 0..255; float greys (F) map
    0..1 to 0..255. Integer values beyond 16 bits and floats outside [0, 1] (HDR) have no one
    right scaling: they raise ValueError, which the shard stage lists as a skip reason.
    """
    if image.mode.startswith("I;16") or image.mode == "I":
        values = np.asarray(image, dtype=np.int64)
        if values.size and (values.min() < 0 or values.max() > 65535):
            raise ValueError(f"{image.mode} pixels span {values.min()}..{values.max()}, beyond 16 bits: "
                             f"convert the image to 8 or 16 bits first")
        grey = np.round(values * (255 / 65535))
    elif image.mode == "F":
        values = np.asarray(image, dtype=np.float64)
        if values.size and not (np.isfinite(values).all() and values.min() >= 0 and values.max() <= 1):
            raise ValueError(f"float pixels span {values.min():g}..{values.max():g}, outside [0, 1] (HDR?): "
                             f"tone-map the image to 8 bits first")
        grey = np.round(values * 255)
    else:
        return image.convert("RGB")
    return Image.fromarray(grey.astype(np.uint8)).convert("RGB")


def adm_center_crop(image: Image.Image, size: int) -> np.ndarray:
    """Crop `image` to size x size RGB uint8 (HWC) exactly as ADM / DiT preprocess ImageNet."""
    image = to_rgb8(image)
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
