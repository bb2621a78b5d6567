"""`QuantizedModel`: a float model prepared for quantization (twins, intercepted sites) and its `Structure`."""
from __future__ import annotations

from contextlib import contextmanager
from typing import Any, Iterator

import torch
from torch import nn

from vitquant.models.qmodules import ActSite, QuantConv2d, QuantLinear
from vitquant.models.structure import Core, Structure


class QuantizedModel(nn.Module):
    def __init__(self, model: nn.Module, structure: Structure, source: dict | None):
        super().__init__()
        self.model = model
        self.structure = structure
        self.source = source  # how to rebuild the float architecture when loading (None: caller supplies it)
        self.config = None  # the QuantConfig it was quantized with
        self.stats: dict[str, Any] = {}  # calibration facts for reports (time, images, peak memory)

    def forward(self, x: torch.Tensor) -> Any:
        return self.model(x)

    # -- structure ----------------------------------------------------------------------------------
    def act_sites(self) -> dict[str, ActSite]:
        """Every activation site, in forward order."""
        found = {m.name: m for m in self.model.modules() if isinstance(m, ActSite)}
        return {name: found[name] for name in self.structure.sites if name in found}

    def weight_layers(self) -> dict[str, QuantLinear | QuantConv2d]:
        """Every quantized weight layer, in forward order."""
        return {name: self.submodule(name) for name in self.structure.layers}

    def cores(self) -> list[Core]:
        return list(self.structure.cores)

    def core_sites(self, core: Core) -> dict[str, ActSite]:
        sites = self.act_sites()
        return {k: sites[getattr(core, k)] for k in ("q", "k", "v", "softmax", "scores") if getattr(core, k)}

    def submodule(self, name: str) -> nn.Module:
        return self.model.get_submodule(name) if name else self.model

    @contextmanager
    def bypassed(self) -> Iterator["QuantizedModel"]:
        """Run as the float model (quantizers off, observers still record)."""
        units = [*self.act_sites().values(), *self.weight_layers().values()]
        before = [u.bypass for u in units]
        for u in units:
            u.bypass = True
        try:
            yield self
        finally:
            for u, b in zip(units, before):
                u.bypass = b

    # -- facts --------------------------------------------------------------------------------------
    def quantizer_specs(self) -> dict[str, Any]:
        specs: dict[str, Any] = {}
        for name, site in self.act_sites().items():
            specs[name] = {"role": site.role, "enabled": site.enabled,
                           "quantizer": site.quantizer.spec() if site.quantizer is not None else None}
        for name, layer in self.weight_layers().items():
            q = layer.weight_quantizer
            specs[f"{name}.weight"] = {"quantizer": q.spec() if q is not None else None}
        return specs

    def size_bytes(self) -> int:
        """Bytes of a deployed model: quantized weights at their bit width (+ fp32 scale/zero point per
        channel), every other parameter and buffer at fp32."""
        quantized, total = set(), 0
        for layer in self.weight_layers().values():
            q = layer.weight_quantizer
            if q is None or not getattr(layer, "weight_enabled", True):
                continue
            quantized.add(id(layer.weight))
            n_scales = q.scale.numel() if getattr(q, "scale", None) is not None else 1
            total += (layer.weight.numel() * q.bits + 7) // 8 + 8 * n_scales
        for p in self.model.parameters():
            if id(p) not in quantized:
                total += p.numel() * 4
        for name, child in self.named_children():  # what a method added beside the model (QwT's terms), fp32
            if name != "model":
                total += sum(t.numel() * 4 for t in [*child.parameters(), *child.buffers()])
        return total
