"""Data-free calibration (PSAQ-ViT): the patch-similarity entropy, generation, and quantize(calib="data-free")."""
from __future__ import annotations

import math

import pytest
import torch
from PIL import Image
from timm.models.vision_transformer import VisionTransformer

import vitquant
from vitquant.calibration.data import data_config_for
from vitquant.calibration.datafree import (
    DataFreeConfig, PatchFeatureHooks, gaussian_calibration, generate_calibration, patch_similarity_entropy,
    save_image_grid, smoothness_rms,
)
from vitquant.errors import VitquantError

FAST = dict(n_images=4, steps=6, batch_size=4)  # a few steps: the mechanics, not image quality


def tiny_vit(seed: int = 0) -> VisionTransformer:
    torch.manual_seed(seed)
    model = VisionTransformer(img_size=28, patch_size=7, in_chans=1, num_classes=10, embed_dim=64, depth=2,
                              num_heads=2)
    with torch.no_grad():  # timm's init (std 0.02) makes attention uniform, so every patch's attn·V
        for block in model.blocks:  # is the same vector; trained models are peaky, as this makes it
            block.attn.qkv.weight.normal_(0, 0.15)
    model.pretrained_cfg = dict(input_size=(1, 28, 28), mean=(0.1307,), std=(0.3081,), crop_pct=1.0,
                                interpolation="bilinear")
    return model.eval()


def test_entropy_of_a_known_distribution():
    # identical features: every similarity is 1, so the KDE is one Gaussian kernel, entropy ½·ln(2πe·h²)
    h = 0.05
    same = torch.ones(3, 6, 4)
    expected = 0.5 * math.log(2 * math.pi * math.e * h * h)
    got = patch_similarity_entropy(same, bandwidth=h, points=401).item()
    assert got == pytest.approx(expected, abs=0.02)  # the 1e-4 floor inside the log shifts it slightly


def test_entropy_is_higher_for_spread_similarities():
    torch.manual_seed(0)
    narrow = torch.randn(2, 16, 8) * 0.01 + torch.ones(8)  # nearly parallel features: sims ≈ 1
    spread = torch.randn(2, 16, 8)
    assert patch_similarity_entropy(spread).item() > patch_similarity_entropy(narrow).item() + 1.0


def test_entropy_gradient_matches_finite_differences():
    torch.manual_seed(0)
    features = torch.randn(2, 5, 3, dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(lambda f: patch_similarity_entropy(f, 0.2, 41), (features,))


def test_entropy_of_tiny_model_attention_increases_under_optimization():
    model = tiny_vit()
    hooks = PatchFeatureHooks(model)
    x = torch.randn(4, 1, 28, 28, generator=torch.Generator().manual_seed(0)).requires_grad_(True)
    optimizer = torch.optim.Adam([x], lr=0.1)

    def neg_entropy() -> torch.Tensor:
        model(x)
        return -sum(patch_similarity_entropy(f) for f in hooks.pop())

    first = neg_entropy().item()
    for _ in range(15):
        optimizer.zero_grad()
        neg_entropy().backward()
        optimizer.step()
    last = neg_entropy().item()
    hooks.remove()
    assert last < first - 0.1, (first, last)


def test_hooks_capture_head_averaged_patch_tokens():
    model = tiny_vit()
    hooks = PatchFeatureHooks(model)
    model(torch.zeros(3, 1, 28, 28))
    features = hooks.pop()
    hooks.remove()
    assert [tuple(f.shape) for f in features] == [(3, 16, 32)] * 2  # 2 blocks, 16 patches, 64/2 dims


def test_generation_is_reproducible_with_a_seed_and_leaves_the_model_alone():
    model = tiny_vit()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    a = generate_calibration(model, None, DataFreeConfig(seed=1, **FAST), progress=False).images
    with torch.no_grad():  # generation needs gradients even when the caller turned them off
        b = generate_calibration(model, None, DataFreeConfig(seed=1, **FAST), progress=False).images
    c = generate_calibration(model, None, DataFreeConfig(seed=2, **FAST), progress=False).images
    assert torch.equal(a, b)
    assert not torch.equal(a, c)
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())
    assert all(p.grad is None for p in model.parameters())
    low, high = (0 - 0.1307) / 0.3081, (1 - 0.1307) / 0.3081
    assert a.shape == (4, 1, 28, 28) and a.min() >= low - 1e-6 and a.max() <= high + 1e-6


