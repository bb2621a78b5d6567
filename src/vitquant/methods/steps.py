"""Steps that methods compose: fit weight quantizers, fit activation quantizers from observers."""
from __future__ import annotations

from typing import Callable

import torch

from vitquant.calibration.observer import ReservoirObserver
from vitquant.methods.deployable import deployable_plan
from vitquant.models.qmodules import ActSite
from vitquant.models.quantized import QuantizedModel
from vitquant.plan import SitePlan
from vitquant.quantizers import Quantizer, RangeRule, UniformQuantizer


def fit_weights(qmodel: QuantizedModel, plan: SitePlan, rule: RangeRule, symmetric: bool = False) -> None:
    """Per-output-channel weight quantizers for every Linear and Conv the plan quantizes."""
    for name, layer in qmodel.weight_layers().items():
        bits = plan.weight(name)
        if bits is None:
            layer.weight_enabled, layer.weight_quantizer = False, None
            continue
        q = UniformQuantizer(bits, symmetric=symmetric, channel_axis=0, name=f"{name}.weight")
        layer.weight_quantizer = q.fit(layer.weight, rule)


def fit_site(site: ActSite, quantizer: Quantizer, observer: ReservoirObserver, rule: RangeRule) -> None:
    channel_wise = getattr(quantizer, "channel_axis", None) is not None
    lo, hi = (observer.lo, observer.hi) if channel_wise else observer.tensor_range()
    quantizer.name = site.name
    site.quantizer = quantizer.fit(observer.sample(), rule, lo, hi)


ActivationPlan = Callable[[ActSite, int], tuple[Quantizer, RangeRule]]


def fit_activations(
    qmodel: QuantizedModel, observers: dict[str, ReservoirObserver], choose: ActivationPlan, plan: SitePlan,
) -> None:
    """Give each site the plan quantizes the quantizer `choose` picks for it, fitted on its statistics."""
    if plan.deployable:  # QuantConfig(deployable=True): affine grids only
        choose = deployable_plan(choose)
    for name, site in qmodel.act_sites().items():
        bits = plan.act(name)
        if bits is None:
            site.enabled, site.quantizer = False, None
            continue
        quantizer, rule = choose(site, bits)
        fit_site(site, quantizer, observers[name], rule)


def apply_plan(qmodel: QuantizedModel, plan: SitePlan) -> None:
    """After any method: what the plan keeps float is float (a method that sets every site itself may
    have given one a quantizer)."""
    for name, site in qmodel.act_sites().items():
        if plan.act(name) is None:
            site.enabled, site.quantizer = False, None
    for name, layer in qmodel.weight_layers().items():
        if plan.weight(name) is None:
            layer.weight_enabled, layer.weight_quantizer = False, None


def freeze(qmodel: QuantizedModel) -> None:
    with torch.no_grad():
        for layer in qmodel.weight_layers().values():
            layer.freeze_weight()
