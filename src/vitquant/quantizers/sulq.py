"""SULQ, the shift-uniform-log2 quantizer for post-softmax attention (I&S-ViT, Zhong et al.,
arXiv 2311.10126, §4.1):

    x_q = UQ(−log2(x + η))                  uniform b-bit quantizer on [min, max] of −log2(x + η)
    x̂  = 2^(−round(D-UQ(x_q))) − η           D-UQ(x_q) = s·(x_q − z), the uniform dequantization

The shift η keeps x = 0 finite (−log2 η) so the whole domain [0, 1] fits on the grid — a plain log2
quantizer sends everything below 2^−(2^b−1) to one code or to zero — and the uniform step over the log
domain adapts to its range. Rounding the dequantized exponent makes every x̂ + η a power of two, so
softmax·V stays a shift-and-add minus the constant η·ΣV. η is picked from `DEFAULT_ETAS` by the MSE
of x̂ on calibration data and then frozen; the uniform range is the min/max of −log2(x + η) there.

Notes (see also methods/ias_vit.py):
- research notes (ptq_methods.md) write x̂ = 2^(round(D-UQ(x_q))) − η; with x_q = UQ(−log2(x+η))
  only the negated exponent inverts the transform, as the brief and the official code
  (which works with +log2 and 2^(+round)) agree.
- UQ is the standard asymmetric quantizer (s = (max − min)/(2^b − 1), z = round(−min/s), codes
  0..2^b−1). The official code anchors the grid at min without rounding z and dequantizes with step
  (max − min)/2^b and codes 0..2^b (2^b + 1 levels); we follow the paper.
- x̂ is not clamped at 0: for x near 0, 2^(−round(·)) can fall below η and x̂ is slightly negative
  (e.g. −0.0022 at 3 bits, η = 0.01). The paper does not clamp; clamping would break the
  shift-and-add form above.
- `passes_gradient`: the forward uses round_ste (as the official code does), so block
  reconstruction can train the layers before it; forward values are those of torch.round.
"""
from __future__ import annotations

from typing import Any, ClassVar

import torch

from vitquant.quantizers.base import Quantizer, _as_list, register_quantizer
from vitquant.quantizers.ranges import RangeRule, channels_last_2d
from vitquant.quantizers.ste import round_ste
from vitquant.quantizers.uniform import UniformQuantizer

# the official code's η grid (quant/quantizer.py, LogSqrt2Quantizer.init_quantization_scale)
DEFAULT_ETAS = (0.001, 0.005, 0.01, 0.02, 0.03, 0.04, 0.05, 0.1, 0.2, 0.5, 1.0)
_TINY = 1e-12  # keeps log2 finite if a caller feeds values below −η (softmax never does)


@register_quantizer
class ShiftUniformLog2Quantizer(Quantizer):
    kind = "sulq"
    passes_gradient: ClassVar[bool] = True

    def __init__(self, bits: int, etas: tuple[float, ...] = DEFAULT_ETAS, name: str = "") -> None:
        super().__init__(bits, name)
        if not etas or any(e <= 0 for e in etas):
            raise ValueError(f"SULQ shift candidates must be positive, got {etas}")
        self.etas = tuple(float(e) for e in etas)
        self.qmax = 2**bits - 1
        self.register_buffer("eta", None)
        self.register_buffer("scale", None)
        self.register_buffer("zero_point", None)

    @property
    def calibrated(self) -> bool:
        return self.scale is not None

    # -- math ---------------------------------------------------------------------------------------
    @staticmethod
    def _log_domain(x: torch.Tensor, eta: torch.Tensor) -> torch.Tensor:
        return -torch.log2((x + eta).clamp_min(_TINY))

    def _fake(self, x: torch.Tensor, eta: torch.Tensor, scale: torch.Tensor, zero_point: torch.Tensor) -> torch.Tensor:
        codes = torch.clamp(round_ste(self._log_domain(x, eta) / scale) + zero_point, 0, self.qmax)
        return torch.exp2(-round_ste((codes - zero_point) * scale)) - eta

    def quantize(self, x: torch.Tensor) -> torch.Tensor:
        """Integer codes (as float) in 0..2^b−1."""
        return torch.clamp(torch.round(self._log_domain(x, self.eta) / self.scale) + self.zero_point, 0, self.qmax)

    def dequantize(self, codes: torch.Tensor) -> torch.Tensor:
        return torch.exp2(-torch.round((codes - self.zero_point) * self.scale)) - self.eta

    def fake_quant(self, x: torch.Tensor) -> torch.Tensor:
        return self._fake(x, self.eta, self.scale, self.zero_point)

    def set_params(self, eta: torch.Tensor | float, scale: torch.Tensor | float, zero_point: torch.Tensor | float) -> None:
        self.eta, self.scale, self.zero_point = (torch.as_tensor(v, dtype=torch.float32).reshape(()).clone()
                                                 for v in (eta, scale, zero_point))

    # -- fitting ------------------------------------------------------------------------------------
    def _params_for(self, eta: float, lo: torch.Tensor, hi: torch.Tensor) -> tuple[torch.Tensor, ...]:
        eta_t = torch.tensor(eta)
        # −log2 is decreasing: the largest x gives the bottom of the log-domain range
        log_lo, log_hi = self._log_domain(hi, eta_t), self._log_domain(lo, eta_t)
        scale, zero_point = UniformQuantizer(self.bits).params_for_range(log_lo, log_hi)
        return eta_t, scale, zero_point

    @torch.no_grad()
    def fit(self, x: torch.Tensor, rule: RangeRule | None = None, lo: torch.Tensor | None = None,
            hi: torch.Tensor | None = None):
        """Grid-search η by the MSE of x̂ on x; the log-domain range is min/max (the paper's UQ), so
        `rule` is not used. lo/hi: the exact extremes of the stream when x is only a sample."""
        rows = channels_last_2d(x, None)
        lo = rows.min() if lo is None else lo.reshape(-1).min().float()
        hi = rows.max() if hi is None else hi.reshape(-1).max().float()
        best_err, best = None, None
        for eta in self.etas:
            params = self._params_for(eta, lo, hi)
            err = (self._fake(rows, *params) - rows).pow(2).mean()
            if best_err is None or err < best_err:
                best_err, best = err, params
        self.set_params(*best)
        return self

    # -- serialization ------------------------------------------------------------------------------
    def spec(self) -> dict[str, Any]:
        fitted = self.calibrated
        return {"type": self.kind, "bits": self.bits, "etas": list(self.etas),
                "eta": _as_list(self.eta) if fitted else None,
                "scale": _as_list(self.scale) if fitted else None,
                "zero_point": _as_list(self.zero_point) if fitted else None}

    @classmethod
    def from_spec(cls, spec: dict[str, Any]) -> "ShiftUniformLog2Quantizer":
        q = cls(spec["bits"], tuple(spec.get("etas") or DEFAULT_ETAS))
        if spec.get("scale") is not None:
            q.set_params(spec["eta"], spec["scale"], spec["zero_point"])
        return q

    def extra_repr(self) -> str:
        eta = f", eta={float(self.eta):g}" if self.calibrated else ""
        return f"bits={self.bits}{eta}, calibrated={self.calibrated}"
