"""Building blocks of the robustness tests (importable: conftest puts this folder on sys.path, as
--import-mode=importlib cannot import a conftest): a tiny vitquant model file, image folders, and a
snapshot of a directory tree."""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import torch
from PIL import Image
from safetensors.torch import save_file

TINY_KWARGS = dict(img_size=28, patch_size=7, in_chans=1, num_classes=3, embed_dim=32, depth=1, num_heads=2)
MNIST_CFG = {"input_size": [1, 28, 28], "mean": [0.1307], "std": [0.3081], "crop_pct": 1.0,
             "interpolation": "bilinear", "num_classes": 3}


def write_model_file(path: Path, tamper=None, **overrides) -> Path:
    """A vitquant model file (.safetensors + .json sidecar); `tamper(state_dict)` edits the tensors."""
    from timm.models.vision_transformer import VisionTransformer

    torch.manual_seed(0)
    kwargs = {**TINY_KWARGS, **overrides}
    state = {k: v.detach().clone().contiguous() for k, v in VisionTransformer(**kwargs).state_dict().items()}
    if tamper is not None:
        tamper(state)
    path.parent.mkdir(parents=True, exist_ok=True)
    save_file(state, str(path))
    path.with_suffix(".json").write_text(json.dumps({
        "format": "vitquant-model/1", "architecture": "timm.VisionTransformer", "model_kwargs": kwargs,
        "pretrained_cfg": MNIST_CFG}))
    return path


def write_images(folder: Path, n: int, classes=None, corrupt: int = 0) -> Path:
    rng = np.random.default_rng(0)
    folder.mkdir(parents=True, exist_ok=True)
    for i in range(n):
        sub = folder / (classes[i % len(classes)] if classes else "")
        sub.mkdir(parents=True, exist_ok=True)
        Image.fromarray(rng.integers(0, 255, (28, 28), dtype=np.uint8)).save(sub / f"img{i}.png")
    for i in range(corrupt):
        (folder / f"broken{i}.png").write_bytes(b"not an image at all")
    return folder


def snapshot(root: Path) -> dict[str, tuple]:
    """Every entry under `root` with its size and content, to prove a failed command changed nothing."""
    out = {}
    for p in sorted(root.rglob("*")):
        rel = p.relative_to(root).as_posix()
        out[rel] = ("dir",) if p.is_dir() else (p.stat().st_size, p.read_bytes())
    return out
