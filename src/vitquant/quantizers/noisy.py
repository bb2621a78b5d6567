"""Noisy-bias activation quantization (NoisyQuant, Liu et al., "NoisyQuant: Noisy Bias-Enhanced
Post-Training Activation Quantization for Vision Transformers", CVPR 2023).

A fixed per-channel noisy bias N, sampled once, is added before a base quantizer Q and removed after:
    x̂ = Q(x + N) − N.
Adding N moves each channel's values to a different place relative to the quantization grid, which
flattens the dense peaks of heavy-tailed activations (the paper's Theorem 1: for N ~ U(−Δ/2, Δ/2) the
expected quantization error of values inside a bin drops). Feeding a Linear y = W·x̂ + b, the removal
folds into the bias for deployment: y = W·Q(x + N) + (b − W·N) (`denoising_bias`); an integer kernel
then sees only Q(x + N), and N itself can be added in float before the quantize op (or folded into a
preceding LayerNorm's β).

`denoise=False` is that deployed form: the quantizer returns Q(x + N) and the consumer's bias holds −W·N.
"""
from __future__ import annotations

from typing import Any

import torch

from vitquant.quantizers.base import Quantizer, _as_list, quantizer_from_spec, register_quantizer


def denoising_bias(weight: torch.Tensor, bias: torch.Tensor | None, noise: torch.Tensor) -> torch.Tensor:
    """The bias b − W·N that removes the noisy bias N of a Linear's input after the matmul."""
    shift = weight @ noise.to(weight)
    return -shift if bias is None else bias - shift


@register_quantizer
class NoisyBiasQuantizer(Quantizer):
    kind = "noisy_bias"

    def __init__(self, base: Quantizer, noise: torch.Tensor | None = None, channel_axis: int = -1,
                 denoise: bool = True, name: str = "") -> None:
        super().__init__(base.bits, name)
        self.base = base
        self.channel_axis = channel_axis
        self.denoise = denoise
        self.register_buffer("noise", None if noise is None else noise.detach().float().reshape(-1).clone())

    @property
    def calibrated(self) -> bool:
        return self.noise is not None and self.base.calibrated

    def _noise_like(self, x: torch.Tensor) -> torch.Tensor:
        shape = [1] * x.dim()
        shape[self.channel_axis] = -1
        return self.noise.to(x).reshape(shape)

    def quantize(self, x: torch.Tensor) -> torch.Tensor:
        """Integer codes of x + N (what a deployed kernel consumes)."""
        return self.base.quantize(x + self._noise_like(x))

    def dequantize(self, codes: torch.Tensor) -> torch.Tensor:
        x = self.base.dequantize(codes)
        return x - self._noise_like(x) if self.denoise else x

    def fake_quant(self, x: torch.Tensor) -> torch.Tensor:
        n = self._noise_like(x)
        x_hat = self.base.fake_quant(x + n)
        return x_hat - n if self.denoise else x_hat

    def spec(self) -> dict[str, Any]:
        return {"type": self.kind, "bits": self.bits, "base": self.base.spec(), "channel_axis": self.channel_axis,
                "denoise": self.denoise, "noise": _as_list(self.noise) if self.noise is not None else None}

    @classmethod
    def from_spec(cls, spec: dict[str, Any]) -> "NoisyBiasQuantizer":
        noise = torch.tensor(spec["noise"], dtype=torch.float64) if spec.get("noise") is not None else None
        return cls(quantizer_from_spec(spec["base"]), noise, spec.get("channel_axis", -1), spec.get("denoise", True))

    def extra_repr(self) -> str:
        n = None if self.noise is None else self.noise.numel()
        return f"bits={self.bits}, channels={n}, denoise={self.denoise}"
