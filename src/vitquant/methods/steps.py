"""Steps that methods compose: fit weight quantizers, fit activation quantizers from observers."""
from __future__ import annotations

from typing import Callable

import torch

from vitquant.calibration.observer import ReservoirObserver
from vitquant.methods.deployable import deployable_plan
from vitquant.models.qmodules import ActSite
from vitquant.models.quantized import QuantizedModel
from vitquant.quantizers import Quantizer, RangeRule, UniformQuantizer


def fit_weights(qmodel: QuantizedModel, bits: int, rule: RangeRule, symmetric: bool = False) -> None:
    """Per-output-channel weight quantizers for every Linear and Conv."""
    for name, layer in qmodel.weight_layers().items():
        q = UniformQuantizer(bits, symmetric=symmetric, channel_axis=0, name=f"{name}.weight")
        layer.weight_quantizer = q.fit(layer.weight, rule)


def fit_site(site: ActSite, quantizer: Quantizer, observer: ReservoirObserver, rule: RangeRule) -> None:
    channel_wise = getattr(quantizer, "channel_axis", None) is not None
    lo, hi = (observer.lo, observer.hi) if channel_wise else observer.tensor_range()
    quantizer.name = site.name
    site.quantizer = quantizer.fit(observer.sample(), rule, lo, hi)


ActivationPlan = Callable[[ActSite, int], tuple[Quantizer, RangeRule]]


def fit_activations(
    qmodel: QuantizedModel, observers: dict[str, ReservoirObserver], plan: ActivationPlan,
    a_bits: int, image_bits: int | None,
) -> None:
    """Give each enabled site the quantizer the plan picks for its role, fitted on its statistics."""
    if getattr(qmodel, "deployable", False):  # QuantConfig(deployable=True): affine grids only
        plan = deployable_plan(plan)
    for name, site in qmodel.act_sites().items():
        bits = image_bits if site.role == "image" else a_bits
        if bits is None:
            site.enabled, site.quantizer = False, None
            continue
        quantizer, rule = plan(site, bits)
        fit_site(site, quantizer, observers[name], rule)


def freeze(qmodel: QuantizedModel) -> None:
    with torch.no_grad():
        for layer in qmodel.weight_layers().values():
            layer.freeze_weight()
