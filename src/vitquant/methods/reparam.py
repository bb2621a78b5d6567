"""Moving a per-channel affine map from a LayerNorm's output into the Linears it feeds.

With r, b ∈ R^C: the LayerNorm's output x becomes x' = x / r − b (γ ← γ/r, β ← β/r − b) and each
following Linear computes W'x' + b'' = Wx + bias with W' = W·diag(r), b'' = bias + W'b. The float
function is unchanged (exact up to rounding); what changes is the distribution the Linear's input
quantizer sees. RepQ-ViT (Li et al., ICCV'23, §3.2) uses it to turn channel-wise post-LayerNorm
quantization into layer-wise quantization.
"""
from __future__ import annotations

import torch
from torch import nn

from vitquant.errors import VitquantError


@torch.no_grad()
def fold_channel_affine(norm: nn.Module, linears: list[nn.Module], r: torch.Tensor, b: torch.Tensor) -> None:
    if getattr(norm, "weight", None) is None or getattr(norm, "bias", None) is None:
        raise VitquantError(f"cannot reparameterize {type(norm).__name__} without an affine weight and bias")
    r, b = r.to(norm.weight), b.to(norm.weight)
    if torch.any(r <= 0):
        raise ValueError("reparameterization factors r must be positive")
    norm.weight.div_(r)
    norm.bias.div_(r).sub_(b)
    for lin in linears:
        lin.weight.mul_(r)  # scales input columns
        shift = lin.weight @ b
        if lin.bias is None:
            lin.bias = nn.Parameter(shift)
        else:
            lin.bias.add_(shift)
