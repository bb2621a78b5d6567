"""Calibration images without any real data: PSAQ-ViT generation and its Gaussian-noise baseline.

PSAQ-ViT (Li et al., "Patch Similarity Aware Data-Free Quantization for Vision Transformers",
ECCV 2022): self-attention reacts differently to noise and to real images in how similar its patch
features are to one another — for noise the pairwise cosine similarities of the attention outputs
pile up in a narrow peak, for real images they spread out. Starting from Gaussian noise, the images
are optimized with Adam to maximize, summed over the blocks, the differential entropy of a kernel
density estimate of those similarities, plus cross-entropy to random pseudo-labels and a
total-variation term that holds the image smoothness near a natural-image target. Random roll-jitter
and horizontal flips (from DeepInversion) keep the images from overfitting to one pixel grid.

What follows the paper's code exactly: Gaussian init in normalized space; Adam (lr 0.2, betas 0.5/0.9);
two rounds with jitter 15 then 30 px at 224 px, each with a linear warm-up over its first 20% of steps
and a cosine decay; patch features = attn·V averaged over heads with the class token excluded;
CE weight 1; TV loss 0.05·|TV − U(2500, 3000)| with the target drawn once per batch of 32; pixels
clipped to the valid range after every step; the `gaussian` source is plain N(0, 1) in normalized
space without clipping (the paper's mode 1).

Deviations, all because our models are tiny (28×28 MNIST, 16 patches) or for numerical sanity:
- KDE on a fixed grid over [−1 − 3h, 1 + 3h] (101 points) with bandwidth h = 0.05 instead of 10
  points between the batch's current min and max with h = 0.01: the min/max grid moves every step
  (its integral is not comparable between steps and not differentiable in the grid), and with 16
  patches there are only 120 similarity pairs per image, too few for h = 0.01 (Silverman's rule gives
  ≈ 0.1 for 120 samples of spread 0.3). Only distinct off-diagonal pairs enter the KDE; the paper's
  code also feeds the N self-similarities (always 1) and both triangles.
- TV is measured as the mean over four directions of the per-element RMS neighbour difference,
  i.e. the paper's sum of four batch norms divided by 4·sqrt(elements). That makes the paper's target
  resolution- and batch-independent: U(2500, 3000) at 32×3×224×224 becomes an RMS of U(0.285, 0.342)
  (in normalized units), and the weight 0.05 becomes 0.05·4·sqrt(32·3·224·224) ≈ 440 so that a 10%
  miss still costs ≈ 14 loss units, as in the paper. Natural images are roughly scale invariant, so a
  per-pixel target carries over to other sizes better than the raw norm (which grows with √pixels).
- Jitter is given as a fraction of the image side (15/224, 30/224), i.e. ±2 and ±4 px at 28 px.
- CPU defaults: 2 × 150 steps instead of 2 × 500 (see `DataFreeConfig`).
- The float model's train/eval mode and parameters are untouched: gradients are taken only with
  respect to the images (torch.autograd.grad), never accumulated into the model.
"""
from __future__ import annotations

import math
import random
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image
from torch import nn
from tqdm.auto import tqdm

from vitquant import distributed
from vitquant.calibration.data import CalibrationSet, data_config_for
from vitquant.errors import VitquantError
from vitquant.models.io import logits_of

DATA_FREE, GAUSSIAN = "data-free", "gaussian"
# The paper's TV target and weight for one batch of 32 × 3 × 224 × 224, rescaled to per-element RMS.
_PSAQ_TV_NORMS = 4 * math.sqrt(32 * 3 * 224 * 224)
PSAQ_TV_TARGET = (2500 / _PSAQ_TV_NORMS, 3000 / _PSAQ_TV_NORMS)
PSAQ_TV_WEIGHT = 0.05 * _PSAQ_TV_NORMS


