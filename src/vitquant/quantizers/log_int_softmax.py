"""Log-Int-Softmax (LIS): FQ-ViT, Lin et al., IJCAI 2022, §4.3 — the attention probabilities as b-bit log2
codes, computed from the *quantized attention scores* with I-BERT's integer exponential (Kim et al.,
"I-BERT: Integer-only BERT Quantization", ICML 2021, Alg. 1–2).

Input: scores x̂ = (q − z)·S already fake-quantized by the layer-wise uniform scores quantizer (scale S,
zero point z). Every value below is an integer; like FQ-ViT we simulate the integers in float tensors
(float64 here, exact below 2^53; FQ-ViT uses float32):

1. x = x̂/S − max_row(x̂/S) ≤ 0                        (the zero point cancels in the difference)
2. i-exp, exp(x·S) = 2^−q·exp(r·S) with x = q·x0 + r:  x0 = ⌊−ln2/S⌋, x ← max(x, n·x0) (n = 30),
   q = ⌊x/x0⌋, r = x − q·x0 ∈ (x0, 0];  exp(p) ≈ a·p² + b·p + c on [−ln 2, 0] (a, b, c = 0.35815147,
   0.96963238, 1, the code's coefficients, ≈ I-BERT's 0.3585·(p + 1.353)² + 0.344 expanded) gives
   z = r·(r + ⌊b/(a·S)⌋) + ⌊c/(a·S²)⌋  and  I_exp = max(⌊z·2^(n−q)⌋, 0)
3. ratio = ⌊Σ_row I_exp / I_exp⌉ ≥ 1                    (the probability is ≈ 1/ratio)
4. code = ⌊log2 ratio⌉, probability 2^−code             (a deployment computes P·V as V >> code)

What stays float: the three integer constants x0, ⌊b/(aS)⌋, ⌊c/(aS²)⌋ are derived from S (offline in
a deployment), and the output 2^−code is the dequantized probability the float P·V matmul consumes. The
scale of I_exp (a·S²/2^n) cancels in the ratio, so it is never formed.

Variants (`variant`), where the paper and the official code (`QIntSoftmax`) disagree on step 4:
- "paper": code = clip(⌊log2 ratio⌉, 0, 2^b − 1), the paper's log2 quantizer Attn_Q =
  clip(⌊−log2 Attn⌉, 0, 2^b − 1): round to nearest in the log domain (up from √2·2^k), and
  probabilities below the grid keep the smallest level 2^−(2^b−1).
- "code": `log_round` rounds up from 1.5·2^k (the bit after the leading one of the integer ratio), and
  codes ≥ 2^b are flushed to probability 0 (`softmax_mask`).
Edge cases (FQ-ViT issue #13, log2 of zero): I_exp = 0 — the polynomial constants round to 0 when S is
coarse (S ≳ 1.67, e.g. 4-bit scores spanning more than ~25) — makes ratio = Σ/0; FQ-ViT then produces
inf/NaN. Here such an entry counts as below the grid (variant rule above), so the output never holds
NaN. A row whose maximum dominates gives ratio 1, code 0: probability exactly 1.0. Rows that are
entirely −inf (fully masked) are not supported (ViT classification never masks).
"""
from __future__ import annotations

import math
from typing import Any, ClassVar

import torch

from vitquant.quantizers.base import Quantizer, _as_list, register_quantizer

# exp(p) ≈ A·p² + B·p + C on [−ln 2, 0]; the official code's coefficients (I-BERT's polynomial expanded)
EXP_POLY = (0.35815147, 0.96963238, 1.0)
LN2 = 0.6931  # the official code's −x0 (I-BERT's ln 2)
EXP_SHIFT = 30  # n: exponents below −n·ln 2 saturate (I-BERT "sufficiently large integer")
VARIANTS = ("paper", "code")


