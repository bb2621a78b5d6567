"""Moving a per-channel affine map from a LayerNorm's output into the Linears it feeds.

With r, b ∈ R^C: the LayerNorm's output x becomes x' = x / r − b (γ ← γ/r, β ← β/r − b) and each
following Linear computes W'x' + b'' = Wx + bias with W' = W·diag(r), b'' = bias + W'b. The float
function is unchanged (exact up to rounding); what changes is the distribution the Linear's input
quantizer sees. RepQ-ViT (Li et al., ICCV'23, §3.2) uses it to turn channel-wise post-LayerNorm
quantization into layer-wise quantization.

`fold_input_shift` moves a constant shift of a Linear's input into its bias (AdaLog's post-GELU
"bias reparameterization").
"""
from __future__ import annotations

import torch
from torch import nn

from vitquant.errors import VitquantError
from vitquant.quantizers.noisy import denoising_bias  # b − W·c, shared with NoisyQuant's fold


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
