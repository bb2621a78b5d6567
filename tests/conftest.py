"""Shared fixtures: tiny random timm ViTs that every test can quantize in well under a second."""
from __future__ import annotations

import pytest
import torch
from timm.models.vision_transformer import VisionTransformer

# Tiny models gain nothing from intra-op threads, and OpenMP threads spin badly when the 2 cores are
# shared with other jobs; one thread keeps the suite's time predictable.
torch.set_num_threads(1)

MNIST_CFG = dict(input_size=(1, 28, 28), mean=(0.1307,), std=(0.3081,), crop_pct=1.0, interpolation="bilinear")


def make_tiny_vit(depth: int = 2, embed_dim: int = 64, seed: int = 0, **kwargs) -> VisionTransformer:
    torch.manual_seed(seed)
    model = VisionTransformer(img_size=28, patch_size=7, in_chans=1, num_classes=10, embed_dim=embed_dim,
                              depth=depth, num_heads=2, **kwargs).eval()
    model.pretrained_cfg = dict(MNIST_CFG)
    return model


@pytest.fixture
def tiny_vit() -> VisionTransformer:
    return make_tiny_vit()


@pytest.fixture
def calib_images() -> torch.Tensor:
    return torch.randn(32, 1, 28, 28, generator=torch.Generator().manual_seed(1))


def pytest_collection_modifyitems(config, items):
    """Tests marked `cuda` run only where a GPU is (the CPU suite exercises devices with simulated_device)."""
    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="needs a CUDA device")
    for item in items:
        if item.get_closest_marker("cuda") is not None:
            item.add_marker(skip)


def sqnr_db(ref: torch.Tensor, out: torch.Tensor) -> float:
    return float(10 * torch.log10(ref.pow(2).mean() / (out - ref).pow(2).mean().clamp_min(1e-20)))


# With --import-mode=importlib tests cannot import this module; they get its helpers as fixtures.
@pytest.fixture
def tiny_vit_factory():
    return make_tiny_vit


@pytest.fixture
def sqnr():
    return sqnr_db
