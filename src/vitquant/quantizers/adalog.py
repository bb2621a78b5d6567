"""The adaptive-base logarithmic quantizer of AdaLog (Wu et al., "AdaLog: Post-Training Quantization for
Vision Transformers with Adaptive Logarithm Quantizer", ECCV 2024).

A log quantizer whose base is 2^(q/r) with a fixed resolution r (37) and a searched integer q:

    code = clamp(round(−log2((x + c) / s) · r / q), 0, 2^b − 1),    x̂ + c = s · 2^(−code · q / r)

(codes whose unclamped value is ≥ 2^b, and x + c = 0, dequantize to x̂ + c = 0). q = 37 is log2,
q ≈ 18.5 is log√2; smaller q packs the levels more densely below s, larger q reaches further down.
The shift c is 0 for post-softmax and |min GELU| = 0.16997 for post-GELU inputs, which makes them
non-negative; the paper folds −W·c into the next Linear's bias ("bias reparameterization", see
`vitquant.methods.reparam.fold_input_shift`), after which the quantizer outputs x̂ + c (`shift_folded`).

Dequantization is the paper's integer-friendly table form: with e = ⌊code·q / r⌋ and j = code·q mod r
(integer arithmetic), x̂ + c = s · T[j] · 2^(−e), where T[j] = 2^(−j/r) is an r-entry table and 2^(−e)
a shift. Here T is exact (float64 → float32), so the table form equals s·2^(−code·q/r) to one rounding.

Deviation available as an option: `table="rounded"` reproduces the official code (GoatWu/AdaLog,
`AdaLogQuantizer.update_table`), which stores T[j] rounded to a multiple of 1/(2^(b+1) − 2); the paper
does not state such a rounding.
"""
from __future__ import annotations

from typing import Any

import torch

from vitquant.quantizers.base import Quantizer, _as_list, register_quantizer

R_DEFAULT = 37  # the paper's base resolution: base = 2^(q/37)
GELU_SHIFT = 0.16997124254703522  # −min GELU(x), what AdaLog adds to post-GELU activations
TABLES = ("exact", "rounded")


def mantissa_table(r: int, bits: int, table: str = "exact") -> torch.Tensor:
    """T[j] = 2^(−j/r), j = 0..r−1 (float32); "rounded": on the official code's 1/(2^(b+1) − 2) grid."""
    if table not in TABLES:
        raise ValueError(f"AdaLog table must be one of {TABLES}, not {table!r}")
    t = torch.exp2(-torch.arange(r, dtype=torch.float64) / r)
    if table == "rounded":
        step = 1.0 / (2 ** (bits + 1) - 2)
        t = torch.round(t / step) * step
    return t.float()


def adalog_codes(x: torch.Tensor, scale: torch.Tensor, q: torch.Tensor | int, r: int, bits: int,
                 shift: float = 0.0) -> tuple[torch.Tensor, torch.Tensor]:
    """(integer codes held in a float tensor, underflow mask). scale and q broadcast against x (a
    leading candidate axis is how the search evaluates many (q, s) pairs at once)."""
    ratio = ((x + shift) / scale).clamp_min(0)
    q = torch.as_tensor(q, dtype=torch.float32, device=x.device)
    # log2(0) = −inf gives +inf: such inputs underflow to 0, as do codes past the last one
    if ratio.requires_grad or torch.broadcast_shapes(ratio.shape, q.shape) != ratio.shape:
        raw = torch.round(-torch.log2(ratio) * (r / q))
        underflow = raw >= 2**bits
        return torch.clamp(raw, 0, 2**bits - 1), underflow
    # the same operations in place on the fresh `ratio` (a search evaluates candidate-sized tensors)
    raw = ratio.log2_().neg_().mul_(r / q).round_()
    underflow = raw >= 2**bits
    return raw.clamp_(0, 2**bits - 1), underflow


def adalog_dequantize(codes: torch.Tensor, underflow: torch.Tensor, scale: torch.Tensor, q: torch.Tensor | int,
                      r: int, table: torch.Tensor) -> torch.Tensor:
    """x̂ + c = s · T[code·q mod r] · 2^(−⌊code·q / r⌋).

    The integer arithmetic runs on float32 holding integers: code·q < 2^16 is exact, IEEE division is
    correctly rounded so ⌊code·q / r⌋ is exact, and 2^(−e) is exact; float tensors keep it fast.
    """
    prod = codes * torch.as_tensor(q, dtype=torch.float32, device=codes.device)
    e = torch.floor(prod / r)
    mant = torch.take(table.to(codes.device), (prod - e * r).long())
    return (mant * torch.exp2(-e) * scale).masked_fill_(underflow, 0.0)


@register_quantizer
class AdaLogQuantizer(Quantizer):
    kind = "adalog"

    def __init__(self, bits: int, q: int = R_DEFAULT, r: int = R_DEFAULT, shift: float = 0.0,
                 shift_folded: bool = False, table: str = "exact", name: str = "") -> None:
        super().__init__(bits, name)
        if r < 1 or q < 1:
            raise ValueError(f"AdaLog needs positive integers q and r, got q={q}, r={r}")
        self.q, self.r, self.shift, self.shift_folded, self.table = int(q), int(r), float(shift), shift_folded, table
        self.register_buffer("mantissa", mantissa_table(self.r, bits, table), persistent=False)
        self.register_buffer("scale", None)

    @property
    def calibrated(self) -> bool:
        return self.scale is not None

    @property
    def base(self) -> float:
        return 2.0 ** (self.q / self.r)

    def set_params(self, scale: torch.Tensor | float, q: int | None = None) -> None:
        self.scale = torch.as_tensor(scale, dtype=torch.float32).reshape(()).clone().clamp_min(1e-12)
        if q is not None:
            if int(q) < 1:
                raise ValueError(f"AdaLog q must be a positive integer, got {q}")
            self.q = int(q)

    def quantize(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(codes as float integers, underflow mask): underflowed values dequantize to −shift (0 after
        the fold)."""
        return adalog_codes(x, self.scale, self.q, self.r, self.bits, self.shift)

    def dequantize(self, codes: torch.Tensor, underflow: torch.Tensor) -> torch.Tensor:
        shifted = adalog_dequantize(codes, underflow, self.scale, self.q, self.r, self.mantissa)
        return shifted if self.shift_folded else shifted - self.shift

    def fake_quant(self, x: torch.Tensor) -> torch.Tensor:
        return self.dequantize(*self.quantize(x)).to(x.dtype)

    def spec(self) -> dict[str, Any]:
        return {"type": self.kind, "bits": self.bits, "q": self.q, "r": self.r, "shift": self.shift,
                "shift_folded": self.shift_folded, "table": self.table,
                "scale": _as_list(self.scale) if self.calibrated else None}

    @classmethod
    def from_spec(cls, spec: dict[str, Any]) -> "AdaLogQuantizer":
        q = cls(spec["bits"], spec["q"], spec["r"], spec["shift"], spec["shift_folded"], spec["table"])
        if spec.get("scale") is not None:
            q.set_params(spec["scale"])
        return q

    def extra_repr(self) -> str:
        return (f"bits={self.bits}, base=2^({self.q}/{self.r}), shift={self.shift:g}"
                f"{' (folded)' if self.shift_folded else ''}, table={self.table}, calibrated={self.calibrated}")
