"""Models: any float nn.Module → traced structure (sites, cores, units, mappings) + quantized twins."""
from __future__ import annotations

from vitquant.models.prepare import prepare
from vitquant.models.quantized import QuantizedModel
from vitquant.models.structure import Core, ScaleMapping, SiteInfo, Structure, Unit

__all__ = ["Core", "QuantizedModel", "ScaleMapping", "SiteInfo", "Structure", "Unit", "prepare"]
