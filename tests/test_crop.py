"""adm_center_crop against an independent reimplementation of ADM's center_crop_arr."""

from __future__ import annotations

from fractions import Fraction

import numpy as np
import pytest
from PIL import Image

from redi.data.crop import adm_center_crop

SIZES = [(1000, 333), (333, 1000), (257, 300), (300, 257), (513, 512), (64, 64)]  # (width, height)


def reference_crop(image: Image.Image, size: int) -> np.ndarray:
    """ADM's crop written differently: count the halvings first, size everything arithmetically,
    and cut with Image.crop instead of slicing an array."""
    rgb = image.convert("RGB")
    width, height = rgb.size
    # The loop halves while the short side m_k = m >> k is >= 2 * size, i.e. while
    # m >= size * 2^(k+1): that is floor(log2(m // size)) times (0 when m < 2 * size).
    halvings = max(0, (min(width, height) // size).bit_length() - 1)
    for k in range(1, halvings + 1):
        rgb = rgb.resize((width >> k, height >> k), resample=Image.BOX)  # floor(w/2) each time
    width, height = rgb.size
    short = min(width, height)
    target = (round(Fraction(width * size, short)), round(Fraction(height * size, short)))
    rgb = rgb.resize(target, resample=Image.BICUBIC)
    left, top = (target[0] - size) // 2, (target[1] - size) // 2
    return np.asarray(rgb.crop((left, top, left + size, top + size)))


def noise_image(width: int, height: int, mode: str = "RGB", seed: int = 0) -> Image.Image:
    rng = np.random.default_rng(seed)
    if mode == "L":
        return Image.fromarray(rng.integers(0, 256, (height, width), dtype=np.uint8), mode="L")
    if mode == "RGBA":
        return Image.fromarray(rng.integers(0, 256, (height, width, 4), dtype=np.uint8), mode="RGBA")
    if mode == "P":
        image = Image.fromarray(rng.integers(0, 256, (height, width), dtype=np.uint8), mode="L")
        image = image.convert("P")
        image.putpalette(rng.integers(0, 256, 768, dtype=np.uint8).tolist())
        return image
    return Image.fromarray(rng.integers(0, 256, (height, width, 3), dtype=np.uint8), mode="RGB")


def check_output(out: np.ndarray, size: int) -> None:
    assert isinstance(out, np.ndarray)
    assert out.shape == (size, size, 3)
    assert out.dtype == np.uint8
    assert out.flags["C_CONTIGUOUS"]


@pytest.mark.parametrize("size", [256, 32])
@pytest.mark.parametrize("wh", SIZES, ids=[f"{w}x{h}" for w, h in SIZES])
def test_matches_reference_rgb(wh, size):
    image = noise_image(*wh, seed=wh[0] * 7 + wh[1])
    out = adm_center_crop(image, size)
    check_output(out, size)
    np.testing.assert_array_equal(out, reference_crop(image, size))


@pytest.mark.parametrize("mode", ["L", "RGBA", "P"])
@pytest.mark.parametrize("wh", [(1000, 333), (257, 300), (64, 64)], ids=["1000x333", "257x300", "64x64"])
@pytest.mark.parametrize("size", [256, 32])
def test_matches_reference_other_modes(mode, wh, size):
    image = noise_image(*wh, mode=mode, seed=3)
    out = adm_center_crop(image, size)
    check_output(out, size)
    np.testing.assert_array_equal(out, reference_crop(image, size))
    # converting to RGB first gives the very same crop
    np.testing.assert_array_equal(out, adm_center_crop(image.convert("RGB"), size))


def test_grayscale_gives_equal_channels():
    out = adm_center_crop(noise_image(300, 257, mode="L"), 32)
    np.testing.assert_array_equal(out[..., 0], out[..., 1])
    np.testing.assert_array_equal(out[..., 0], out[..., 2])


def test_input_image_is_left_unchanged():
    image = noise_image(300, 257)
    before = np.asarray(image).copy()
    adm_center_crop(image, 32)
    assert image.size == (300, 257) and image.mode == "RGB"
    np.testing.assert_array_equal(np.asarray(image), before)


def test_exact_size_is_identity():
    image = noise_image(32, 32)
    np.testing.assert_array_equal(adm_center_crop(image, 32), np.asarray(image))


@pytest.mark.parametrize("wh", [(40, 32), (32, 41)])
def test_short_side_equal_to_size_is_a_plain_center_crop(wh):
    # scale 1: no resampling at all, only the centre cut, offset (long - size) // 2
    pixels = np.asarray(noise_image(*wh))
    out = adm_center_crop(Image.fromarray(pixels), 32)
    if wh[0] > wh[1]:
        np.testing.assert_array_equal(out, pixels[:, 4:36])
    else:
        np.testing.assert_array_equal(out, pixels[4:36, :])


@pytest.mark.parametrize("factor", [2, 4])
def test_halving_averages_blocks(factor):
    # 64x64 -> 32 halves once, 128x128 -> 32 halves twice; the bicubic step is then a no-op,
    # so each output pixel is the mean of a factor x factor block, within Pillow's 8-bit rounding
    # (at most 1 per halving).
    side = 32 * factor
    pixels = np.asarray(noise_image(side, side, seed=factor))
    out = adm_center_crop(Image.fromarray(pixels), 32).astype(np.float64)
    block_mean = pixels.reshape(32, factor, 32, factor, 3).mean(axis=(1, 3))
    assert np.abs(out - block_mean).max() <= np.log2(factor)


def test_just_below_twice_size_is_not_halved():
    # short side 63 < 2 * 32: a single bicubic resize 63 -> 32, no BOX step
    image = noise_image(63, 63, seed=5)
    expected = np.asarray(image.resize((32, 32), resample=Image.BICUBIC))
    np.testing.assert_array_equal(adm_center_crop(image, 32), expected)
