"""TanQ, the tangent quantizer for post-softmax attention of DopQ-ViT (Yang, Gong, Lin et al.,
"DopQ-ViT: Towards Distribution-Friendly and Outlier-Aware Post-Training Quantization for Vision
Transformers", arXiv 2408.03291). No official code exists; this is a design from the paper's description.

What the paper states: post-softmax values follow a power law — most sit near 0, a few near 1 — and
the few near 1 matter (clipping the top 1% of values near 1 drops W4A4 ViT-B to 2.20%). Log2-style
quantizers spend almost every level near 0 and leave [0.5, 1] with one or two. TanQ is "a tangent
function" mapping that "focuses more on values near 1" while keeping resolution near 0.

Design (how the ambiguities are resolved):
- Mapping. Codes are uniform in the tangent domain of the normalized input u = x/s ∈ [0, 1]:
      code = round((2^b − 1) · (1 + tan(α(2u − 1)) / tan α) / 2),   clamped to [0, 2^b − 1],
  so the levels are
      x̂_k = s · (1/2 + arctan(v_k · tan α) / (2α)),   v_k = 2k/(2^b − 1) − 1.
  tan is steep near ±π/2, so the levels crowd at both ends of [0, s] and thin out in the middle —
  resolution near 0 and near 1, as the paper asks. α → 0 is the uniform quantizer; α → π/2 pushes
  every level to the two ends. The curve is symmetric about s/2: the paper describes one tangent curve
  and no asymmetry parameter.
- Parameters. α ∈ (0, π/2) is searched (least tensor MSE over a grid of tan α, as RepQ-ViT picks its
  log√2 scale); s is the observed maximum and is never clipped, because the paper's point is that the
  values near the top must survive. The endpoints are exact: 0 ↦ code 0 ↦ 0 and s ↦ code 2^b−1 ↦ s
  (an exact 1.0 in a softmax row stays 1.0 when s = 1).
- Rounding. "round in the tangent domain" is implemented with the equivalent decision thresholds
  x = s·(1/2 + arctan(((2k+1)/(2^b−1) − 1)·tan α)/(2α)), computed once in float64 — no tan of the data
  (tan blows up near ±π/2), and a lookup table of 2^b levels for dequantization (what an integer
  kernel would use).
"""
from __future__ import annotations

import math
from typing import Any

import torch

from vitquant.quantizers.base import Quantizer, _as_list, register_quantizer
from vitquant.quantizers.ranges import RangeRule, channels_last_2d

# tan α from nearly uniform (0.05) to levels crowded at both ends (1000), geometric
DEFAULT_TAN_GRID = tuple(float(t) for t in torch.logspace(math.log10(0.05), 3.0, 49, dtype=torch.float64))


def tan_levels(bits: int, alpha: float) -> tuple[torch.Tensor, torch.Tensor]:
    """(levels [2^b], thresholds [2^b − 1]) on [0, 1], float64 computed, returned as float32."""
    if not 0.0 < alpha < math.pi / 2:
        raise ValueError(f"TanQ alpha must be in (0, π/2), got {alpha}")
    n = 2**bits - 1
    k = torch.arange(2 * n + 1, dtype=torch.float64)  # even k: levels, odd k: midpoints in the tan domain
    v = k / n - 1.0
    grid = 0.5 + torch.atan(v * math.tan(alpha)) / (2 * alpha)
    grid[0], grid[-1] = 0.0, 1.0  # atan(tan α) need not round-trip: keep the endpoints exact
    return grid[0::2].float(), grid[1::2].float()


@register_quantizer
class TanQuantizer(Quantizer):
    kind = "tan"

    def __init__(self, bits: int, name: str = "") -> None:
        super().__init__(bits, name)
        self.alpha: float | None = None
        self.register_buffer("scale", None)
        self.register_buffer("levels", None, persistent=False)
        self.register_buffer("thresholds", None, persistent=False)

    @property
    def calibrated(self) -> bool:
        return self.scale is not None and self.alpha is not None

    def set_params(self, scale: torch.Tensor | float, alpha: float) -> None:
        self.scale = torch.as_tensor(scale, dtype=torch.float32).reshape(()).clone().clamp_min(1e-12)
        self.alpha = float(alpha)
        self.levels, self.thresholds = tan_levels(self.bits, self.alpha)

    def quantize(self, x: torch.Tensor) -> torch.Tensor:
        """Integer codes (int64). Values at or below 0 get code 0, values at or above s the last code."""
        # bucketize(right=False): code k for thresholds[k-1] < u <= thresholds[k]
        return torch.bucketize(x / self.scale, self.thresholds.to(x.device))

    def dequantize(self, codes: torch.Tensor) -> torch.Tensor:
        return self.levels.to(codes.device)[codes] * self.scale

    def fake_quant(self, x: torch.Tensor) -> torch.Tensor:
        return self.dequantize(self.quantize(x)).to(x.dtype)

    def fit(self, x: torch.Tensor, rule: RangeRule | None = None, lo: torch.Tensor | None = None,
            hi: torch.Tensor | None = None, tan_grid: tuple[float, ...] = DEFAULT_TAN_GRID) -> "TanQuantizer":
        """s = the exact maximum (`hi`, else max of x): TanQ never clips the top, so `rule`'s
        percentiles are ignored; α = the grid point with the least MSE on x."""
        rows = channels_last_2d(x, None).reshape(-1)
        scale = (rows.max() if hi is None else hi.max()).float().clamp_min(1e-12)
        best = None
        for t in tan_grid:
            self.set_params(scale, math.atan(t))
            err = (self.fake_quant(rows) - rows).pow(2).mean().item()
            if best is None or err < best[0]:
                best = (err, self.alpha)
        self.set_params(scale, best[1])
        return self

    def spec(self) -> dict[str, Any]:
        return {"type": self.kind, "bits": self.bits, "alpha": self.alpha,
                "scale": _as_list(self.scale) if self.calibrated else None}

    @classmethod
    def from_spec(cls, spec: dict[str, Any]) -> "TanQuantizer":
        q = cls(spec["bits"])
        if spec.get("scale") is not None:
            q.set_params(spec["scale"], spec["alpha"])
        return q

    def extra_repr(self) -> str:
        a = "?" if self.alpha is None else f"{math.tan(self.alpha):.3g}"
        return f"bits={self.bits}, tan(alpha)={a}, calibrated={self.calibrated}"