@dataclass
class DataFreeConfig:
    """How PSAQ-ViT generates calibration images (defaults: the paper's, with fewer steps for CPUs).

    n_images: how many images to generate (PSAQ: 32); generated `batch_size` at a time.
    steps: Adam steps per batch, split evenly over the `jitter` rounds (PSAQ: 1000 = 2 × 500). 300 is
        a CPU compromise; on the 6-block reference model 100 steps cost RepQ-ViT W4A4 ~6 points, and
        the paper's 1000 brought it to real-image calibration (benchmarks/results/data_free.md).
    lr, betas: Adam on the pixels (PSAQ: 0.2, (0.5, 0.9)); warmup: fraction of each round's steps.
    entropy_weight, ce_weight, tv_weight: loss weights (PSAQ: 1, 1, 0.05 on its raw norm = ≈440 here).
    tv_target: (low, high) of the uniform draw of the target per-element RMS neighbour difference.
    jitter: per round, the largest random roll as a fraction of the image side; flip: random h-flips.
    kde_bandwidth, kde_points: the Gaussian-kernel density estimate of the cosine similarities.
    max_pairs: at most this many patch pairs per image enter the KDE (memory for long sequences).
    seed: all randomness (noise, pseudo-labels, TV target, jitter, flips) derives from it.
    grid_path: where to write a PNG grid of the generated images (None: not written).
    """

    n_images: int = 32
    steps: int = 300
    lr: float = 0.2
    betas: tuple[float, float] = (0.5, 0.9)
    warmup: float = 0.2
    entropy_weight: float = 1.0
    ce_weight: float = 1.0
    tv_weight: float = PSAQ_TV_WEIGHT
    tv_target: tuple[float, float] = PSAQ_TV_TARGET
    jitter: tuple[float, ...] = (15 / 224, 30 / 224)
    flip: bool = True
    kde_bandwidth: float = 0.05
    kde_points: int = 101
    max_pairs: int = 4096
    batch_size: int = 32
    seed: int = 0
    grid_path: str | None = None

    def __post_init__(self) -> None:
        self.betas = tuple(float(b) for b in self.betas)
        self.tv_target = tuple(float(t) for t in self.tv_target)
        self.jitter = tuple(float(j) for j in self.jitter)
        checks = [
            ("n_images", isinstance(self.n_images, int) and self.n_images >= 1, "a positive integer"),
            ("steps", isinstance(self.steps, int) and self.steps >= len(self.jitter), f"an integer ≥ {len(self.jitter)} (one per jitter round)"),
            ("lr", self.lr > 0, "positive"),
            ("betas", len(self.betas) == 2 and all(0 <= b < 1 for b in self.betas), "two numbers in [0, 1)"),
            ("warmup", 0 <= self.warmup < 1, "a fraction in [0, 1)"),
            ("entropy_weight", self.entropy_weight >= 0, "≥ 0"),
            ("ce_weight", self.ce_weight >= 0, "≥ 0"),
            ("tv_weight", self.tv_weight >= 0, "≥ 0"),
            ("tv_target", len(self.tv_target) == 2 and 0 <= self.tv_target[0] <= self.tv_target[1], "(low, high) with 0 ≤ low ≤ high"),
            ("jitter", len(self.jitter) >= 1 and all(0 <= j < 1 for j in self.jitter), "one fraction in [0, 1) per round"),
            ("kde_bandwidth", self.kde_bandwidth > 0, "positive"),
            ("kde_points", isinstance(self.kde_points, int) and self.kde_points >= 8, "an integer ≥ 8"),
            ("max_pairs", isinstance(self.max_pairs, int) and self.max_pairs >= 2, "an integer ≥ 2"),
            ("batch_size", isinstance(self.batch_size, int) and self.batch_size >= 1, "a positive integer"),
            ("seed", isinstance(self.seed, int), "an integer"),
        ]
        bad = [f"{name}={getattr(self, name)!r} (must be {need})" for name, ok, need in checks if not ok]
        if bad:
            raise VitquantError(f"invalid DataFreeConfig: {'; '.join(bad)}")
        if self.grid_path is not None:
            self.grid_path = str(self.grid_path)

    def to_dict(self) -> dict:
        return asdict(self)


