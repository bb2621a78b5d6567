"""What a layer-wise scale search needs from the float model: each layer's input and, for
Hessian-guided metrics, the gradient of the task loss at the layer's output.

PTQ4ViT (Yuan et al., ECCV'22, §4.2) weighs a layer's output error by (∂L/∂O)², the diagonal of the
Fisher approximation of the Hessian: min E[(O − Ô)ᵀ diag((∂L/∂O)²) (O − Ô)]. Calibration images carry
no labels, so L is the cross-entropy of the model's logits against the float model's own top-1
prediction (`pseudo_label_loss`). Its gradient softmax(z) − onehot(argmax z) is nonzero at the float
model, unlike the KL(p_FP ‖ p) of the official code, which vanishes there (PTQ4ViT issue #23).

Every tensor comes from the *float* model (parallel calibration: a layer never sees the errors of the
quantizers before it). Groups are captured one at a time: a forward (+ backward) pass over the
calibration batches keeps only the tensors of the layers asked for, so memory holds one transformer
block's activations, not the whole model's.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

from vitquant.models.qmodules import QuantAttention, QuantConv2d, QuantLinear
from vitquant.models.quantized import QuantizedModel


@dataclass
class LayerCapture:
    x: torch.Tensor  # the layer's float input, [B, ...] over all calibration batches
    grad: torch.Tensor | None  # ∂L/∂(layer output), same shape as the output


@dataclass
class AttentionCapture:
    q: torch.Tensor  # [B, H, N, d], the inputs of Q·Kᵀ (before the 1/√d scale)
    k: torch.Tensor
    v: torch.Tensor  # [B, H, N, d]
    probs: torch.Tensor  # [B, H, N, N], softmax output, first input of probs·V
    grad_scores: torch.Tensor | None  # ∂L/∂(q·kᵀ) (unscaled product)
    grad_context: torch.Tensor | None  # ∂L/∂(probs·V), [B, H, N, d]


def pseudo_label_loss(logits: torch.Tensor) -> torch.Tensor:
    """CE(z, argmax z), summed over the batch, in float64: for confident samples softmax(z) − 1 is below
    float32 resolution, and a gradient rounded to zero would make every scale candidate tie."""
    z = logits.double()
    return F.cross_entropy(z, z.argmax(dim=-1), reduction="sum")


class _Tap:
    """Stands in for a site's observer: keeps the tensor it sees and, if asked, the gradient at it."""

    def __init__(self, grad: bool) -> None:
        self.values: list[torch.Tensor] = []
        self.grads: list[torch.Tensor] = []
        self.grad = grad

    def update(self, x: torch.Tensor) -> None:
        self.values.append(x.detach())
        if self.grad and x.requires_grad:
            x.register_hook(lambda g: self.grads.append(g.detach()))


def _cat(xs: list[torch.Tensor]) -> torch.Tensor | None:
    return torch.cat(xs) if xs else None


def capture(
    qmodel: QuantizedModel, layers: list[QuantLinear | QuantConv2d], attentions: list[QuantAttention],
    batches: list[torch.Tensor], with_grad: bool,
) -> tuple[dict[str, LayerCapture], dict[str, AttentionCapture]]:
    """Float inputs (and output gradients) of `layers`, and the matmul operands (and output gradients)
    of `attentions`, over all `batches`."""
    inputs: dict[str, list] = {l.name: [] for l in layers}
    grads: dict[str, list] = {l.name: [] for l in layers}
    context_in_grads: dict[str, list] = {a.name: [] for a in attentions}
    hooks, taps = [], {}

    def layer_hook(module, args, out):
        inputs[module.name].append(args[0].detach())
        if with_grad:
            out.register_hook(lambda g: grads[module.name].append(g.detach()))

    def proj_input_hook(name):
        def hook(module, args, out):
            if with_grad:  # ∂L/∂(proj input) gives ∂L/∂(probs·V) through the reshape (and attn.norm)
                args[0].register_hook(lambda g: context_in_grads[name].append(g.detach()))
        return hook

    for layer in layers:
        hooks.append(layer.register_forward_hook(layer_hook))
    for attn in attentions:
        hooks.append(attn.proj.register_forward_hook(proj_input_hook(attn.name)))
        for site, want_grad in ((attn.q_site, False), (attn.k_site, False), (attn.v_site, False),
                                (attn.softmax_site, with_grad)):
            taps[site.name] = site.observer = _Tap(want_grad)
    params = list(qmodel.parameters())
    trainable = [p.requires_grad for p in params]
    try:
        for p in params:  # gradients w.r.t. activations only: no weight gradients are computed
            p.requires_grad_(False)
        with qmodel.bypassed():
            for x in batches:
                if with_grad:
                    with torch.enable_grad():
                        pseudo_label_loss(qmodel(x.clone().requires_grad_(True))).backward()
                else:
                    with torch.no_grad():
                        qmodel(x)
    finally:
        for h in hooks:
            h.remove()
        for attn in attentions:
            for site in (attn.q_site, attn.k_site, attn.v_site, attn.softmax_site):
                site.observer = None
        for p, t in zip(params, trainable):
            p.requires_grad_(t)

    layer_caps = {name: LayerCapture(torch.cat(inputs[name]), _cat(grads[name])) for name in inputs}
    attn_caps = {}
    for attn in attentions:
        q, k, v, probs = (torch.cat(taps[s.name].values) for s in (attn.q_site, attn.k_site, attn.v_site, attn.softmax_site))
        grad_scores = grad_context = None
        if with_grad:
            grad_probs = torch.cat(taps[attn.softmax_site.name].grads)
            # softmax backward, then the 1/√d scale applied after Q·Kᵀ (QuantAttention's order)
            grad_scores = attn.scale * probs * (grad_probs - (grad_probs * probs).sum(-1, keepdim=True))
            grad_context = _context_grad(attn, probs, v, torch.cat(context_in_grads[attn.name]))
        attn_caps[attn.name] = AttentionCapture(q, k, v, probs, grad_scores, grad_context)
    return layer_caps, attn_caps


def _context_grad(attn: QuantAttention, probs: torch.Tensor, v: torch.Tensor, grad_in: torch.Tensor) -> torch.Tensor:
    """Pull ∂L/∂(proj input) back through QuantAttention's head merge (and its optional norm)."""
    context = (probs @ v).requires_grad_(True)
    B, H, N, d = context.shape
    with torch.enable_grad():
        merged = attn.norm(context.transpose(1, 2).reshape(B, N, H * d))
        (grad,) = torch.autograd.grad(merged, context, grad_in)
    return grad.detach()