def test_entropy_term_raises_patch_entropy_over_generation_without_it():
    # Smoothing (the TV term) alone lowers the patch entropy of noise; the entropy term must push back.
    model = tiny_vit()
    hooks = PatchFeatureHooks(model)

    def entropy_after(weight: float) -> float:
        config = DataFreeConfig(n_images=4, steps=30, batch_size=4, ce_weight=0.0, entropy_weight=weight, seed=0)
        images = generate_calibration(model, None, config, progress=False).images
        with torch.no_grad():
            model(images)
        return sum(patch_similarity_entropy(f) for f in hooks.pop()).item()

    try:
        without, with_term = entropy_after(0.0), entropy_after(1.0)
    finally:
        hooks.remove()
    assert with_term > without + 0.2, (without, with_term)


def test_generation_pulls_noise_to_the_smoothness_target():
    config = DataFreeConfig(n_images=4, steps=30, batch_size=4, seed=0)
    generated = generate_calibration(tiny_vit(), None, config, progress=False).images
    noise = torch.randn(4, 1, 28, 28, generator=torch.Generator().manual_seed(0))
    # N(0, 1) noise has RMS neighbour differences ≈ √2; the PSAQ target is U(0.285, 0.342)
    assert smoothness_rms(noise).item() > 1.3
    assert smoothness_rms(generated).item() < 0.5


def test_gaussian_source_is_seeded_standard_noise():
    cfg = data_config_for(tiny_vit())
    a = gaussian_calibration(cfg, 64, seed=3)
    assert torch.equal(a.images, gaussian_calibration(cfg, 64, seed=3).images)
    assert a.images.shape == (64, 1, 28, 28)
    assert abs(a.images.mean().item()) < 0.05 and abs(a.images.std().item() - 1) < 0.05


def test_grid_png_has_one_tile_per_image(tmp_path):
    cfg = data_config_for(tiny_vit())
    images = torch.full((10, 1, 28, 28), (1 - 0.1307) / 0.3081)  # all white
    path = save_image_grid(images, cfg, tmp_path / "grid.png", columns=4, min_tile=56, pad=2)
    with Image.open(path) as png:
        assert png.mode == "L"
        assert png.size == (4 * (56 + 2) + 2, 3 * (56 + 2) + 2)  # 28 px tiles enlarged ×2
        assert png.getpixel((2, 2)) == 255 and png.getpixel((4 * 58, 2 * 58 + 10)) == 255


def test_config_rejects_nonsense_with_the_field_named():
    with pytest.raises(VitquantError, match="steps"):
        DataFreeConfig(steps=1)  # fewer steps than jitter rounds
    with pytest.raises(VitquantError, match="tv_target"):
        DataFreeConfig(tv_target=(0.5, 0.1))
    with pytest.raises(VitquantError, match="n_images"):
        DataFreeConfig(n_images=0)


@pytest.mark.parametrize("calib", ["data-free", "gaussian"])
def test_quantize_end_to_end_without_real_images(calib, tmp_path):
    model = tiny_vit()
    config = vitquant.QuantConfig.preset("w8a8", method="minmax", calib_size=8)
    source = DataFreeConfig(grid_path=str(tmp_path / "dreamed.png"), **FAST) if calib == "data-free" else calib
    qmodel = vitquant.quantize(model, config, source, progress=False)
    # held-out inputs from the calibration distribution (a random model has no "real" images)
    x = gaussian_calibration(data_config_for(model), 16, seed=9).images if calib == "gaussian" else \
        generate_calibration(model, None, DataFreeConfig(**{**FAST, "seed": 9}), progress=False).images
    with torch.no_grad():
        ref, out = model(x), qmodel(x)
    sqnr = 10 * torch.log10(ref.pow(2).sum() / (ref - out).pow(2).sum()).item()
    assert sqnr > 20, sqnr
    assert qmodel.stats["generation_seconds"] >= 0
    assert calib.split("-")[0] in qmodel.stats["calibration_source"] or "PSAQ" in qmodel.stats["calibration_source"]
    if calib == "data-free":
        assert qmodel.stats["calibration_images"] == 4
        assert (tmp_path / "dreamed.png").is_file() and qmodel.stats["calibration_grid"] == str(tmp_path / "dreamed.png")
    else:
        assert qmodel.stats["calibration_images"] == 8