# -- the loss terms ---------------------------------------------------------------------------------
def patch_similarity_entropy(features: torch.Tensor, bandwidth: float = 0.05, points: int = 101,
                             pairs: torch.Tensor | None = None) -> torch.Tensor:
    """Differential entropy (nats, mean over the batch) of the pairwise cosine similarities of patch
    features [B, N, D], estimated with a Gaussian-kernel density on a fixed grid (PSAQ-ViT eq. 5-6).

    `pairs`: flat indices into the N×N similarity matrix to use (default: every distinct pair i < j).
    Differentiable in `features`; the grid covers [−1, 1] plus 3 bandwidths so no kernel mass is lost.
    """
    b, n, _ = features.shape
    unit = F.normalize(features, dim=-1)
    sims = (unit @ unit.transpose(1, 2)).reshape(b, n * n)
    if pairs is None:
        pairs = distinct_pairs(n)
    sims = sims[:, pairs]
    reach = 1 + 3 * bandwidth
    grid = torch.linspace(-reach, reach, points, dtype=sims.dtype, device=sims.device)
    z = (grid[None, :, None] - sims[:, None, :]) / bandwidth
    density = torch.exp(-0.5 * z * z).mean(dim=-1) / (bandwidth * math.sqrt(2 * math.pi))
    # the paper adds 1e-4 before the log; it also keeps log(0) finite for an empty grid region
    integrand = -density * torch.log(density + 1e-4)
    return torch.trapezoid(integrand, grid, dim=-1).mean()


def distinct_pairs(n: int, max_pairs: int | None = None, generator: torch.Generator | None = None) -> torch.Tensor:
    """Flat indices i·n + j of the pairs i < j, or a fixed random subset of at most `max_pairs`."""
    i, j = torch.triu_indices(n, n, offset=1)
    flat = i * n + j
    if max_pairs is not None and len(flat) > max_pairs:
        flat = flat[torch.randperm(len(flat), generator=generator)[:max_pairs]].sort().values
    return flat


def smoothness_rms(images: torch.Tensor) -> torch.Tensor:
    """Mean over the 4 neighbour directions (→, ↓, two diagonals) of the RMS pixel difference: the
    paper's total-variation prior divided by 4·sqrt(elements), so it does not grow with image size."""
    diffs = (images[..., :, :-1] - images[..., :, 1:], images[..., :-1, :] - images[..., 1:, :],
             images[..., 1:, :-1] - images[..., :-1, 1:], images[..., :-1, :-1] - images[..., 1:, 1:])
    return sum(d.pow(2).mean().sqrt() for d in diffs) / 4


