"""Exact float rewrites methods apply: `fold_channel_affine` (a norm's per-channel affine map moved
into the layers it feeds, see vitquant.models.fold) and `fold_input_shift`, which moves a constant
shift of a Linear's input into its bias (AdaLog's post-GELU "bias reparameterization").
"""
from __future__ import annotations

import torch
from torch import nn

from vitquant.models.fold import fold_channel_affine  # noqa: F401  (re-exported for methods)
from vitquant.quantizers.noisy import denoising_bias  # b − W·c, shared with NoisyQuant's fold


@torch.no_grad()
def fold_input_shift(linear: nn.Module, shift: float | torch.Tensor, weight: torch.Tensor | None = None) -> None:
    """Fold a constant input shift into a Linear's bias: y = W(x̂ − c) + b = W·x̂ + (b − W·c).

    After the fold the Linear takes x̂ (e.g. AdaLog's shifted post-GELU code value, Wu et al. ECCV'24
    "bias reparameterization"; or NoisyQuant's x + N) without subtracting c. c: a scalar or one value
    per input channel. weight: the weight the Linear computes with (its fake-quantized weight once
    frozen) — folding with exactly that weight keeps the quantized model's output unchanged.
    """
    w = linear.weight if weight is None else weight
    new_bias = denoising_bias(w, linear.bias, torch.as_tensor(shift, dtype=w.dtype, device=w.device).expand(w.shape[1]))
    if linear.bias is None:
        linear.bias = nn.Parameter(new_bias)
    else:
        linear.bias.copy_(new_bias)
