"""A quantized model whose quantizers can be switched on one at a time.

`vitquant.quantize` freezes the weights (fake-quantizes them in place), after which a weight's float
value is gone. Analysis needs every quantization point separately: a model calibrated by the method
exactly as `quantize` does (same prepare, plan, method, `apply_plan`) but left unfrozen, so that
`only(...)` can run "float everywhere except these points" and `all_but(...)` "quantized everywhere
except these points".

A *point* is an activation site name ("blocks.0.attn.qkv.input") or a weight, named
"<layer>.weight" — the names `QuantConfig.site_bits` / `keep_float` take.
"""
from __future__ import annotations

from contextlib import contextmanager
from dataclasses import dataclass
from typing import Iterable, Iterator

import torch
from torch import nn

from vitquant.calibration.data import CalibrationSet, data_config_for, load_calibration
from vitquant.calibration.engine import Context, model_device
from vitquant.config import QuantConfig
from vitquant.methods import get_method
from vitquant.methods.deployable import make_deployable
from vitquant.methods.steps import apply_plan, place_quantizers
from vitquant.models import QuantizedModel, prepare
from vitquant.models.io import logits_of
from vitquant.models.sources import infer_source
from vitquant.plan import SitePlan

WEIGHT_SUFFIX = ".weight"


def weight_point(layer: str) -> str:
    return f"{layer}{WEIGHT_SUFFIX}"


@dataclass
class Calibrated:
    """A calibrated, unfrozen QuantizedModel, its plan, and its quantization points."""

    qmodel: QuantizedModel
    plan: SitePlan
    config: QuantConfig

    def points(self) -> dict[str, int | None]:
        """Every quantization point → the bits the plan gives it (None: float), in forward order:
        each layer's weight right after its input site."""
        out: dict[str, int | None] = {}
        layer_of = {s.name: s.layer for s in self.qmodel.structure.sites.values()}
        for name in self.qmodel.act_sites():
            out[name] = self.plan.act(name)
            layer = layer_of.get(name)
            if layer is not None and layer in self.plan.weights:
                out[weight_point(layer)] = self.plan.weight(layer)
        for layer in self.qmodel.structure.layers:  # a layer whose input site is not traced
            out.setdefault(weight_point(layer), self.plan.weight(layer))
        return out

    def quantized_points(self) -> list[str]:
        """Points that actually quantize (the plan gives bits and the method fitted a quantizer)."""
        acts, layers = self.qmodel.act_sites(), self.qmodel.weight_layers()
        out = []
        for p in self.points():
            if p in acts:
                s = acts[p]
                if s.enabled and s.quantizer is not None:
                    out.append(p)
            else:
                layer = layers[p[: -len(WEIGHT_SUFFIX)]]
                if layer.weight_enabled and layer.weight_quantizer is not None and not layer.weight_frozen:
                    out.append(p)
        return out

    def frozen_weights(self) -> list[str]:
        """Weights the method itself froze during calibration (ERQ): their error cannot be switched off."""
        return [weight_point(n) for n, layer in self.qmodel.weight_layers().items() if layer.weight_frozen]

    @contextmanager
    def only(self, points: Iterable[str]) -> Iterator[QuantizedModel]:
        """Float everywhere except `points`."""
        points = set(points)
        with self.qmodel.bypassed():
            with self._set(points, bypass=False):
                yield self.qmodel

    @contextmanager
    def all_but(self, points: Iterable[str]) -> Iterator[QuantizedModel]:
        """Quantized as calibrated everywhere except `points` (float)."""
        with self._set(set(points), bypass=True):
            yield self.qmodel

    @contextmanager
    def _set(self, points: set[str], bypass: bool) -> Iterator[None]:
        units: list[nn.Module] = []
        acts, layers = self.qmodel.act_sites(), self.qmodel.weight_layers()
        for p in points:
            if p in acts:
                units.append(acts[p])
            elif p.endswith(WEIGHT_SUFFIX) and p[: -len(WEIGHT_SUFFIX)] in layers:
                units.append(layers[p[: -len(WEIGHT_SUFFIX)]])  # a layer's bypass switches only its weight
            else:
                raise KeyError(f"{p!r} is not a quantization point of this model")
        before = [u.bypass for u in units]
        for u in units:
            u.bypass = bypass
        try:
            yield
        finally:
            for u, b in zip(units, before):
                u.bypass = b


def calibrate_unfrozen(model: nn.Module, config: QuantConfig, calib: CalibrationSet | str = "bundled",
                       progress: bool = False) -> Calibrated:
    """What `vitquant.quantize` does, except freezing the weights; `model` is left untouched."""
    method = get_method(config.method)()
    qmodel = prepare(model, source=infer_source(model), extra_sites=method.requires_sites,
                     unknown=config.unknown_layers)
    method.check(qmodel.structure)
    plan = SitePlan.resolve(config, qmodel.structure)
    if not isinstance(calib, CalibrationSet):
        calib = load_calibration(calib, data_config_for(model, qmodel.structure.input_shape),
                                 n=config.calib_size, seed=config.seed)
    torch.manual_seed(config.seed)
    method.calibrate(Context(qmodel, calib, config, plan, progress))
    apply_plan(qmodel, plan)
    if config.deployable:  # the stand-ins quantize() installs; they only swap quantizers
        make_deployable(qmodel)
    place_quantizers(qmodel)
    qmodel.config = config
    return Calibrated(qmodel.eval(), plan, config)


@torch.no_grad()
def logits(model: nn.Module, images: torch.Tensor, batch_size: int = 64) -> torch.Tensor:
    """The model's logits on `images`, computed on its device a batch at a time, returned on the CPU."""
    device = model_device(model)
    return torch.cat([logits_of(model(x.to(device))).float().cpu() for x in images.split(batch_size)])


def kl_to_reference(ref_logits: torch.Tensor, out_logits: torch.Tensor) -> torch.Tensor:
    """Per image KL(p_ref ‖ p_out) in nats: the output distortion a quantization point causes."""
    ref = ref_logits.double().log_softmax(-1)
    out = out_logits.double().log_softmax(-1)
    return (ref.exp() * (ref - out)).sum(-1)
