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


def prepare(model: nn.Module, source: dict | None = None, extra_sites: tuple[str, ...] = ()) -> QuantizedModel:
    """Copy `model` and swap its layers for quantized twins (all uncalibrated).

    extra_sites: opt-in site groups beyond the matmul inputs (a method's `requires_sites`, e.g. FQ-ViT's
    residual stream); only adapters that declare them in `extra_sites` can add them."""
    adapter = get_adapter(model)
    if not extra_sites:
        return adapter.prepare(model, source)
    missing = sorted(set(extra_sites) - set(getattr(adapter, "extra_sites", ())))
    if missing:
        raise VitquantError(f"the {adapter.name} adapter cannot add the quantization sites {missing} "
                            "that this method needs; use a method without them or another model family")
    return adapter.prepare(model, source, extra_sites=tuple(extra_sites))


__all__ = ["ADAPTERS", "NormLinearPair", "QuantizedModel", "get_adapter", "prepare"]
