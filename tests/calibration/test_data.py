"""Calibration/evaluation data sources: folders, tensors, loaders, the bundled MNIST-5k split, and their errors."""
from __future__ import annotations

import warnings

import numpy as np
import pytest
import torch
from PIL import Image
from timm.models.vision_transformer import VisionTransformer
from torch.utils.data import DataLoader, TensorDataset

from vitquant.calibration import data_config_for, load_calibration, load_labeled
from vitquant.datasets import mnist5k_split
from vitquant.errors import VitquantError

MNIST_CFG = {"input_size": (1, 28, 28), "interpolation": "bilinear", "mean": (0.1307,), "std": (0.3081,),
             "crop_pct": 1.0, "crop_mode": "center"}
EXACT = "donot_use_mm_for_euclid_dist"  # the matmul form of cdist loses ~1e-2 to cancellation


def tiny_vit() -> VisionTransformer:
    return VisionTransformer(img_size=32, patch_size=8, embed_dim=32, depth=1, num_heads=2, num_classes=3)


@pytest.fixture(scope="module")
def cfg32() -> dict:
    model = tiny_vit()
    model.pretrained_cfg = {"input_size": [3, 32, 32], "mean": [0.5, 0.5, 0.5], "std": [0.25, 0.25, 0.25],
                            "crop_pct": 1.0, "interpolation": "bilinear"}
    return data_config_for(model)


def write_images(folder, count, start=0, ext="png", size=32):
    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(start)
    for i in range(start, start + count):
        pixels = rng.integers(0, 256, (size, size, 3), dtype=np.uint8)
        Image.fromarray(pixels).save(folder / f"img{i:03d}.{ext}")


def write_corrupt(path):
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(np.random.default_rng(7).integers(0, 256, 300, dtype=np.uint8).tobytes())


def test_data_config_for_uses_pretrained_cfg(cfg32):
    assert cfg32["input_size"] == (3, 32, 32)
    assert cfg32["mean"] == (0.5, 0.5, 0.5) and cfg32["std"] == (0.25, 0.25, 0.25)
    assert cfg32["interpolation"] == "bilinear" and cfg32["crop_pct"] == 1.0
    assert set(cfg32) >= {"input_size", "interpolation", "mean", "std", "crop_pct", "crop_mode"}


def test_data_config_for_bare_vit_infers_size_and_warns():
    with pytest.warns(UserWarning, match="ImageNet normalization"):
        cfg = data_config_for(tiny_vit())
    assert cfg["input_size"] == (3, 32, 32)


def test_flat_folder(tmp_path, cfg32):
    write_images(tmp_path / "calib", 6, ext="png")
    write_images(tmp_path / "calib", 4, start=6, ext="JPG")
    calib = load_calibration(tmp_path / "calib", cfg32, n=8, min_images=4)
    assert calib.images.shape == (8, 3, 32, 32) and calib.images.dtype == torch.float32
    assert calib.skipped == [] and "8 of 10 images" in calib.source
    assert [b.shape[0] for b in calib.batches(3)] == [3, 3, 2]


def test_imagefolder_layout_is_recursive(tmp_path, cfg32):
    write_images(tmp_path / "calib" / "cat", 5)
    write_images(tmp_path / "calib" / "dog", 5, start=5, ext="jpeg")
    calib = load_calibration(str(tmp_path / "calib"), cfg32, n=32, min_images=4)
    assert calib.images.shape == (10, 3, 32, 32)


def test_corrupt_file_is_skipped_and_replaced(tmp_path, cfg32):
    write_images(tmp_path / "calib", 9)
    write_corrupt(tmp_path / "calib" / "broken.jpg")
    with pytest.warns(UserWarning, match="broken.jpg"):
        calib = load_calibration(tmp_path / "calib", cfg32, n=9, min_images=4)
    assert len(calib) == 9  # the corrupt file was replaced by a readable one
    assert len(calib.skipped) == 1 and calib.skipped[0].endswith("broken.jpg")
    assert "1 unreadable skipped" in calib.source


def test_seeded_selection(tmp_path, cfg32):
    write_images(tmp_path / "calib", 10)
    first = load_calibration(tmp_path / "calib", cfg32, n=4, seed=0, min_images=4).images
    again = load_calibration(tmp_path / "calib", cfg32, n=4, seed=0, min_images=4).images
    other = load_calibration(tmp_path / "calib", cfg32, n=4, seed=1, min_images=4).images
    assert torch.equal(first, again)
    assert not torch.equal(first, other)


