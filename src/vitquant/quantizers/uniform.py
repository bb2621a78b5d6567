"""Uniform (affine) quantization: x_int = clamp(round(x / s) + z, qmin, qmax), x̂ = (x_int − z) · s.

Granularity is one axis: None for per-tensor, the output-channel axis for per-channel weights, the
channel axis of an activation for channel-wise activations, or the head axis of a [B, H, N, d] tensor
for per-head scales — per-head is per-channel along axis 1.
"""
from __future__ import annotations

from typing import Any

import torch

from vitquant.quantizers.base import Quantizer, _as_list, register_quantizer
from vitquant.quantizers.ranges import RangeRule, candidate_ranges, channels_last_2d

_EPS = 1e-8


@register_quantizer
class UniformQuantizer(Quantizer):
    kind = "uniform"

    def __init__(self, bits: int, symmetric: bool = False, channel_axis: int | None = None, name: str = "") -> None:
        super().__init__(bits, name)
        self.symmetric = symmetric
        self.channel_axis = channel_axis
        # symmetric uses the narrow range ±(2^(b-1)-1) so that -x quantizes like x (what int8 weight kernels expect)
        self.qmin = -(2 ** (bits - 1) - 1) if symmetric else 0
        self.qmax = 2 ** (bits - 1) - 1 if symmetric else 2**bits - 1
        self.register_buffer("scale", None)
        self.register_buffer("zero_point", None)

    @property
    def calibrated(self) -> bool:
        return self.scale is not None

    # -- parameters ---------------------------------------------------------------------------------
    def params_for_range(self, lo: torch.Tensor, hi: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(scale, zero_point) that map [lo, hi] onto the integer grid."""
        if self.symmetric:
            scale = torch.maximum(lo.abs(), hi.abs()) / self.qmax
            return scale.clamp_min(_EPS), torch.zeros_like(scale)
        scale = ((hi - lo) / (self.qmax - self.qmin)).clamp_min(_EPS)
        return scale, torch.round(-lo / scale)

    def set_params(self, scale: torch.Tensor, zero_point: torch.Tensor) -> None:
        self.scale = scale.detach().float().clone()
        self.zero_point = zero_point.detach().float().clone()

    def set_range(self, lo: torch.Tensor, hi: torch.Tensor) -> None:
        self.set_params(*self.params_for_range(lo, hi))

    # -- math ---------------------------------------------------------------------------------------
    def _broadcast(self, t: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
        if self.channel_axis is None or t.numel() == 1:
            return t.reshape(())
        shape = [1] * x.dim()
        shape[self.channel_axis] = -1
        return t.reshape(shape)

    # The arithmetic runs in place on one fresh tensor: the same operations in the same order (so the
    # same values) as clamp(round(x / s) + z, qmin, qmax), without a new tensor per step — on a CPU each
    # large new tensor costs page faults that took longer than the arithmetic itself.
    def quantize(self, x: torch.Tensor, scale: torch.Tensor | None = None, zero_point: torch.Tensor | None = None):
        """Integer codes (as float) of x."""
        s = self._broadcast(self.scale if scale is None else scale, x)
        z = self._broadcast(self.zero_point if zero_point is None else zero_point, x)
        q = torch.div(x, s)
        if q.requires_grad:  # autograd cannot differentiate in-place rounding of its input here
            return torch.clamp(torch.round(q) + z, self.qmin, self.qmax)
        return q.round_().add_(z).clamp_(self.qmin, self.qmax)

    def dequantize(self, q: torch.Tensor) -> torch.Tensor:
        return (q - self._broadcast(self.zero_point, q)) * self._broadcast(self.scale, q)

    def fake_quant(self, x: torch.Tensor) -> torch.Tensor:
        q = self.quantize(x)
        if q.requires_grad:
            return self.dequantize(q)
        return q.sub_(self._broadcast(self.zero_point, q)).mul_(self._broadcast(self.scale, q))

    # -- fitting ------------------------------------------------------------------------------------
    def fit(self, x: torch.Tensor, rule: RangeRule, lo: torch.Tensor | None = None, hi: torch.Tensor | None = None):
        """Set the range from a tensor (weights, or an observer's sample) by `rule`.

        lo/hi: exact running min/max when x is only a sample of a larger stream (observers know them).
        """
        rows = channels_last_2d(x, self.channel_axis)  # [K, C]
        cands = candidate_ranges(rows, rule, lo, hi)
        if len(cands) == 1:
            self.set_range(*cands[0])
            return self
        best_err, best = None, None
        for c_lo, c_hi in cands:
            s, z = self.params_for_range(c_lo, c_hi)
            # ((clamp(round(rows / s) + z) − z)·s − rows)², in place (see quantize)
            err = torch.div(rows, s).round_().add_(z).clamp_(self.qmin, self.qmax).sub_(z).mul_(s).sub_(rows)
            err = err.square_().mean(dim=0)  # per channel: channels are independent
            if best is None:
                best_err, best = err, (s, z)
            else:
                better = err < best_err
                best_err = torch.where(better, err, best_err)
                best = (torch.where(better, s, best[0]), torch.where(better, z, best[1]))
        self.set_params(*best)
        return self

    # -- serialization ------------------------------------------------------------------------------
    def spec(self) -> dict[str, Any]:
        return {
            "type": self.kind,
            "bits": self.bits,
            "symmetric": self.symmetric,
            "channel_axis": self.channel_axis,
            "scale": _as_list(self.scale) if self.calibrated else None,
            "zero_point": _as_list(self.zero_point) if self.calibrated else None,
        }

    @classmethod
    def from_spec(cls, spec: dict[str, Any]) -> "UniformQuantizer":
        q = cls(spec["bits"], spec["symmetric"], spec["channel_axis"])
        if spec.get("scale") is not None:
            q.set_params(torch.tensor(spec["scale"], dtype=torch.float64), torch.tensor(spec["zero_point"], dtype=torch.float64))
        return q

    def extra_repr(self) -> str:
        gran = "tensor" if self.channel_axis is None else f"axis {self.channel_axis}"
        return f"bits={self.bits}, {'sym' if self.symmetric else 'asym'}, per-{gran}, calibrated={self.calibrated}"
