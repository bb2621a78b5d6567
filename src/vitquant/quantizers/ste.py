"""Straight-through views of fitted quantizers, for training-based methods (block reconstruction).

Every registered quantizer rounds with `torch.round`, whose gradient is zero: fine for calibration by
search, useless for gradient descent. These wrappers compute *exactly the same forward values* as the
quantizer they wrap and add a gradient:

- `round_ste`: round in the forward pass, identity in the backward pass (Bengio et al. 2013).
- `LearnedScaleUniform`: a fitted `UniformQuantizer` whose scale is an `nn.Parameter`; the gradient
  w.r.t. the scale is the LSQ one (Esser et al., ICLR'20) that `round_ste` produces — BRECQ/QDrop's
  activation-step learning, without LSQ's gradient-scale factor (Adam makes it nearly irrelevant).
  The zero point stays fixed, as in BRECQ. With `learn_scale=False` it is the plain STE quantizer
  that I&S-ViT uses to train float weights through a frozen grid.
- `StraightThrough`: any other quantizer (log2, log√2, …): its output, with an identity gradient, so
  the layers before it still learn; its own parameters stay as fitted.

The wrappers are training-time only: `write_back()` puts a learned scale into the wrapped quantizer,
which is what gets saved.
"""
from __future__ import annotations

import torch
from torch import nn

from vitquant.quantizers.uniform import UniformQuantizer

_MIN_SCALE = 1e-8


def round_ste(x: torch.Tensor) -> torch.Tensor:
    """round(x) forward, identity backward. (round(x) − x) + x is exactly round(x) in floating point:
    the difference is exact (Sterbenz) and adding x back gives the representable round(x)."""
    return (torch.round(x) - x).detach() + x


class LearnedScaleUniform(nn.Module):
    def __init__(self, quantizer: UniformQuantizer, learn_scale: bool = True) -> None:
        super().__init__()
        if not quantizer.calibrated:
            raise ValueError(f"quantizer {quantizer.name!r} must be fitted before its scale is learned")
        self.base = quantizer
        self.scale = nn.Parameter(quantizer.scale.detach().clone(), requires_grad=learn_scale)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        q = self.base
        s = q._broadcast(self.scale.clamp_min(_MIN_SCALE), x)
        z = q._broadcast(q.zero_point, x)
        return (torch.clamp(round_ste(x / s) + z, q.qmin, q.qmax) - z) * s

    @torch.no_grad()
    def write_back(self) -> None:
        self.base.set_params(self.scale.clamp_min(_MIN_SCALE), self.base.zero_point)


class StraightThrough(nn.Module):
    def __init__(self, quantizer: nn.Module) -> None:
        super().__init__()
        self.base = quantizer

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # quantizers that already carry their own STE (e.g. SULQ) pass their gradient unchanged
        if getattr(self.base, "passes_gradient", False):
            return self.base(x)
        return x + (self.base(x) - x).detach()

    def write_back(self) -> None:
        pass
