"""Twin uniform quantization (PTQ4ViT, Yuan et al., "PTQ4ViT: Post-Training Quantization for Vision
Transformers with Twin Uniform Quantization", ECCV 2022, §4.1).

A k-bit code is a 1-bit range flag (the MSB) plus k−1 bits of a uniform grid; the two ranges have
their own steps, whose ratio is a power of two so that an integer kernel aligns them by a shift.

Post-softmax (values in [0, 1], most of them tiny, the few large ones decisive):
    n = 2^(k−1) − 1,  low range [0, split) with step split/n,  high range [split, 1] with step 1/n.
    code c ∈ [0, 2^k − 1]: c < 2^(k−1) → c·split/n ; otherwise (c − 2^(k−1))/n.
    split ∈ {2^−i}, so the step ratio is 2^i. 1.0 is exactly representable (top high-range code).
Post-GELU (values ≥ −0.16997, the minimum of GELU, with a long positive tail):
    negative range [−0.16997, 0] with the fixed step 0.16997/2^(k−1) (codes −2^(k−1)…0),
    positive range with a searched step Δ+ (codes 0…2^(k−1)−1).
    The code is an ordinary signed k-bit integer whose sign bit picks the step.

Deviations from the official code (hahnyuan/PTQ4ViT, `SoSPTQSL…QuantMatMul.quant_input_A`): the code
computes the post-softmax value as Q_high(clamp(x, split, 1)) + Q_low(clamp(x, 0, split)), which adds
`split` to every high-range value and round(split·n)/n to every low-range one; here each value is
quantized by the one range it falls in, as the paper's piecewise definition says. For split ≤ 1/(2n)
(the splits the code's search usually picks) the low-range offset is 0 and only the high range
differs. Post-GELU matches the code (there the two clamped parts never overlap).
"""
from __future__ import annotations

from typing import Any

import torch

from vitquant.quantizers.base import Quantizer, _as_list, register_quantizer
from vitquant.quantizers.ranges import RangeRule

# −min_x GELU(x): the official code's constant (float64 minimum: 0.1699712075, 3.5e-8 less)
GELU_MIN = 0.16997124254703522
SPLIT_EXPONENTS = 20  # PTQ4ViT searches split ∈ {2^−i, i = 0..19}
_EPS = 1e-8


def _check_bits(bits: int, what: str) -> None:
    if bits < 2:
        raise ValueError(f"{what} needs at least 2 bits (1 range bit + 1 value bit), got {bits}")


# -- functional forms (the method's scale searches call these with broadcast candidate tensors) -------
# Each value's grid is picked by one comparison; dividing by the per-value inverse step (n/split or n)
# rather than multiplying by the step keeps 1.0 = n/n exact in float.
def _softmax_inv_step(x: torch.Tensor, split: torch.Tensor | float, bits: int) -> torch.Tensor:
    n = 2 ** (bits - 1) - 1
    split = torch.as_tensor(split, dtype=x.dtype, device=x.device)
    return torch.where(x < split, n / split, torch.tensor(float(n), dtype=x.dtype, device=x.device))


def softmax_twin_codes(x: torch.Tensor, split: torch.Tensor | float, bits: int) -> torch.Tensor:
    """Codes in [0, 2^k − 1]: the MSB is set for the high range [split, 1]."""
    half, n = 2 ** (bits - 1), 2 ** (bits - 1) - 1
    split = torch.as_tensor(split, dtype=x.dtype, device=x.device)
    values = (x * _softmax_inv_step(x, split, bits)).round_().clamp_(0, n)
    return torch.where(x < split, values, values + half)


def softmax_twin_dequant(codes: torch.Tensor, split: torch.Tensor | float, bits: int) -> torch.Tensor:
    half, n = 2 ** (bits - 1), 2 ** (bits - 1) - 1
    split = torch.as_tensor(split, dtype=codes.dtype, device=codes.device)
    return torch.where(codes >= half, (codes - half) / n, codes / (n / split))


def softmax_twin_fake_quant(x: torch.Tensor, split: torch.Tensor | float, bits: int) -> torch.Tensor:
    inv = _softmax_inv_step(x, split, bits)
    return (x * inv).round_().clamp_(0, 2 ** (bits - 1) - 1).div_(inv)


def gelu_neg_scale(bits: int) -> float:
    return GELU_MIN / 2 ** (bits - 1)


def _gelu_step(x: torch.Tensor, pos_scale: torch.Tensor | float, bits: int, neg_scale: float | None) -> torch.Tensor:
    neg_scale = gelu_neg_scale(bits) if neg_scale is None else neg_scale
    return torch.where(x < 0, neg_scale, torch.as_tensor(pos_scale, dtype=x.dtype, device=x.device))


def gelu_twin_codes(x: torch.Tensor, pos_scale: torch.Tensor | float, bits: int, neg_scale: float | None = None):
    """Signed k-bit codes; a negative x never rounds above 0, a positive one never below."""
    half = 2 ** (bits - 1)
    return (x / _gelu_step(x, pos_scale, bits, neg_scale)).round_().clamp_(-half, half - 1)


def gelu_twin_dequant(codes: torch.Tensor, pos_scale: torch.Tensor | float, bits: int, neg_scale: float | None = None):
    return codes * _gelu_step(codes, pos_scale, bits, neg_scale)


def gelu_twin_fake_quant(x: torch.Tensor, pos_scale: torch.Tensor | float, bits: int, neg_scale: float | None = None):
    half = 2 ** (bits - 1)
    step = _gelu_step(x, pos_scale, bits, neg_scale)
    return (x / step).round_().clamp_(-half, half - 1).mul_(step)