@pytest.mark.parametrize("setup, fragments", [
    (lambda root: None, ["does not exist"]),
    (lambda root: root.write_bytes(b"not a folder"), ["is a file, not a folder"]),
    (lambda root: root.mkdir(), ["holds no image files", ".png"]),
    (lambda root: [write_corrupt(root / f"bad{i}.jpg") for i in range(4)],
     ["holds 0 readable images", "4 files could not be decoded", "bad0.jpg, bad1.jpg, bad2.jpg", "1 more"]),
    (lambda root: write_images(root, 3), ["holds only 3 readable images", "at least 8"]),
])
def test_folder_errors(tmp_path, cfg32, setup, fragments):
    root = tmp_path / "calib"
    setup(root)
    with pytest.raises(VitquantError) as info, warnings.catch_warnings():
        warnings.simplefilter("ignore")
        load_calibration(root, cfg32, n=32)
    for fragment in fragments:
        assert fragment in str(info.value)


def test_tensor_source(cfg32):
    images = torch.randn(20, 3, 32, 32)
    calib = load_calibration(images, cfg32, n=8, seed=3)
    assert calib.images.shape == (8, 3, 32, 32)
    assert torch.cdist(calib.images.flatten(1), images.flatten(1), compute_mode=EXACT).min(dim=1).values.max() < 1e-5
    assert not torch.equal(calib.images, load_calibration(images, cfg32, n=8, seed=4).images)
    with pytest.raises(VitquantError, match=r"shape \(20, 3, 28, 28\).*input_size \(3, 32, 32\)"):
        load_calibration(torch.randn(20, 3, 28, 28), cfg32)


def test_loader_and_dataset_sources(cfg32):
    dataset = TensorDataset(torch.randn(12, 3, 32, 32), torch.zeros(12, dtype=torch.int64))
    from_loader = load_calibration(DataLoader(dataset, batch_size=5), cfg32, n=10)
    assert torch.equal(from_loader.images, dataset.tensors[0][:10])
    assert load_calibration(dataset, cfg32, n=8).images.shape == (8, 3, 32, 32)


def test_unsupported_source(cfg32):
    with pytest.raises(VitquantError, match="unsupported calibration source of type list"):
        load_calibration([1, 2, 3], cfg32)


def test_bundled_calibration():
    calib = load_calibration("bundled", MNIST_CFG, n=16, seed=0)
    assert calib.images.shape == (16, 1, 28, 28)
    train, _ = mnist5k_split("train")
    distance_to_nearest = torch.cdist(calib.images.flatten(1), train.flatten(1), compute_mode=EXACT).min(dim=1).values
    assert distance_to_nearest.max() < 1e-3  # drawn from the train split, normalized the same way
    assert calib.images.min() < -0.4 and calib.images.max() > 2.5  # normalized, not [0, 1]


def test_bundled_needs_mnist_input_size(cfg32):
    with pytest.raises(VitquantError, match="28x28 grayscale MNIST"):
        load_calibration("bundled", cfg32)


def test_load_labeled_imagefolder(tmp_path, cfg32):
    write_images(tmp_path / "eval" / "b_dog", 3)
    write_images(tmp_path / "eval" / "a_cat", 2, start=3)
    write_corrupt(tmp_path / "eval" / "a_cat" / "zz.jpg")
    with pytest.warns(UserWarning, match="zz.jpg"):
        labeled = load_labeled(tmp_path / "eval", cfg32)
    assert labeled.classes == ["a_cat", "b_dog"]
    assert labeled.labels.tolist() == [0, 0, 1, 1, 1] and labeled.labels.dtype == torch.int64
    assert labeled.images.shape == (5, 3, 32, 32) and len(labeled.skipped) == 1
    assert [len(y) for _, y in labeled.batches(2)] == [2, 2, 1]
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        subset, again = (load_labeled(tmp_path / "eval", cfg32, limit=4) for _ in range(2))
    assert len(subset) == 4 and torch.equal(subset.labels, again.labels)


def test_load_labeled_needs_class_subfolders(tmp_path, cfg32):
    write_images(tmp_path / "flat", 3)
    with pytest.raises(VitquantError, match="ImageFolder layout"):
        load_labeled(tmp_path / "flat", cfg32)


def test_bundled_labeled():
    labeled = load_labeled("bundled", MNIST_CFG)
    assert labeled.images.shape == (1000, 1, 28, 28) and labeled.labels.shape == (1000,)
    assert labeled.classes == [str(d) for d in range(10)]
    assert len(load_labeled("bundled", MNIST_CFG, limit=100)) == 100


def test_grayscale_model_gets_resized_single_channel_images(tmp_path):
    write_images(tmp_path / "calib", 8, size=40)
    calib = load_calibration(tmp_path / "calib", MNIST_CFG, n=8)
    assert calib.images.shape == (8, 1, 28, 28)
