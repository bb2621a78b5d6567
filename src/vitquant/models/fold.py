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


@torch.no_grad()
def fold_batchnorm(layer: nn.Module, bn: nn.modules.batchnorm._BatchNorm) -> None:
    """Fold an eval-mode BatchNorm into the Linear/Conv whose output it normalizes, per output channel:
    W' = W·s, b' = (b − μ)·s + β with s = γ/√(σ² + ε) — the same function in float."""
    if bn.running_mean is None or bn.running_var is None:
        raise VitquantError(f"cannot fold a {type(bn).__name__} that keeps no running statistics")
    s = torch.rsqrt(bn.running_var.double() + bn.eps)
    if bn.weight is not None:
        s = s * bn.weight.double()
    shift = -bn.running_mean.double() * s + (bn.bias.double() if bn.bias is not None else 0.0)
    w = layer.weight
    w.copy_((w.double() * s.reshape(-1, *([1] * (w.dim() - 1)))).to(w.dtype))
    bias = (layer.bias.double() * s + shift) if layer.bias is not None else shift
    if layer.bias is None:
        layer.bias = nn.Parameter(bias.to(w.dtype))
    else:
        layer.bias.copy_(bias.to(w.dtype))


def reparameterize_blocks(model: nn.Module) -> list[str]:
    """Structural reparameterization of multi-branch training blocks (MobileOne, RepMixer, FastViT's
    large-kernel convs: `reparameterize()`) into the single conv they compute, before quantization — what
    deploys is the fused form, so that is what is quantized. Returns the blocks fused."""
    done = []
    for name, module in list(model.named_modules()):
        fn = getattr(module, "reparameterize", None)
        if callable(fn) and not getattr(module, "inference_mode", False):
            fn()
            done.append(name or type(module).__name__)
    return done
