"""Moving a per-channel affine map from a norm's output into the layers it feeds (exact in float).

With r, b ∈ R^C: the norm's output x becomes x' = x / r − b (γ ← γ/r, β ← β/r − b) and each following
layer computes W'x' + b'' = Wx + bias with W' = W·diag(r) (over its input channels), b'' = bias + W'b.
RepQ-ViT (Li et al., ICCV'23, §3.2) uses it to turn channel-wise post-LayerNorm quantization into
layer-wise quantization; the outlier-stress variants use it to create outlier channels. The layers may
be Linears (channels last) or 1×1 convolutions (channels at dim 1): `ScaleMapping.channel_axis`.
"""
from __future__ import annotations

import torch
from torch import nn

from vitquant.errors import VitquantError


def _input_columns(layer: nn.Module) -> torch.Tensor:
    """The layer's weight as [out, in] (a view: a 1×1 conv's [out, in, 1, 1] flattened)."""
    w = layer.weight
    return w.reshape(w.shape[0], w.shape[1]) if w.dim() == 4 else w


@torch.no_grad()
def fold_channel_affine(norm: nn.Module, layers: list[nn.Module], r: torch.Tensor, b: torch.Tensor) -> None:
    if getattr(norm, "weight", None) is None or getattr(norm, "bias", None) is None:
        raise VitquantError(f"cannot reparameterize {type(norm).__name__} without an affine weight and bias")
    r, b = r.to(norm.weight), b.to(norm.weight)
    if torch.any(r <= 0):
        raise ValueError("reparameterization factors r must be positive")
    norm.weight.div_(r)
    norm.bias.div_(r).sub_(b)
    for layer in layers:
        w = _input_columns(layer)
        w.mul_(r)  # scales input columns
        shift = w @ b
        if layer.bias is None:
            layer.bias = nn.Parameter(shift)
        else:
            layer.bias.add_(shift)