# -- quantizer modules --------------------------------------------------------------------------------
@register_quantizer
class TwinUniformSoftmaxQuantizer(Quantizer):
    """Post-softmax twin uniform quantizer; one parameter, the split between the two ranges."""

    kind = "twin_uniform_softmax"

    def __init__(self, bits: int, name: str = "") -> None:
        _check_bits(bits, "a twin uniform quantizer")
        super().__init__(bits, name)
        self.register_buffer("split", None)

    @property
    def calibrated(self) -> bool:
        return self.split is not None

    def set_split(self, split: torch.Tensor | float) -> None:
        split = float(split)
        if not 0 < split <= 1:
            raise ValueError(f"twin uniform softmax split must be in (0, 1], got {split}")
        self.split = torch.tensor(split, dtype=torch.float32)

    def quantize(self, x: torch.Tensor) -> torch.Tensor:
        """Codes in [0, 2^k − 1]; the MSB says which range (set: high range [split, 1])."""
        return softmax_twin_codes(x, self.split, self.bits)

    def dequantize(self, codes: torch.Tensor) -> torch.Tensor:
        return softmax_twin_dequant(codes, self.split, self.bits)

    def fake_quant(self, x: torch.Tensor) -> torch.Tensor:
        return softmax_twin_fake_quant(x, self.split, self.bits)

    def fit(self, x: torch.Tensor, rule: RangeRule | None = None, lo=None, hi=None) -> "TwinUniformSoftmaxQuantizer":
        """Split ∈ {2^−i, i = 0..19} with the least quantization MSE of x itself (the method searches
        with its own output metric instead; this is for use outside it)."""
        x = x.detach().float().reshape(-1)
        errs = [(softmax_twin_fake_quant(x, 2.0**-i, self.bits) - x).pow(2).mean() for i in range(SPLIT_EXPONENTS)]
        self.set_split(2.0 ** -int(torch.stack(errs).argmin()))
        return self

    def spec(self) -> dict[str, Any]:
        return {"type": self.kind, "bits": self.bits, "split": float(self.split) if self.calibrated else None}

    @classmethod
    def from_spec(cls, spec: dict[str, Any]) -> "TwinUniformSoftmaxQuantizer":
        q = cls(spec["bits"])
        if spec.get("split") is not None:
            q.set_split(spec["split"])
        return q

    def extra_repr(self) -> str:
        return f"bits={self.bits}, split={float(self.split) if self.calibrated else None}"


@register_quantizer
class TwinUniformGeluQuantizer(Quantizer):
    """Post-GELU twin uniform quantizer: fixed negative step, searched positive step."""

    kind = "twin_uniform_gelu"

    def __init__(self, bits: int, name: str = "") -> None:
        _check_bits(bits, "a twin uniform quantizer")
        super().__init__(bits, name)
        self.neg_scale = gelu_neg_scale(bits)
        self.register_buffer("pos_scale", None)

    @property
    def calibrated(self) -> bool:
        return self.pos_scale is not None

    def set_pos_scale(self, scale: torch.Tensor | float) -> None:
        self.pos_scale = torch.as_tensor(scale, dtype=torch.float32).reshape(()).clone().clamp_min(_EPS)

    def quantize(self, x: torch.Tensor) -> torch.Tensor:
        """Signed k-bit codes: negative codes use the fixed step, the others the positive step."""
        return gelu_twin_codes(x, self.pos_scale, self.bits, self.neg_scale)

    def dequantize(self, codes: torch.Tensor) -> torch.Tensor:
        return gelu_twin_dequant(codes, self.pos_scale, self.bits, self.neg_scale)

    def fake_quant(self, x: torch.Tensor) -> torch.Tensor:
        return gelu_twin_fake_quant(x, self.pos_scale, self.bits, self.neg_scale)

    def fit(self, x: torch.Tensor, rule: RangeRule | None = None, lo=None, hi=None, candidates: int = 101,
            alpha: float = 0.01, beta: float = 1.2) -> "TwinUniformGeluQuantizer":
        """Positive step = m · max(x)/(2^(k−1) − 0.5), m on PTQ4ViT's linear grid [alpha, beta], picked by
        the quantization MSE of x itself."""
        x = x.detach().float().reshape(-1)
        top = float(x.max() if hi is None else hi.max())
        base = max(top, _EPS) / (2 ** (self.bits - 1) - 0.5)
        mults = torch.linspace(alpha, beta, candidates)
        errs = [(gelu_twin_fake_quant(x, base * float(m), self.bits, self.neg_scale) - x).pow(2).mean() for m in mults]
        self.set_pos_scale(base * float(mults[int(torch.stack(errs).argmin())]))
        return self

    def spec(self) -> dict[str, Any]:
        return {"type": self.kind, "bits": self.bits, "neg_scale": self.neg_scale,
                "pos_scale": _as_list(self.pos_scale) if self.calibrated else None}

    @classmethod
    def from_spec(cls, spec: dict[str, Any]) -> "TwinUniformGeluQuantizer":
        q = cls(spec["bits"])
        q.neg_scale = float(spec.get("neg_scale", q.neg_scale))
        if spec.get("pos_scale") is not None:
            q.set_pos_scale(spec["pos_scale"])
        return q

    def extra_repr(self) -> str:
        pos = float(self.pos_scale) if self.calibrated else None
        return f"bits={self.bits}, neg_scale={self.neg_scale:.6g}, pos_scale={pos}"
