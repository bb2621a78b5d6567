"""Logarithmic quantizers for post-softmax attention (values in [0, 1], most of them near 0).

Log2:   q = clamp(round(−log2(x/s)), 0, 2^b−1), x̂ = s·2^(−q)
Log√2:  q = clamp(round(−2·log2(x/s)), 0, 2^b−1), x̂ = s·2^(−q/2)   (RepQ-ViT, Li et al. ICCV'23)
Both send x̂ to 0 when the unclamped code is ≥ 2^b (and for x = 0): the grid has no room for it.
Values above s clamp to code 0, i.e. x̂ = s.
"""
from __future__ import annotations

from typing import Any

import torch

from vitquant.quantizers.base import Quantizer, _as_list, register_quantizer
from vitquant.quantizers.ranges import RangeRule, candidate_ranges, channels_last_2d


class _LogQuantizer(Quantizer):
    # codes per octave: 1 for log2, 2 for log√2
    steps_per_octave: int = 1

    def __init__(self, bits: int, name: str = "") -> None:
        super().__init__(bits, name)
        self.register_buffer("scale", None)

    @property
    def calibrated(self) -> bool:
        return self.scale is not None

    def _codes(self, x: torch.Tensor, scale: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        ratio = (x / scale).clamp_min(0)
        # log2(0) = -inf gives raw = +inf: such values are marked as underflow and dequantize to 0
        raw = torch.round(-self.steps_per_octave * torch.log2(ratio))
        underflow = raw >= 2**self.bits  # +inf (x == 0) lands here too
        return torch.clamp(raw, 0, 2**self.bits - 1), underflow

    def _fake(self, x: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
        if torch.is_grad_enabled() and (x.requires_grad or scale.requires_grad):
            q, underflow = self._codes(x, scale)
            x_hat = scale * torch.exp2(-q / self.steps_per_octave)
            return torch.where(underflow, torch.zeros_like(x_hat), x_hat)
        # the same operations in place on one tensor (same values; fewer large allocations, see uniform.py)
        t = torch.div(x, scale).clamp_min_(0).log2_().mul_(-self.steps_per_octave).round_()
        underflow = t >= 2**self.bits
        t.clamp_(0, 2**self.bits - 1).neg_().div_(self.steps_per_octave).exp2_().mul_(scale)
        return t.masked_fill_(underflow, 0.0)

    def quantize(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(codes, underflow mask): underflowed values dequantize to 0 whatever their code."""
        return self._codes(x, self.scale)

    def fake_quant(self, x: torch.Tensor) -> torch.Tensor:
        return self._fake(x, self.scale)

    def set_scale(self, scale: torch.Tensor | float) -> None:
        self.scale = torch.as_tensor(scale, dtype=torch.float32).reshape(()).clone().clamp_min(1e-12)

    def fit(self, x: torch.Tensor, rule: RangeRule, lo: torch.Tensor | None = None, hi: torch.Tensor | None = None):
        """Scale = the top of the range (log grids hang down from s); mse picks among candidates."""
        rows = channels_last_2d(x, None)
        cands = [c_hi.reshape(()).clamp_min(1e-12) for _, c_hi in candidate_ranges(rows, rule, lo, hi)]
        errs = [(self._fake(rows, s) - rows).pow(2).mean() for s in cands]
        self.set_scale(cands[int(torch.stack(errs).argmin())])
        return self

    def spec(self) -> dict[str, Any]:
        return {"type": self.kind, "bits": self.bits, "scale": _as_list(self.scale) if self.calibrated else None}

    @classmethod
    def from_spec(cls, spec: dict[str, Any]):
        q = cls(spec["bits"])
        if spec.get("scale") is not None:
            q.set_scale(spec["scale"])
        return q


@register_quantizer
class Log2Quantizer(_LogQuantizer):
    kind = "log2"
    steps_per_octave = 1


@register_quantizer
class LogSqrt2Quantizer(_LogQuantizer):
    kind = "log_sqrt2"
    steps_per_octave = 2
