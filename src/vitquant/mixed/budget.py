"""What a precision budget means, and what each quantization point costs under it.

- Average bits (`avg_bits`, the CLI's `--avg-bits`), stated separately for weights and activations, each
  weighted by size: Σ n_p·b_p / Σ n_p with n_p a weight's parameter count or an activation site's
  elements per image. A point kept float counts `FLOAT_BITS` = 32 (these models run in fp32), so a
  float fallback is paid for, as ModelOpt's AutoQuantize counts unquantized layers at 16 bits for fp16
  models. The image site (patch-embedding input, `patch_embed_input_bits`) is outside the budget: it
  is not a choice the allocators make, and uniform WxAy has it at 8 bits too.
- Size (`size_mb`, `--size-mb`, 10^6 bytes): the deployed size `QuantizedModel.size_bytes` reports —
  quantized weights at their bits plus an fp32 scale and zero point per output channel, every other
  parameter at fp32. It bounds the weights only; it is turned into the weight average it allows
  (conservatively, as if every weight paid the per-channel overhead).
With both, the tighter weight bound applies and activations take `avg_bits`; with `size_mb` alone the
activations stay at the config's a_bits.
"""
from __future__ import annotations

import math
from dataclasses import dataclass

from vitquant.errors import VitquantError

FLOAT_BITS = 32
W_LEVELS: tuple[int | None, ...] = (3, 4, 6, 8, None)  # None: float
A_LEVELS: tuple[int | None, ...] = (4, 6, 8, None)
MB = 1e6


def level_bits(level: int | None) -> int:
    return FLOAT_BITS if level is None else level


@dataclass(frozen=True)
class Budget:
    avg_bits: float | None = None
    size_mb: float | None = None

    def __post_init__(self) -> None:
        if self.avg_bits is None and self.size_mb is None:
            raise VitquantError("a precision budget needs avg_bits (--avg-bits) or size_mb (--size-mb)")
        for name, v, lo in (("avg_bits", self.avg_bits, 2.0), ("size_mb", self.size_mb, 0.0)):
            if v is None:
                continue
            if isinstance(v, bool) or not isinstance(v, (int, float)) or not math.isfinite(v) or v <= lo:
                raise VitquantError(f"{name} must be a number above {lo:g}, got {v!r}")
        if self.avg_bits is not None and self.avg_bits > FLOAT_BITS:
            raise VitquantError(f"avg_bits {self.avg_bits} is above {FLOAT_BITS} (float): no budget at all")

    def describe(self) -> str:
        parts = []
        if self.avg_bits is not None:
            parts.append(f"average {self.avg_bits:g} bits")
        if self.size_mb is not None:
            parts.append(f"size ≤ {self.size_mb:g} MB")
        return ", ".join(parts)


@dataclass
class Footprint:
    """Sizes of a model's quantization points: activation elements per image, weight parameters and
    output channels, and the bytes of every parameter no weight quantizer covers (biases, norms,
    embeddings, tokens — always fp32)."""

    elements: dict[str, int]  # point → n_p
    out_channels: dict[str, int]  # weight point → output channels
    fixed_bytes: int

    def avg(self, bits: dict[str, int | None], points: list[str]) -> float:
        n = sum(self.elements[p] for p in points)
        return sum(self.elements[p] * level_bits(bits[p]) for p in points) / n if n else 0.0

    def weight_bytes(self, bits: dict[str, int | None], weights: list[str]) -> int:
        """QuantizedModel.size_bytes for these weight bits."""
        total = self.fixed_bytes
        for p in weights:
            b = bits[p]
            total += 4 * self.elements[p] if b is None else (self.elements[p] * b + 7) // 8 + 8 * self.out_channels[p]
        return total


def footprint(qmodel, elements: dict[str, int]) -> Footprint:
    layers = qmodel.weight_layers()
    covered = {id(layer.weight) for layer in layers.values()}
    fixed = sum(p.numel() * 4 for p in qmodel.model.parameters() if id(p) not in covered)
    return Footprint(dict(elements), {f"{n}.weight": int(layer.weight.shape[0]) for n, layer in layers.items()}, fixed)


def weight_avg_allowed(budget: Budget, fp: Footprint, weights: list[str]) -> float | None:
    """The weight average the budget allows (the tighter of avg_bits and size_mb)."""
    allowed = [budget.avg_bits] if budget.avg_bits is not None else []
    if budget.size_mb is not None:
        n = sum(fp.elements[p] for p in weights)
        overhead = sum(8 * fp.out_channels[p] for p in weights)
        free = budget.size_mb * MB - fp.fixed_bytes - overhead - len(weights)  # ≤ 1 byte rounding each
        if n == 0 or free <= 0:
            raise VitquantError(f"size budget {budget.size_mb:g} MB is below what this model needs besides its "
                                f"weights ({(fp.fixed_bytes + overhead) / MB:.3f} MB of fp32 biases, norms, "
                                "embeddings and per-channel scales)")
        allowed.append(8 * free / n)
    return min(allowed) if allowed else None


def effective_bits(qmodel, elements: dict[str, int]) -> tuple[float, float]:
    """(weight, activation) averages of a *quantized* model as it runs — a point a method left float
    counts 32 whatever its plan said; the image site is outside, as in the budget."""
    w_num = w_den = a_num = a_den = 0
    for layer in qmodel.weight_layers().values():
        q = layer.weight_quantizer
        n = layer.weight.numel()
        w_num += n * (q.bits if layer.weight_enabled and q is not None else FLOAT_BITS)
        w_den += n
    for name, site in qmodel.act_sites().items():
        if site.role == "image":
            continue
        n = elements[name]
        a_num += n * (site.quantizer.bits if site.enabled and site.quantizer is not None else FLOAT_BITS)
        a_den += n
    return w_num / max(w_den, 1), a_num / max(a_den, 1)
