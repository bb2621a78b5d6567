"""Power-of-Two Factor (PTF) quantization of LayerNorm inputs: FQ-ViT, Lin et al., "FQ-ViT: Post-Training
Quantization for Fully Quantized Vision Transformer", IJCAI 2022, §4.2.

One layer-wise step s and zero point zp for the whole tensor, and per channel c a power-of-two factor
2^α_c with α_c ∈ {0, …, K}:

    X_Q = clip(⌊X / (2^α_c·s)⌉ + zp, 0, 2^b − 1),     X̂ = (X_Q − zp) · 2^α_c·s          (Eq. 9)
    s   = (max X − min X) / (2^b − 1) / 2^K,  zp = clip(⌊−min X / (2^K·s)⌉, 0, 2^b − 1)  (Eq. 10)
    α_c = argmin_α ‖X_c − X̂_c(α)‖₂                                                      (Eq. 11)

The coarsest grid (α = K) is plain layer-wise min-max quantization; a channel with a small range takes
a grid up to 2^K times finer. Every channel shares zp, so (X_Q − zp) << α_c puts all channels on one
integer grid of step s with BitShifts only — the paper's integer LayerNorm (Phase 1/2) computes mean
and variance on those integers, which in float simulation equals LayerNorm of X̂.

Deviations and readings (each checked against the official code, megvii-research/FQ-ViT
`models/ptq/observer/ptf.py`):
- Eq. 11 as printed measures the pure rounding error ‖X_c − ⌊X_c/(2^α s)⌉·2^α s‖ (no zero point, no
  clip). Without the clip every coarser grid is a subset of the finest one, so α = 0 would win for
  every channel and PTF would do nothing; we measure the error of the full quantizer of Eq. 9 (clip
  included), as the code does.
- Eq. 10's zero point is computed with the coarse step 2^K·s (the code's `scale8`). FQ-ViT issue #34
  reads it as ⌊−min X / s⌉; that zero point is 2^K times larger and saturates at 2^b − 1 as soon as
  min X < −(max X − min X)/2^K, leaving no codes above zero, so we keep 2^K·s (paper text = code).
- The code picks α on the last calibration batch only; `fit` uses every row it is given (the
  observer's sample of all calibration images). Ties go to the smaller α (finer grid), as in the code.
- Range rules other than min-max (the paper's PTF uses min-max) pick, among their candidate ranges,
  the one whose PTF quantization has the least total squared error.
"""
from __future__ import annotations

from typing import Any

import torch

from vitquant.quantizers.base import Quantizer, _as_list, register_quantizer
from vitquant.quantizers.ranges import RangeRule, candidate_ranges, channels_last_2d

_EPS = 1e-8
MAX_FACTOR_LIMIT = 8  # 2^8 between the finest and coarsest grid is already far beyond what PTF needs


