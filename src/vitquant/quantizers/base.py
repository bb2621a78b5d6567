"""The quantizer contract: a module that fake-quantizes a tensor once its range has been fitted.

Fake quantization (quantize, then dequantize back to float) is how every ViT PTQ paper evaluates; the
integer codes themselves are what export writes. A quantizer that was never fitted raises rather than
inventing a scale (optimum-quanto issue #216 shows what silent defaults do).
"""
from __future__ import annotations

from typing import Any, ClassVar

import torch
from torch import nn

from vitquant.errors import UncalibratedError

_REGISTRY: dict[str, type["Quantizer"]] = {}


def register_quantizer(cls: type["Quantizer"]) -> type["Quantizer"]:
    _REGISTRY[cls.kind] = cls
    return cls


def quantizer_from_spec(spec: dict[str, Any]) -> "Quantizer":
    """Rebuild a fitted quantizer from `Quantizer.spec()` (the JSON of a saved model)."""
    kind = spec.get("type")
    if kind not in _REGISTRY:
        raise ValueError(f"unknown quantizer type {kind!r}; known: {sorted(_REGISTRY)}")
    return _REGISTRY[kind].from_spec(spec)


class Quantizer(nn.Module):
    kind: ClassVar[str] = ""

    def __init__(self, bits: int, name: str = "") -> None:
        super().__init__()
        if not 1 <= bits <= 16:
            raise ValueError(f"quantizer bits must be in 1..16, got {bits}")
        self.bits = bits
        self.name = name  # the site it serves, for error messages

    @property
    def calibrated(self) -> bool:
        raise NotImplementedError

    def fake_quant(self, x: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not self.calibrated:
            raise UncalibratedError(
                f"quantizer {self.name or self.kind!r} was used before calibration; "
                "run vitquant.quantize(...) with calibration data, or load a saved quantized model"
            )
        return self.fake_quant(x)

    def spec(self) -> dict[str, Any]:
        """JSON-serializable description, including fitted parameters."""
        raise NotImplementedError

    @classmethod
    def from_spec(cls, spec: dict[str, Any]) -> "Quantizer":
        raise NotImplementedError

    def extra_repr(self) -> str:
        return f"bits={self.bits}, calibrated={self.calibrated}"


def _as_list(t: torch.Tensor) -> float | list:
    return t.detach().cpu().double().tolist()
