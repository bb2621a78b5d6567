"""Model adapters: find the quantizable sites of a model family and swap in quantized twins."""
from __future__ import annotations

from torch import nn

from vitquant.errors import VitquantError
from vitquant.models.quantized import NormLinearPair, QuantizedModel
from vitquant.models.timm_vit import TimmViTAdapter

ADAPTERS = [TimmViTAdapter()]


def get_adapter(model: nn.Module):
    for adapter in ADAPTERS:
        if adapter.matches(model):
            return adapter
    raise VitquantError(
        f"no vitquant adapter for a model of type {type(model).__module__}.{type(model).__name__}; "
        f"supported: {', '.join(a.name for a in ADAPTERS)} (timm VisionTransformer and its DeiT variants)"
    )


def prepare(model: nn.Module, source: dict | None = None) -> QuantizedModel:
    """Copy `model` and swap its layers for quantized twins (all uncalibrated)."""
    return get_adapter(model).prepare(model, source)


__all__ = ["ADAPTERS", "NormLinearPair", "QuantizedModel", "get_adapter", "prepare"]
