"""Image modes beyond 8-bit L/RGB: 16-bit grayscale is scaled onto 0..255 (not clipped to white), 32-bit
integer images holding 16-bit values likewise, float images (no known range) are skipped and counted,
and the other PIL modes convert without a warning per file."""
from __future__ import annotations

import warnings

import numpy as np
import pytest
import torch
from PIL import Image

from vitquant.calibration.data import load_calibration, to_mode

CFG = {"input_size": (1, 28, 28), "mean": (0.5,), "std": (0.5,), "crop_pct": 1.0, "interpolation": "bilinear",
       "crop_mode": "center"}
GRADIENT = np.linspace(0, 65535, 28 * 28).reshape(28, 28).astype(np.uint16)


def test_16_bit_grayscale_png_is_scaled_not_saturated(tmp_path):
    Image.fromarray(GRADIENT).save(tmp_path / "g16.png")
    with Image.open(tmp_path / "g16.png") as image:
        assert image.mode.startswith("I")  # what PIL makes of a 16-bit PNG (I;16, or I on older Pillow)
        eight = np.asarray(to_mode(image, "L"))
    # regression: convert("L") clipped every value above 255, a nearly white image (mean 254)
    assert abs(eight.mean() - 127.5) < 1
    assert np.array_equal(eight, np.round(GRADIENT / 257).astype(np.uint8))


def test_16_bit_folder_calibrates_like_its_8_bit_copy(tmp_path):
    (tmp_path / "a").mkdir(), (tmp_path / "b").mkdir()
    rng = np.random.default_rng(0)
    for i in range(8):
        img16 = rng.integers(0, 65536, (28, 28), dtype=np.uint16)
        Image.fromarray(img16).save(tmp_path / "a" / f"{i}.png")
        Image.fromarray(np.round(img16 / 257).astype(np.uint8)).save(tmp_path / "b" / f"{i}.png")
    sixteen = load_calibration(tmp_path / "a", CFG, n=8)
    eight = load_calibration(tmp_path / "b", CFG, n=8)
    assert torch.equal(sixteen.images, eight.images)


def test_big_endian_and_32_bit_integer_images(tmp_path):
    values = np.array([[0, 25700, 65535, 1028]], dtype=">u2")
    big = Image.frombytes("I;16B", (4, 1), values.tobytes())
    assert np.asarray(to_mode(big, "L")).tolist() == [[0, 100, 255, 4]]
    wide = Image.fromarray(GRADIENT.astype(np.int32))
    assert wide.mode == "I"
    assert np.array_equal(np.asarray(to_mode(wide, "L")), np.round(GRADIENT / 257).astype(np.uint8))
    with pytest.raises(ValueError, match="no known value range"):
        to_mode(Image.fromarray((GRADIENT.astype(np.int32) * 4)), "L")  # beyond 16 bits


def test_float_images_are_skipped_and_counted(tmp_path):
    for i in range(8):
        Image.fromarray(np.full((28, 28), 100, np.uint8)).save(tmp_path / f"ok{i}.png")
    for i in range(2):
        Image.fromarray(np.random.rand(28, 28).astype(np.float32)).save(tmp_path / f"float{i}.tif")
    with pytest.warns(UserWarning, match=r"skipped 2 unreadable image file\(s\) \(2 in image mode F"):
        calib = load_calibration(tmp_path, CFG, n=10)
    assert len(calib) == 8 and len(calib.skipped) == 2 and "2 unreadable skipped" in calib.source


@pytest.mark.parametrize("mode", ["1", "P", "LA", "PA", "RGBA", "CMYK", "YCbCr", "LAB", "HSV", "RGBX"])
@pytest.mark.parametrize("target", ["L", "RGB"])
def test_other_modes_convert_quietly(mode, target):
    image = Image.new(mode, (8, 8))
    if mode == "P":
        image.info["transparency"] = b"\x00" * 256  # PIL warns when such a palette goes straight to RGB
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        out = to_mode(image, target)
    assert out.mode == target and out.size == (8, 8)
