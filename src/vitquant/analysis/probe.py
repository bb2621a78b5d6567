"""Taps on every quantization point for one batch at a time: what each site and layer sees in the float
model, and the gradient of a loss there.

Gradients are taken at each site's *output* (a fresh view of it, so a tensor that feeds several sites
gets one gradient per consumer) and at each layer's output. Losses (no labels on calibration images):
- "ce": cross-entropy against the float model's own top-1 (calibration.capture.pseudo_label_loss), whose
  squared gradient is the diagonal Fisher approximation of the Hessian (PTQ4ViT, HAWQ-style proxies);
- "target": the float top-1 logit itself, whose gradient × input is LRP-0 relevance (see relevance in
  sensitivity.py).
Memory holds one batch of every point's tensors.
"""
from __future__ import annotations

from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Iterator

import torch
import torch.nn.functional as F

from vitquant.calibration.capture import pseudo_label_loss
from vitquant.calibration.engine import model_device
from vitquant.models import QuantizedModel
from vitquant.models.dispatch import quiet
from vitquant.models.io import logits_of
from vitquant.models.qmodules import QuantConv2d


@dataclass
class BatchTaps:
    site_in: dict[str, torch.Tensor] = field(default_factory=dict)  # what the site received
    site_out: dict[str, torch.Tensor] = field(default_factory=dict)  # what it passed on
    site_grad: dict[str, torch.Tensor] = field(default_factory=dict)  # ∂loss/∂(site output)
    layer_in: dict[str, torch.Tensor] = field(default_factory=dict)  # the layer's input (after its site)
    layer_out: dict[str, torch.Tensor] = field(default_factory=dict)
    layer_grad: dict[str, torch.Tensor] = field(default_factory=dict)  # ∂loss/∂(layer output)
    logits: torch.Tensor | None = None
    x: torch.Tensor | None = None  # the batch of images


class _Seen:
    """A no-op observer: an attention core whose sites are all float runs fused SDPA and skips its sites
    (handlers._identity) unless one of them is observed; this keeps them on the explicit path."""

    def update(self, x: torch.Tensor) -> None:
        pass


@contextmanager
def tapped(qmodel: QuantizedModel, grad: bool) -> Iterator[BatchTaps]:
    """Record every site and layer of `qmodel` into one BatchTaps (cleared by the caller per batch)."""
    taps = BatchTaps()
    handles = []
    sites = list(qmodel.act_sites().values())
    observed = [s.observer for s in sites]

    def site_hook(module, args, out):
        with quiet():
            taps.site_in[module.name] = args[0].detach()
            if not (grad and out.requires_grad):
                taps.site_out[module.name] = out.detach()
                return None
            out = out.view_as(out)  # this consumer's own node (see the module docstring)
            taps.site_out[module.name] = out.detach()
            out.register_hook(lambda g, n=module.name: taps.site_grad.__setitem__(n, g.detach()))
            return out

    def layer_hook(module, args, out):
        with quiet():
            taps.layer_in[module.name] = args[0].detach()
            taps.layer_out[module.name] = out.detach()
            if grad and out.requires_grad:
                out.register_hook(lambda g, n=module.name: taps.layer_grad.__setitem__(n, g.detach()))

    for site in sites:
        handles.append(site.register_forward_hook(site_hook))
        site.observer = site.observer or _Seen()
    for layer in qmodel.weight_layers().values():
        # the layer's own input site has run by the time a forward hook fires; args[0] is what entered
        # the layer (its site quantizes inside forward), which in the float model is the same tensor
        handles.append(layer.register_forward_hook(layer_hook))
    try:
        yield taps
    finally:
        for h in handles:
            h.remove()
        for site, obs in zip(sites, observed):
            site.observer = obs


def target_logit(logits: torch.Tensor) -> torch.Tensor:
    z = logits.double()
    return z.gather(1, z.argmax(1, keepdim=True)).sum()


LOSSES = {"ce": pseudo_label_loss, "target": target_logit}


def float_batches(qmodel: QuantizedModel, images: torch.Tensor, batch_size: int,
                  loss: str | None = None) -> Iterator[BatchTaps]:
    """One BatchTaps per batch of `images` (moved to the model's device a batch at a time), run as the float
    model; with `loss`, gradients too."""
    device = model_device(qmodel)
    params = list(qmodel.parameters())
    trainable = [p.requires_grad for p in params]
    try:
        for p in params:  # gradients with respect to activations only
            p.requires_grad_(False)
        for x in images.split(batch_size):
            x = x.to(device)
            # float only while this batch runs: the caller may run the quantized model between batches
            with qmodel.bypassed(), tapped(qmodel, grad=loss is not None) as taps:
                if loss is None:
                    with torch.no_grad():
                        taps.logits = logits_of(qmodel(x)).detach()
                else:
                    with torch.enable_grad():
                        out = logits_of(qmodel(x.clone().requires_grad_(True)))
                        LOSSES[loss](out).backward()
                        taps.logits = out.detach()
            taps.x = x
            yield taps
    finally:
        for p, t in zip(params, trainable):
            p.requires_grad_(t)


@torch.no_grad()
def quantized_batch(qmodel: QuantizedModel, x: torch.Tensor) -> BatchTaps:
    """The same taps with the model quantized as it is set (no gradients)."""
    with tapped(qmodel, grad=False) as taps:
        taps.logits = logits_of(qmodel(x)).detach()
    return taps


def site_quantized(site, x_in: torch.Tensor) -> torch.Tensor:
    """What `site` outputs for `x_in` when quantizing (its forward, called without hooks)."""
    before = site.bypass
    site.bypass = False
    try:
        with torch.no_grad(), quiet():
            return site.forward(x_in)
    finally:
        site.bypass = before


def weight_delta_output(layer, x: torch.Tensor) -> torch.Tensor:
    """x · (Q(W) − W)ᵀ: how much the layer's output moves when only its weight is quantized."""
    with torch.no_grad(), quiet():
        dw = layer.weight_quantizer(layer.weight) - layer.weight
        if isinstance(layer, QuantConv2d):
            return F.conv2d(x, dw, None, layer.stride, layer.padding, layer.dilation, layer.groups)
        return F.linear(x, dw)
