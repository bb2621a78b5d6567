"""What a layer-wise scale search needs from the float model: each layer's input and, for
Hessian-guided metrics, the gradient of the task loss at the layer's output; each attention core's
operands and the gradients at its two products.

PTQ4ViT (Yuan et al., ECCV'22, §4.2) weighs a layer's output error by (∂L/∂O)², the diagonal of the
Fisher approximation of the Hessian: min E[(O − Ô)ᵀ diag((∂L/∂O)²) (O − Ô)]. Calibration images carry
no labels, so L is the cross-entropy of the model's logits against the float model's own top-1
prediction (`pseudo_label_loss`). Its gradient softmax(z) − onehot(argmax z) is nonzero at the float
model, unlike the KL(p_FP ‖ p) of the official code, which vanishes there (PTQ4ViT issue #23).

Every tensor comes from the *float* model (parallel calibration). Layers are hooked as modules; cores
through the taps of their dispatch handlers (models/handlers.py), so the same code serves fused SDPA,
eager matmuls and any family. Groups are captured one at a time: memory holds one unit's tensors.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

from vitquant.models.dispatch import quiet
from vitquant.models.handlers import AttentionSites, MatmulSites
from vitquant.models.io import logits_of
from vitquant.models.qmodules import QuantConv2d, QuantLinear
from vitquant.models.quantized import QuantizedModel
from vitquant.models.structure import Core


@dataclass
class LayerCapture:
    x: torch.Tensor  # the layer's float input, [B, ...] over all calibration batches
    grad: torch.Tensor | None  # ∂L/∂(layer output), same shape as the output


@dataclass
class CoreCapture:
    q: torch.Tensor  # first operand of Q·Kᵀ, [B, H, N, d] (heads axis 1 when 4-D)
    kt: torch.Tensor  # second operand as multiplied: q @ kt is the scores product (before any scale)
    v: torch.Tensor  # second operand of probs·V
    probs: torch.Tensor  # first operand of probs·V
    grad_scores: torch.Tensor | None  # ∂L/∂(q @ kt)
    grad_context: torch.Tensor | None  # ∂L/∂(probs @ v)


def pseudo_label_loss(logits: torch.Tensor) -> torch.Tensor:
    """CE(z, argmax z), summed over the batch, in float64: for confident samples softmax(z) − 1 is below
    float32 resolution, and a gradient rounded to zero would make every scale candidate tie."""
    z = logits.double()
    return F.cross_entropy(z, z.argmax(dim=-1), reduction="sum")


class CoreTap:
    """Set as `tap` on a core's handlers: keeps the operands, and the gradients at both products."""

    output_only = False

    def __init__(self, grad: bool) -> None:
        self.grad = grad
        self.store: dict[str, list[torch.Tensor]] = {k: [] for k in ("q", "kt", "v", "probs", "gs", "gc")}

    def _keep(self, key: str, t: torch.Tensor) -> None:
        self.store[key].append(t.detach())

    def _grad(self, key: str, t: torch.Tensor) -> None:
        if self.grad and t.requires_grad:
            t.register_hook(lambda g: self.store[key].append(g.detach()))

    def record(self, kind: str, **t: torch.Tensor) -> None:
        with quiet():
            if kind == "attention":
                for key in ("q", "kt", "v", "probs"):
                    self._keep(key, t[key])
                self._grad("gs", t["product"])
                self._grad("gc", t["context"])
            elif self.role == "qk":
                self._keep("q", t["a"])
                self._keep("kt", t["b"])
                self._grad("gs", t["product"])
            else:
                self._keep("probs", t["a"])
                self._keep("v", t["b"])
                self._grad("gc", t["product"])

    role = "attention"

    def result(self, shared: "CoreTap | None" = None) -> CoreCapture:
        s = self.store if shared is None else {k: self.store[k] or shared.store[k] for k in self.store}
        cat = lambda k: torch.cat(s[k]) if s[k] else None  # noqa: E731
        # backward runs the batches' gradients in the order of the forwards, one batch at a time
        return CoreCapture(cat("q"), cat("kt"), cat("v"), cat("probs"), cat("gs"), cat("gc"))


def _attach(qmodel: QuantizedModel, core: Core, grad: bool) -> list[tuple[object, CoreTap]]:
    handlers = [qmodel.submodule(h) for h in core.handlers]
    if len(handlers) == 1 and isinstance(handlers[0], AttentionSites):
        tap = CoreTap(grad)
        handlers[0].tap = tap
        return [(handlers[0], tap)]
    taps = []
    for h in handlers:
        assert isinstance(h, MatmulSites)
        tap = CoreTap(grad)
        tap.role = "qk" if h.a_site.name == core.q else "pv"
        h.tap = tap
        taps.append((h, tap))
    return taps


def capture(
    qmodel: QuantizedModel, layers: list[QuantLinear | QuantConv2d], cores: list[Core],
    batches: list[torch.Tensor], with_grad: bool,
) -> tuple[dict[str, LayerCapture], dict[str, CoreCapture]]:
    """Float inputs (and output gradients) of `layers`, and the operands (and product gradients) of
    `cores`, over all `batches`."""
    inputs: dict[str, list] = {l.name: [] for l in layers}
    grads: dict[str, list] = {l.name: [] for l in layers}
    hooks, taps = [], {}

    def layer_hook(module, args, out):
        with quiet():
            inputs[module.name].append(args[0].detach())
            if with_grad and out.requires_grad:
                out.register_hook(lambda g: grads[module.name].append(g.detach()))

    for layer in layers:
        hooks.append(layer.register_forward_hook(layer_hook))
    for core in cores:
        taps[core.name] = _attach(qmodel, core, with_grad)
    params = list(qmodel.parameters())
    trainable = [p.requires_grad for p in params]
    try:
        for p in params:  # gradients w.r.t. activations only: no weight gradients are computed
            p.requires_grad_(False)
        with qmodel.bypassed():
            for x in batches:
                if with_grad:
                    with torch.enable_grad():
                        pseudo_label_loss(logits_of(qmodel(x.clone().requires_grad_(True)))).backward()
                else:
                    with torch.no_grad():
                        qmodel(x)
    finally:
        for h in hooks:
            h.remove()
        for pairs in taps.values():
            for handler, _ in pairs:
                handler.tap = None
        for p, t in zip(params, trainable):
            p.requires_grad_(t)
    layer_caps = {name: LayerCapture(torch.cat(inputs[name]), torch.cat(grads[name]) if grads[name] else None)
                  for name in inputs}
    core_caps = {}
    for name, pairs in taps.items():
        if len(pairs) == 1:
            core_caps[name] = pairs[0][1].result()
        else:
            merged = CoreTap(with_grad)
            for _, tap in pairs:
                for k, v in tap.store.items():
                    merged.store[k] += v
            core_caps[name] = merged.result()
    return layer_caps, core_caps