class PatchFeatureHooks:
    """Captures each attention's probs·V output (the input of the layer that reads it, e.g. `attn.proj`),
    heads averaged and prefix (class/register) tokens dropped: the "patch features" PSAQ-ViT measures
    similarity on. Where they are comes from the model's traced structure, for any family; prefix
    tokens are those beyond the patches the image layer makes (none on Swin)."""

    def __init__(self, model: nn.Module, structure=None) -> None:
        if structure is None:
            from vitquant.models import prepare

            structure = prepare(model).structure
        heads = {c.owner: c.heads for c in structure.cores}
        targets = [(layer, heads[info.producer_module]) for layer in structure.layers
                   if (info := structure.sites.get(structure.layer_input(layer))) is not None
                   and info.role == "attn_out" and info.producer_module in heads]
        if not targets:
            raise VitquantError(f"data-free generation needs attention layers, but {type(model).__name__} has none "
                                "whose output feeds a quantized layer; calibrate with real images")
        self.patches = structure.patch_tokens
        self.features: list[torch.Tensor] = []
        self._handles = [model.get_submodule(layer).register_forward_pre_hook(self._hook(h)) for layer, h in targets]

    def _hook(self, heads: int):
        def capture(_module, inputs):
            x = inputs[0]
            if x.dim() == 4:  # a conv reads it: [B, C, H, W] → tokens
                x = x.flatten(2).transpose(1, 2)
            b, n, c = x.shape  # heads merged, before the projection
            prefix = max(0, n - self.patches) if self.patches and n > self.patches else 0
            self.features.append(x.reshape(b, n, heads, c // heads).mean(dim=2)[:, prefix:])
        return capture

    def pop(self) -> list[torch.Tensor]:
        features, self.features = self.features, []
        return features

    def remove(self) -> None:
        for h in self._handles:
            h.remove()


# -- generation -------------------------------------------------------------------------------------
def generate_calibration(model: nn.Module, data_cfg: dict | None = None, config: DataFreeConfig | None = None,
                         progress: bool = True, structure=None) -> CalibrationSet:
    """PSAQ-ViT calibration images [n_images, C, H, W] in the model's normalized input space.

    The float `model` is only read: no parameter gradient is accumulated and its train/eval mode is
    restored. With `config.grid_path`, a PNG grid of the images is written there.
    """
    config = config or DataFreeConfig()
    data_cfg = data_cfg or data_config_for(model)
    low, high = pixel_bounds(data_cfg)
    was_training = model.training
    model.eval()
    hooks = PatchFeatureHooks(model, structure)
    chunks = []
    try:
        sizes = [min(config.batch_size, config.n_images - s) for s in range(0, config.n_images, config.batch_size)]
        # enable_grad: callers may be inside torch.no_grad() (an evaluation loop, a CLI wrapper)
        with torch.enable_grad(), tqdm(total=config.steps * len(distributed.shard(len(sizes))), desc="generating calibration images "
                                       "(PSAQ-ViT)", unit="step", disable=not progress, leave=False) as bar:
            # under torchrun each rank generates a contiguous range of the batches (each batch has its own
            # seeded generator) and the ranks' images are gathered in batch order: one process's images
            for index in distributed.shard(len(sizes)):
                chunks.append(_generate_batch(model, hooks, data_cfg, config, sizes[index], index, (low, high), bar))
    finally:
        hooks.remove()
        model.train(was_training)
    c, h, w = data_cfg["input_size"]
    images = torch.cat(chunks) if chunks else torch.empty(0, c, h, w)
    images = distributed.all_gather_rows(images.cpu()) if distributed.is_distributed() else images
    if config.grid_path is not None and distributed.is_main():
        save_image_grid(images, data_cfg, config.grid_path)
    return CalibrationSet(images, f"data-free: PSAQ-ViT generation ({len(images)} images, {config.steps} steps, "
                                  f"seed {config.seed})", [])


def _generate_batch(model, hooks, data_cfg, config: DataFreeConfig, size: int, index: int, bounds, bar) -> torch.Tensor:
    c, h, w = data_cfg["input_size"]
    device = next(model.parameters()).device
    # One generator per batch: batch k is the same whatever n_images is.
    gen = torch.Generator().manual_seed(config.seed * 1_000_003 + index)
    rng = random.Random(config.seed * 1_000_003 + index)
    img = torch.randn(size, c, h, w, generator=gen).to(device).requires_grad_(True)
    with torch.no_grad():  # a dry run tells the number of classes and of patches
        num_classes = logits_of(model(img[:1])).shape[-1]
    n_patches = hooks.pop()[0].shape[1]
    labels = torch.randint(num_classes, (size,), generator=gen).to(device)
    tv_target = config.tv_target[0] + (config.tv_target[1] - config.tv_target[0]) * rng.random()
    pairs = distinct_pairs(n_patches, config.max_pairs, gen).to(device)
    optimizer = torch.optim.Adam([img], lr=config.lr, betas=config.betas, eps=1e-8)
    low, high = (t.to(device) for t in bounds)
    rounds = len(config.jitter)
    for round_index, fraction in enumerate(config.jitter):
        steps = config.steps // rounds + (1 if round_index < config.steps % rounds else 0)
        reach = (round(fraction * h), round(fraction * w))
        for step in range(steps):
            for group in optimizer.param_groups:
                group["lr"] = _lr(config, step, steps)
            x = torch.roll(img, shifts=(rng.randint(-reach[0], reach[0]), rng.randint(-reach[1], reach[1])), dims=(2, 3))
            if config.flip and rng.random() > 0.5:
                x = torch.flip(x, dims=(3,))
            logits = logits_of(model(x))
            features = hooks.pop()
            entropy = sum(patch_similarity_entropy(f, config.kde_bandwidth, config.kde_points, pairs) for f in features)
            ce = F.cross_entropy(logits, labels)
            tv = smoothness_rms(x)
            loss = -config.entropy_weight * entropy + config.ce_weight * ce + config.tv_weight * (tv - tv_target).abs()
            # autograd.grad, not backward(): the user's float model must not collect parameter gradients
            (img.grad,) = torch.autograd.grad(loss, [img])
            optimizer.step()
            with torch.no_grad():  # the paper's clip(): keep pixels inside what a real image can be
                img.copy_(torch.maximum(torch.minimum(img, high), low))
            if not bar.disable:  # reading the numbers waits for a GPU to finish the step: only when shown
                bar.set_postfix(loss=f"{loss.item():.3f}", entropy=f"{entropy.item() / max(1, len(features)):.3f}",
                                ce=f"{ce.item():.3f}", tv=f"{tv.item():.3f}")
            bar.update(1)
    return img.detach().cpu()


def _lr(config: DataFreeConfig, step: int, steps: int) -> float:
    """The paper's schedule per round: linear warm-up, then cosine decay to 0."""
    warm = int(config.warmup * steps)
    if step < warm:
        return config.lr * (step + 1) / warm
    return 0.5 * (1 + math.cos(math.pi * (step - warm) / max(1, steps - warm))) * config.lr


def pixel_bounds(data_cfg: dict) -> tuple[torch.Tensor, torch.Tensor]:
    """The normalized values of pixel 0 and 1 per channel, shaped [1, C, 1, 1]."""
    mean = torch.tensor(data_cfg["mean"], dtype=torch.float32).view(1, -1, 1, 1)
    std = torch.tensor(data_cfg["std"], dtype=torch.float32).view(1, -1, 1, 1)
    return (0 - mean) / std, (1 - mean) / std


def gaussian_calibration(data_cfg: dict, n: int = 32, seed: int = 0) -> CalibrationSet:
    """Pure N(0, 1) noise in the model's normalized input space: the baseline PSAQ-ViT compares against."""
    if not isinstance(n, int) or n < 1:
        raise VitquantError(f"gaussian calibration needs a positive number of images, got n={n!r}")
    c, h, w = data_cfg["input_size"]
    images = torch.randn(n, c, h, w, generator=torch.Generator().manual_seed(seed))
    return CalibrationSet(images, f"gaussian noise ({n} images, seed {seed})", [])


# -- looking at what the model "dreamed" --------------------------------------------------------------
def save_image_grid(images: torch.Tensor, data_cfg: dict, path: str | Path, columns: int = 8,
                    min_tile: int = 64, pad: int = 2) -> Path:
    """Write normalized images [N, C, H, W] as one PNG grid (un-normalized with the model's mean/std,
    small images enlarged by an integer factor with nearest neighbours so strokes stay sharp)."""
    mean = torch.tensor(data_cfg["mean"]).view(1, -1, 1, 1)
    std = torch.tensor(data_cfg["std"]).view(1, -1, 1, 1)
    pixels = (images.detach().cpu().float() * std + mean).clamp(0, 1)
    n, c, h, w = pixels.shape
    scale = max(1, -(-min_tile // max(h, w)))
    pixels = pixels.repeat_interleave(scale, dim=2).repeat_interleave(scale, dim=3)
    h, w = h * scale, w * scale
    columns = min(columns, n)
    rows = -(-n // columns)
    canvas = torch.ones(c, rows * (h + pad) + pad, columns * (w + pad) + pad)
    for i in range(n):
        top, left = pad + (i // columns) * (h + pad), pad + (i % columns) * (w + pad)
        canvas[:, top:top + h, left:left + w] = pixels[i]
    array = (canvas.permute(1, 2, 0).numpy() * 255).round().astype(np.uint8)
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(array[..., 0] if c == 1 else array, mode="L" if c == 1 else "RGB").save(path)
    return path


# -- the `quantize(calib=...)` entry ----------------------------------------------------------------
def is_generated_source(calib) -> bool:
    return isinstance(calib, DataFreeConfig) or (isinstance(calib, str) and calib in (DATA_FREE, GAUSSIAN))


def generated_calibration(model: nn.Module, calib, n: int, seed: int, progress: bool = True, structure=None
                          ) -> tuple[CalibrationSet, dict]:
    """Calibration made from the float model itself, and the facts to record in `qmodel.stats`.

    "data-free" / "gaussian" use n images and the config's seed; a DataFreeConfig is used as given.
    """
    data_cfg = data_config_for(model, structure.input_shape if structure is not None else None)
    t0 = time.perf_counter()
    if isinstance(calib, str) and calib == GAUSSIAN:
        result = gaussian_calibration(data_cfg, n, seed)
        return result, {"generation_seconds": round(time.perf_counter() - t0, 3)}
    config = calib if isinstance(calib, DataFreeConfig) else DataFreeConfig(n_images=n, seed=seed)
    result = generate_calibration(model, data_cfg, config, progress, structure)
    return result, {"generation_seconds": round(time.perf_counter() - t0, 3), "calibration_grid": config.grid_path,
                    "data_free_config": config.to_dict()}


__all__ = ["DATA_FREE", "GAUSSIAN", "DataFreeConfig", "PatchFeatureHooks", "gaussian_calibration",
           "generate_calibration", "generated_calibration", "is_generated_source", "patch_similarity_entropy",
           "pixel_bounds", "save_image_grid", "smoothness_rms"]
