"""Handlers: what an intercepted call (dispatch.py) computes instead, with its quantization sites.

- `AttentionSites` replaces one `F.scaled_dot_product_attention` call by the explicit Q·Kᵀ → scale →
  mask → softmax → ·V with sites on q, k, v and the probabilities (and, opt-in, the scores). While
  every site is an identity and nothing listens, it calls the fused kernel itself: a bypassed model is
  the float model exactly.
- `MatmulSites` quantizes both operands of one activation × activation matmul (eager attention:
  Swin, CaiT, XCiT, Hugging Face "eager", …); the tracer pairs a Q·Kᵀ with its probs·V into a core.
- `ForeignCall` routes `F.linear(x, layer.weight, bias)` / `F.conv2d(x, conv.weight, …)` made outside
  the layer (BEiT's qkv with q/v biases, torchvision Swin) to the layer's quantized twin.
- `OpSites` quantizes the result and/or one operand of an add/cat (FQ-ViT's residual stream and
  embeddings).

A `tap` (set by the calibration engine) receives the tensors a handler sees, so methods can capture
operands and gradients without knowing where attention is computed.
"""
from __future__ import annotations

import math
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from vitquant.models.qmodules import ActSite, SoftmaxSite
from vitquant.models.roles import ATTN_SCORES, POST_SOFTMAX, QK, V


def _sdpa_args(args: tuple, kwargs: dict) -> dict[str, Any]:
    names = ("query", "key", "value", "attn_mask", "dropout_p", "is_causal", "scale", "enable_gqa")
    bound = dict(zip(names, args))
    bound.update(kwargs)
    bound.setdefault("attn_mask", None)
    bound.setdefault("dropout_p", 0.0)
    bound.setdefault("is_causal", False)
    bound.setdefault("scale", None)
    bound.setdefault("enable_gqa", False)
    return bound


def _to4(t: torch.Tensor) -> torch.Tensor:
    """[B, H, *batch, N, d] → [B·∏batch, H, N, d]: operands with extra batch axes (Hiera's mask units)
    become the 4-D [images, heads, rows, cols] every method expects, heads staying at axis 1."""
    if t.dim() <= 4:
        return t
    return t.movedim(1, -3).reshape(-1, t.shape[1], t.shape[-2], t.shape[-1])


