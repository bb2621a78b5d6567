"""AdaRound: learned up/down rounding of weights on a fixed uniform grid.

Nagel et al., "Up or Down? Adaptive Rounding for Post-Training Quantization", ICML 2020:
    W̃ = s · (clamp(⌊W/s⌋ + h(V) + z, qmin, qmax) − z),   h(V) = clamp(σ(V)(ζ − γ) + γ, 0, 1)
with the rectified sigmoid's stretch ζ = 1.1, γ = −0.1 (eq. 23), V initialised so that h(V) equals the
fractional part of W/s (BRECQ's initialisation: the soft weights start at the float weights), and the
regulariser f_reg = Σ 1 − |2h(V) − 1|^β (eq. 24), whose β is annealed from 20 to 2 so every h(V)
ends at 0 or 1. After optimisation `hard_weight()` rounds up where h(V) ≥ 0.5 (V ≥ 0 at the end):
that tensor lies exactly on the quantizer's grid, so the quantizer reproduces it bit for bit and the
saved integer codes are the learned rounding.

The grid (scale, zero point) is the fitted `UniformQuantizer`'s and is not learned here.
"""
from __future__ import annotations

import math

import torch
from torch import nn

from vitquant.quantizers.uniform import UniformQuantizer

ZETA, GAMMA = 1.1, -0.1


class AdaRoundWeight(nn.Module):
    def __init__(self, quantizer: UniformQuantizer, weight: torch.Tensor) -> None:
        super().__init__()
        if not isinstance(quantizer, UniformQuantizer) or not quantizer.calibrated:
            raise ValueError("AdaRound needs a fitted UniformQuantizer for the weight")
        self.base = quantizer
        w = weight.detach()
        s = quantizer._broadcast(quantizer.scale, w)
        self.register_buffer("w_floor", torch.floor(w / s))
        rest = (w / s - self.w_floor).clamp(1e-6, 1 - 1e-6)  # h(V) = rest ⇔ σ(V) = (rest − γ)/(ζ − γ)
        self.v = nn.Parameter(-torch.log((ZETA - GAMMA) / (rest - GAMMA) - 1))

    def h(self) -> torch.Tensor:
        return torch.clamp(torch.sigmoid(self.v) * (ZETA - GAMMA) + GAMMA, 0, 1)

    def _on_grid(self, offset: torch.Tensor) -> torch.Tensor:
        q = self.base
        s = q._broadcast(q.scale, self.w_floor)
        z = q._broadcast(q.zero_point, self.w_floor)
        return (torch.clamp(self.w_floor + offset + z, q.qmin, q.qmax) - z) * s

    def forward(self, weight: torch.Tensor | None = None) -> torch.Tensor:
        """Soft-quantized weight (the float weight argument is ignored: the rounding is what learns)."""
        return self._on_grid(self.h())

    @torch.no_grad()
    def hard_weight(self) -> torch.Tensor:
        return self._on_grid((self.v >= 0).to(self.w_floor.dtype))

    def regularizer(self, beta: float) -> torch.Tensor:
        return (1 - (2 * self.h() - 1).abs().pow(beta)).sum()


def beta_schedule(step: int, iters: int, warmup: float, start: float = 20.0, end: float = 2.0) -> float | None:
    """β of the rounding regulariser at `step`: None during the warm-up (no regularisation, as in
    BRECQ), then linear from `start` to `end` (AdaRound's annealing)."""
    first = math.floor(warmup * iters)
    if step < first:
        return None
    t = (step - first) / max(1, iters - first)
    return end + (start - end) * max(0.0, 1.0 - t)