@register_quantizer
class PowerOfTwoFactorQuantizer(Quantizer):
    """Unsigned b-bit layer-wise quantizer with a per-channel power-of-two factor (FQ-ViT PTF)."""

    kind = "ptf"

    def __init__(self, bits: int, max_factor: int = 3, channel_axis: int = -1, name: str = "") -> None:
        super().__init__(bits, name)
        if not 0 <= max_factor <= MAX_FACTOR_LIMIT:
            raise ValueError(f"PTF max_factor K must be in 0..{MAX_FACTOR_LIMIT}, got {max_factor}")
        self.max_factor = max_factor
        self.channel_axis = channel_axis
        self.qmax = 2**bits - 1
        self.register_buffer("scale", None)  # s: the finest step (α = 0)
        self.register_buffer("zero_point", None)  # zp, shared by every channel
        self.register_buffer("alpha", None)  # α_c ∈ {0..K}, integer-valued, one per channel

    @property
    def calibrated(self) -> bool:
        return self.scale is not None

    # -- parameters ---------------------------------------------------------------------------------
    def params_for_range(self, lo: torch.Tensor, hi: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(s, zp) of Eq. 10 for the tensor-wide range [lo, hi]."""
        coarse = ((hi - lo) / self.qmax).clamp_min(_EPS)  # 2^K·s: the α = K step covers [lo, hi]
        zero_point = torch.clamp(torch.round(-lo / coarse), 0, self.qmax)
        return coarse / 2**self.max_factor, zero_point

    def set_params(self, scale: torch.Tensor, zero_point: torch.Tensor, alpha: torch.Tensor) -> None:
        alpha = torch.as_tensor(alpha, dtype=torch.float32).reshape(-1)
        if torch.any((alpha < 0) | (alpha > self.max_factor) | (alpha != alpha.round())):
            raise ValueError(f"PTF factors α must be integers in 0..{self.max_factor}")
        self.scale = torch.as_tensor(scale, dtype=torch.float32).reshape(()).clone()
        self.zero_point = torch.as_tensor(zero_point, dtype=torch.float32).reshape(()).clone()
        self.alpha = alpha.clone()

    def channel_scale(self) -> torch.Tensor:
        """2^α_c·s, the step of each channel."""
        return self.scale * torch.exp2(self.alpha)

    # -- math ---------------------------------------------------------------------------------------
    def _broadcast(self, t: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
        shape = [1] * x.dim()
        shape[self.channel_axis] = -1
        return t.reshape(shape)

    def _codes(self, x: torch.Tensor, step: torch.Tensor, zero_point: torch.Tensor) -> torch.Tensor:
        return torch.clamp(torch.round(x / step) + zero_point, 0, self.qmax)

    def quantize(self, x: torch.Tensor) -> torch.Tensor:
        """Integer codes X_Q (as float) of Eq. 9."""
        return self._codes(x, self._broadcast(self.channel_scale(), x), self.zero_point)

    def dequantize(self, q: torch.Tensor) -> torch.Tensor:
        return (q - self.zero_point) * self._broadcast(self.channel_scale(), q)

    def fake_quant(self, x: torch.Tensor) -> torch.Tensor:
        if x.shape[self.channel_axis] != self.alpha.numel():
            raise ValueError(f"PTF quantizer {self.name!r} was fitted for {self.alpha.numel()} channels, "
                             f"got a tensor with {x.shape[self.channel_axis]} on axis {self.channel_axis}")
        return self.dequantize(self.quantize(x))

    # -- fitting ------------------------------------------------------------------------------------
    def choose_factors(self, rows: torch.Tensor, scale: torch.Tensor, zero_point: torch.Tensor):
        """(α per channel, its squared error per channel) of Eq. 11 on [rows, C] data."""
        errs = []
        for a in range(self.max_factor + 1):
            step = scale * 2**a
            x_hat = (self._codes(rows, step, zero_point) - zero_point) * step
            errs.append((x_hat - rows).pow(2).sum(dim=0))
        errs = torch.stack(errs)  # [K+1, C]
        best = errs.argmin(dim=0)  # the first minimum: ties go to the finer grid, as in the official code
        return best.float(), errs.gather(0, best[None]).squeeze(0)

    def fit(self, x: torch.Tensor, rule: RangeRule | None = None, lo: torch.Tensor | None = None,
            hi: torch.Tensor | None = None) -> "PowerOfTwoFactorQuantizer":
        """Fit s, zp and α from x (or an observer's [rows, C] sample with the stream's exact lo/hi,
        per channel or per tensor)."""
        rule = rule or RangeRule("minmax")
        rows = channels_last_2d(x, self.channel_axis)  # [R, C]
        lo = rows.amin() if lo is None else lo.float().amin()
        hi = rows.amax() if hi is None else hi.float().amax()
        flat = rows.reshape(-1, 1)
        best = None
        for c_lo, c_hi in candidate_ranges(flat, rule, lo.reshape(1), hi.reshape(1)):
            scale, zero_point = self.params_for_range(c_lo.reshape(()), c_hi.reshape(()))
            alpha, err = self.choose_factors(rows, scale, zero_point)
            if best is None or err.sum() < best[0]:
                best = (err.sum(), scale, zero_point, alpha)
        self.set_params(*best[1:])
        return self

    # -- serialization ------------------------------------------------------------------------------
    def spec(self) -> dict[str, Any]:
        return {
            "type": self.kind,
            "bits": self.bits,
            "max_factor": self.max_factor,
            "channel_axis": self.channel_axis,
            "scale": _as_list(self.scale) if self.calibrated else None,
            "zero_point": _as_list(self.zero_point) if self.calibrated else None,
            "alpha": _as_list(self.alpha) if self.calibrated else None,
        }

    @classmethod
    def from_spec(cls, spec: dict[str, Any]) -> "PowerOfTwoFactorQuantizer":
        q = cls(spec["bits"], spec["max_factor"], spec["channel_axis"])
        if spec.get("scale") is not None:
            q.set_params(torch.tensor(spec["scale"], dtype=torch.float64), torch.tensor(spec["zero_point"]),
                         torch.tensor(spec["alpha"]))
        return q

    def extra_repr(self) -> str:
        return f"bits={self.bits}, K={self.max_factor}, axis {self.channel_axis}, calibrated={self.calibrated}"