def _from4(t: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
    """Inverse of `_to4` for a result whose leading axes are those of `like`."""
    if like.dim() <= 4:
        return t
    lead = (like.shape[0], *like.shape[2:-2])
    return t.reshape(*lead, t.shape[1], t.shape[-2], t.shape[-1]).movedim(-3, 1)


def _identity(site: ActSite) -> bool:
    return (site.bypass or not site.enabled) and site.observer is None


class AttentionSites(nn.Module):
    """One scaled-dot-product attention, computed explicitly with its four (or five) sites."""

    def __init__(self, name: str, scores: bool = False) -> None:
        super().__init__()
        self.name = name
        self.q_site = ActSite(f"{name}.q", QK, channel_axis=1)
        self.k_site = ActSite(f"{name}.k", QK, channel_axis=1)
        self.v_site = ActSite(f"{name}.v", V, channel_axis=1)
        cls = SoftmaxSite if scores else ActSite
        self.softmax_site = cls(f"{name}.softmax", POST_SOFTMAX, channel_axis=1)
        self.scores_site = ActSite(f"{name}.scores", ATTN_SCORES, channel_axis=1) if scores else None
        self.tap = None  # engine capture: .record(kind, **tensors); never saved

    def sites(self) -> list[ActSite]:
        return [s for s in (self.q_site, self.k_site, self.v_site, self.scores_site, self.softmax_site) if s is not None]

    def forward(self, func, args: tuple, kwargs: dict) -> torch.Tensor:
        a = _sdpa_args(args, kwargs)
        if all(_identity(s) for s in self.sites()) and (self.tap is None or self.tap.output_only):
            out = func(*args, **kwargs)
            if self.tap is not None:
                self.tap.record("attention", context=out)
            return out
        q5, mask = a["query"], a["attn_mask"]
        scale = a["scale"] if a["scale"] is not None else 1.0 / math.sqrt(q5.size(-1))
        qh, kh, vh = (_to4(t) for t in (self.q_site(q5), self.k_site(a["key"]), self.v_site(a["value"])))
        q, k, v = (_to4(t) for t in (q5, a["key"], a["value"]))
        if mask is not None and q5.dim() > 4:
            mask = _to4(mask.expand(*q5.shape[:-1], a["key"].shape[-2]))
        if a["enable_gqa"] and kh.size(-3) != qh.size(-3):
            rep = qh.size(-3) // kh.size(-3)
            kh, vh = kh.repeat_interleave(rep, dim=-3), vh.repeat_interleave(rep, dim=-3)
        kt = kh.transpose(-2, -1)
        product = qh @ kt
        scores = product * scale
        if a["is_causal"]:
            n, m = scores.shape[-2:]
            scores = scores + scores.new_full((n, m), float("-inf")).triu_(1)
        if mask is not None:
            scores = scores.masked_fill(~mask, float("-inf")) if mask.dtype == torch.bool else scores + mask
        if self.scores_site is None:
            probs = scores.softmax(dim=-1)
            if a["dropout_p"] > 0:
                probs = F.dropout(probs, a["dropout_p"])
            probs = self.softmax_site(probs)
        else:  # quantized scores; the SoftmaxSite computes the softmax (an integer one for LIS)
            probs = self.softmax_site(self.scores_site(scores))
        out = probs @ vh
        if self.tap is not None:
            self.tap.record("attention", q=q, kt=k.transpose(-2, -1), v=v, probs=probs, product=product, context=out)
        return _from4(out, q5)


class MatmulSites(nn.Module):
    """Both operands of one activation × activation matmul (roles set by the tracer)."""

    def __init__(self, name_a: str, name_b: str) -> None:
        super().__init__()
        self.a_site = ActSite(name_a, channel_axis=1)
        self.b_site = ActSite(name_b, channel_axis=1)
        self.tap = None

    def sites(self) -> list[ActSite]:
        return [self.a_site, self.b_site]

    def forward(self, func, args: tuple, kwargs: dict) -> torch.Tensor:
        a, b, *rest = args
        aq, bq = self.a_site(a), self.b_site(b)
        if self.tap is None:
            return func(aq, bq, *rest, **kwargs)
        if a.dim() > 4 and a.dim() == b.dim():  # the tap sees 4-D operands (and a product in the graph)
            out4 = _to4(aq) @ _to4(bq)
            self.tap.record("matmul", a=_to4(a), b=_to4(b), product=out4)
            return _from4(out4, a)
        out = func(aq, bq, *rest, **kwargs)
        self.tap.record("matmul", a=a, b=b, product=out)
        return out


class ForeignCall(nn.Module):
    """`F.linear`/`F.conv2d` called with a twin's weight from outside the twin: run the twin instead.
    The twin is referenced, not owned (it stays where it is in the module tree)."""

    def __init__(self, twin: nn.Module) -> None:
        super().__init__()
        object.__setattr__(self, "twin", twin)

    def forward(self, func, args: tuple, kwargs: dict) -> torch.Tensor:
        if func is F.linear:
            x = args[0]
            bias = args[2] if len(args) > 2 else kwargs.get("bias")
            return self.twin(x, bias=bias)
        names = ("input", "weight", "bias", "stride", "padding", "dilation", "groups")
        bound = {**dict(zip(names, args)), **kwargs}
        call = (bound.get("bias"), bound.get("stride", 1), bound.get("padding", 0), bound.get("dilation", 1),
                bound.get("groups", 1))
        return self.twin(bound["input"], call=call)  # the caller's own settings (Conv2dSame pads first)

    def extra_repr(self) -> str:
        return f"→ {self.twin.name}"


class OpSites(nn.Module):
    """Quantize the result and/or one operand of the intercepted call: a residual add's output, the
    token concatenation, the position embedding of `x + pos_embed` (FQ-ViT)."""

    def __init__(self, output: tuple[str, str] | None, operand: tuple[str, str, int] | None) -> None:
        super().__init__()
        self.output_site = ActSite(*output) if output else None
        self.operand_site = ActSite(*operand[:2]) if operand else None
        self.index = operand[2] if operand else 0

    def sites(self) -> list[ActSite]:
        return [s for s in (self.operand_site, self.output_site) if s is not None]

    def forward(self, func, args: tuple, kwargs: dict) -> torch.Tensor:
        if self.operand_site is not None:
            args = list(args)
            args[self.index] = self.operand_site(args[self.index])
        out = func(*args, **kwargs)
        return out if self.output_site is None else self.output_site(out)