def integer_exp(x_int: torch.Tensor, scale: float) -> torch.Tensor:
    """I-BERT i-exp: integers I_exp ∝ exp(x_int·scale) for integer-valued x_int ≤ 0 (float64 tensor)."""
    a, b, c = EXP_POLY
    x0 = math.floor(-LN2 / scale)
    b_int = math.floor(b / a / scale)
    c_int = math.floor(c / a / scale**2)
    x = torch.maximum(x_int, torch.full_like(x_int, EXP_SHIFT * x0))
    q = torch.floor(x / x0)
    r = x - x0 * q
    z = r * (r + b_int) + c_int
    return torch.clamp(torch.floor(z * torch.exp2(EXP_SHIFT - q)), min=0)


def log2_round(ratio: torch.Tensor, variant: str) -> torch.Tensor:
    """⌊log2 ratio⌉ of integers ratio ≥ 1: to nearest in the log domain ("paper"), or up from 1.5·2^k,
    i.e. from the bit after the leading one ("code", the official `QIntSoftmax.log_round`)."""
    if variant == "paper":
        return torch.round(torch.log2(ratio))
    k = torch.floor(torch.log2(ratio))
    return k + (ratio - torch.exp2(k) >= torch.exp2(k - 1)).to(ratio.dtype)


@register_quantizer
class LogIntSoftmaxQuantizer(Quantizer):
    """Softmax and b-bit log2 quantization of its output in one, from quantized scores (FQ-ViT LIS).

    `from_scores`: its input is the attention scores, not the probabilities; it belongs on a
    `SoftmaxSite` (vitquant.models.qmodules), which otherwise computes the float softmax.
    """

    kind = "log_int_softmax"
    from_scores: ClassVar[bool] = True

    def __init__(self, bits: int = 4, variant: str = "paper", name: str = "") -> None:
        super().__init__(bits, name)
        if variant not in VARIANTS:
            raise ValueError(f"Log-Int-Softmax variant must be one of {VARIANTS}, got {variant!r}")
        self.variant = variant
        self.register_buffer("scores_scale", None)  # S of the uniform quantizer in front of it

    @property
    def calibrated(self) -> bool:
        return self.scores_scale is not None

    def set_scores_scale(self, scale: torch.Tensor | float) -> "LogIntSoftmaxQuantizer":
        scale = torch.as_tensor(scale, dtype=torch.float32)
        if scale.numel() != 1 or not float(scale) > 0:
            raise ValueError(f"Log-Int-Softmax needs one positive layer-wise scores scale, got {scale.tolist()}")
        self.scores_scale = scale.reshape(()).clone()
        return self

    def quantize(self, scores: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(codes, below-grid mask) along the last axis; masked entries are below the grid."""
        s = float(self.scores_scale)
        x = torch.round(scores.double() / s)  # the integer codes (q − z); rounding only absorbs float noise
        x = x - x.amax(dim=-1, keepdim=True)
        exp_int = integer_exp(x, s)
        total = exp_int.sum(dim=-1, keepdim=True)
        # I_exp = 0 is log2(Σ/0) (FQ-ViT issue #13): below any grid point, never a NaN
        below = exp_int == 0
        ratio = torch.round(total / exp_int.clamp_min(1)).clamp_min(1)
        codes = log2_round(ratio, self.variant)
        below = below | (codes > 2**self.bits - 1)
        return torch.clamp(codes, 0, 2**self.bits - 1), below

    def fake_quant(self, scores: torch.Tensor) -> torch.Tensor:
        codes, below = self.quantize(scores)
        probs = torch.exp2(-codes)
        if self.variant == "code":
            probs = torch.where(below, torch.zeros_like(probs), probs)
        else:  # the paper's clip: below-grid values keep the smallest level
            probs = torch.where(below, torch.full_like(probs, 2.0 ** -(2**self.bits - 1)), probs)
        return probs.to(scores.dtype)

    def spec(self) -> dict[str, Any]:
        return {"type": self.kind, "bits": self.bits, "variant": self.variant,
                "scores_scale": _as_list(self.scores_scale) if self.calibrated else None}

    @classmethod
    def from_spec(cls, spec: dict[str, Any]) -> "LogIntSoftmaxQuantizer":
        q = cls(spec["bits"], spec["variant"])
        if spec.get("scores_scale") is not None:
            q.set_scores_scale(spec["scores_scale"])
        return q

    def extra_repr(self) -> str:
        return f"bits={self.bits}, variant={self.variant}, calibrated={self.calibrated}"
