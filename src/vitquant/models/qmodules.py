"""The quantized twins of the layers a ViT is made of.

`ActSite` is one activation quantization point; `QuantLinear`/`QuantConv2d` quantize their weight and
(through their input ActSite) their input; `QuantAttention` computes attention explicitly, because
fused SDPA hides the two matmuls whose inputs the papers quantize (Q·Kᵀ and softmax·V).

Every site can be put in `bypass` (float, for the float reference pass) or given an observer
(record, pass through float): that is all calibration needs.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from vitquant.errors import UncalibratedError
from vitquant.quantizers import Quantizer

# Roles name *what kind of tensor* a site sees; methods pick a quantizer per role.
ROLES = (
    "image",  # input of the patch-embedding conv
    "post_ln",  # input of a Linear right after a LayerNorm (qkv, fc1): the outlier channels live here
    "attn_out",  # input of attn.proj (softmax·V output)
    "post_gelu",  # input of mlp.fc2
    "head",  # input of the classifier head (after the final norm and pooling)
    "qk",  # q and k, the inputs of Q·Kᵀ
    "v",  # v, the second input of softmax·V
    "post_softmax",  # attention probabilities, the first input of softmax·V
    # opt-in sites (adapter `extra_sites`) of "fully quantized" models (FQ-ViT): tensors outside the matmuls
    "embed",  # patch tokens after the patch embedding, and the class/register tokens
    "pos_embed",  # the position embedding (a constant)
    "residual",  # the residual stream after each add: every LayerNorm's input in a pre-norm ViT
    "branch_out",  # output of attn.proj and mlp.fc2, before it is added to the residual stream
    "attn_scores",  # Q·Kᵀ·scale, the softmax input
    "logits",  # classifier output
)


class ActSite(nn.Module):
    """One activation quantization point.

    enabled=False keeps this tensor in float by the method's explicit choice (recorded in the saved
    config); an enabled site without a fitted quantizer raises instead of guessing.
    """

    def __init__(self, name: str, role: str, channel_axis: int = -1) -> None:
        super().__init__()
        if role not in ROLES:
            raise ValueError(f"unknown site role {role!r}; known: {ROLES}")
        self.name, self.role, self.channel_axis = name, role, channel_axis
        self.quantizer: Quantizer | None = None
        self.enabled = True
        self.bypass = False
        self.observer = None  # set by calibration.observe(); never saved

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.observer is not None:
            self.observer.update(x)
        if self.bypass or not self.enabled:
            return x
        if self.quantizer is None:
            raise UncalibratedError(f"activation site {self.name!r} ({self.role}) has no calibrated quantizer")
        return self.quantizer(x)

    def extra_repr(self) -> str:
        return f"{self.name}, role={self.role}, enabled={self.enabled}"


class SoftmaxSite(ActSite):
    """The softmax and its output quantization point in one; its input is the attention *scores*.

    Used with the opt-in "attn_scores" site. A quantizer with `from_scores = True` (FQ-ViT's
    Log-Int-Softmax) computes the quantized probabilities from the quantized scores itself; any other
    quantizer sees the float softmax. Observers always record the float probabilities.
    """

    def forward(self, scores: torch.Tensor) -> torch.Tensor:
        if not getattr(self.quantizer, "from_scores", False):
            return super().forward(scores.softmax(dim=-1))
        if self.observer is not None:
            self.observer.update(scores.softmax(dim=-1))
        if self.bypass or not self.enabled:
            return scores.softmax(dim=-1)
        return self.quantizer(scores)


class _WeightQuantMixin:
    """Weights are fake-quantized once (`freeze_weight`) rather than at every forward."""

    weight: nn.Parameter
    weight_quantizer: Quantizer | None
    weight_frozen: bool
    bypass: bool
    name: str

    def qweight(self) -> torch.Tensor:
        if self.bypass or self.weight_frozen:
            return self.weight
        if self.weight_quantizer is None:
            raise UncalibratedError(f"layer {self.name!r} has no calibrated weight quantizer")
        return self.weight_quantizer(self.weight)

    @torch.no_grad()
    def freeze_weight(self) -> None:
        """Replace the float weight by its fake-quantized value (what a deployed int model computes)."""
        if self.weight_quantizer is None:
            raise UncalibratedError(f"layer {self.name!r} has no calibrated weight quantizer")
        if not self.weight_frozen:
            self.weight.copy_(self.weight_quantizer(self.weight))
            self.weight_frozen = True


class QuantLinear(_WeightQuantMixin, nn.Module):
    def __init__(self, linear: nn.Linear, name: str, input_role: str) -> None:
        super().__init__()
        self.name = name
        self.in_features, self.out_features = linear.in_features, linear.out_features
        self.weight = linear.weight
        self.bias = linear.bias
        self.input_site = ActSite(f"{name}.input", input_role)
        self.output_site: ActSite | None = None  # opt-in extra site (branch_out, logits)
        self.weight_quantizer = None
        self.weight_frozen = False
        self.bypass = False

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = F.linear(self.input_site(x), self.qweight(), self.bias)
        return y if self.output_site is None else self.output_site(y)

    def extra_repr(self) -> str:
        return f"{self.name}: {self.in_features} -> {self.out_features}"


class QuantConv2d(_WeightQuantMixin, nn.Module):
    def __init__(self, conv: nn.Conv2d, name: str, input_role: str = "image") -> None:
        super().__init__()
        if conv.padding_mode != "zeros":
            raise ValueError(f"{name}: padding_mode={conv.padding_mode!r} is not supported")
        self.name = name
        self.weight, self.bias = conv.weight, conv.bias
        self.stride, self.padding, self.dilation, self.groups = conv.stride, conv.padding, conv.dilation, conv.groups
        self.input_site = ActSite(f"{name}.input", input_role, channel_axis=1)
        self.weight_quantizer = None
        self.weight_frozen = False
        self.bypass = False

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.conv2d(self.input_site(x), self.qweight(), self.bias, self.stride, self.padding, self.dilation, self.groups)


class QuantAttention(nn.Module):
    """timm `Attention` with both matmuls explicit and their four inputs quantized.

    The 1/√d scale is applied after Q·Kᵀ (as RepQ-ViT does) so q and k are quantized unscaled; in float
    this is the same product.
    """

    def __init__(self, attn: nn.Module, name: str) -> None:
        super().__init__()
        self.name = name
        self.num_heads, self.head_dim, self.scale = attn.num_heads, attn.head_dim, attn.scale
        self.attn_dim = getattr(attn, "attn_dim", attn.num_heads * attn.head_dim)
        self.qkv, self.proj = attn.qkv, attn.proj  # replaced by QuantLinear by the adapter
        self.q_norm, self.k_norm, self.norm = attn.q_norm, attn.k_norm, attn.norm
        self.attn_drop, self.proj_drop = attn.attn_drop, attn.proj_drop
        self.q_site = ActSite(f"{name}.q", "qk", channel_axis=1)
        self.k_site = ActSite(f"{name}.k", "qk", channel_axis=1)
        self.v_site = ActSite(f"{name}.v", "v", channel_axis=1)
        self.softmax_site = ActSite(f"{name}.softmax", "post_softmax", channel_axis=1)
        # opt-in extra site "attn_scores": the adapter sets it and makes softmax_site a SoftmaxSite
        self.scores_site: ActSite | None = None

    def forward(self, x: torch.Tensor, attn_mask: torch.Tensor | None = None, is_causal: bool = False) -> torch.Tensor:
        B, N, _ = x.shape
        qkv = self.qkv(x).reshape(B, N, 3, self.num_heads, self.head_dim).permute(2, 0, 3, 1, 4)
        q, k, v = qkv.unbind(0)
        q, k = self.q_norm(q), self.k_norm(k)
        attn = (self.q_site(q) @ self.k_site(k).transpose(-2, -1)) * self.scale
        if is_causal:
            attn = attn + attn.new_full((N, N), float("-inf")).triu_(1)
        elif attn_mask is not None:
            attn = attn.masked_fill(~attn_mask, float("-inf")) if attn_mask.dtype == torch.bool else attn + attn_mask
        if self.scores_site is None:
            attn = self.softmax_site(self.attn_drop(attn.softmax(dim=-1)))
        else:  # quantized scores; the SoftmaxSite computes the softmax (an integer one for LIS)
            attn = self.attn_drop(self.softmax_site(self.scores_site(attn)))
        x = attn @ self.v_site(v)
        x = self.norm(x.transpose(1, 2).reshape(B, N, self.attn_dim))
        return self.proj_drop(self.proj(x))
