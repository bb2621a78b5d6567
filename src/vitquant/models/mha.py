"""`nn.MultiheadAttention` twin: its packed in-projection as a `QuantLinear`, attention through
`F.scaled_dot_product_attention` (whose sites the dispatcher adds like anyone else's).

PyTorch computes MHA in `F.multi_head_attention_forward` (or a native fused kernel in eval mode), with
weights that are no `nn.Linear`'s; this twin states the same computation with twins. Self-attention
(query, key and value the same tensor, as torchvision's ViT and `nn.TransformerEncoderLayer` call it)
is supported; cross-attention and `need_weights=True` raise. `_qkv_same_embed_dim` is False on purpose:
it keeps `nn.TransformerEncoderLayer` off its native fast path, which would read the float weights.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from vitquant.errors import VitquantError
from vitquant.models.qmodules import QuantLinear, register_twin


@register_twin(nn.MultiheadAttention)
class QuantMultiheadAttention(nn.Module):
    _qkv_same_embed_dim = False

    def __init__(self, mha: nn.MultiheadAttention, name: str) -> None:
        super().__init__()
        if not mha._qkv_same_embed_dim or mha.bias_k is not None or mha.add_zero_attn:
            raise VitquantError(f"{name}: nn.MultiheadAttention with separate k/v dimensions, bias_k/bias_v or "
                                "add_zero_attn is not supported")
        self.name = name
        self.embed_dim, self.num_heads, self.dropout = mha.embed_dim, mha.num_heads, mha.dropout
        self.batch_first = mha.batch_first
        packed = nn.Linear(mha.embed_dim, 3 * mha.embed_dim, bias=mha.in_proj_bias is not None)
        packed.weight = mha.in_proj_weight
        if mha.in_proj_bias is not None:
            packed.bias = mha.in_proj_bias
        self.in_proj = QuantLinear(packed, f"{name}.in_proj")
        self.out_proj = QuantLinear(mha.out_proj, f"{name}.out_proj")

    @classmethod
    def from_float(cls, module: nn.MultiheadAttention, name: str) -> "QuantMultiheadAttention":
        return cls(module, name)

    @property
    def in_proj_bias(self) -> torch.Tensor | None:
        return self.in_proj.bias

    def forward(self, query, key, value, key_padding_mask=None, need_weights=True, attn_mask=None,
                average_attn_weights=True, is_causal=False):
        if not (query is key and key is value):
            raise VitquantError(f"{self.name}: only self-attention (query is key is value) is supported")
        x = query if self.batch_first else query.transpose(0, 1)  # [B, N, E]
        b, n, e = x.shape
        h = self.num_heads
        q, k, v = self.in_proj(x).reshape(b, n, 3, h, e // h).permute(2, 0, 3, 1, 4).unbind(0)
        mask = _merge_masks(attn_mask, key_padding_mask, b, h, n, q.dtype)
        out = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, is_causal=is_causal and mask is None,
                                             dropout_p=self.dropout if self.training else 0.0)
        out = self.out_proj(out.transpose(1, 2).reshape(b, n, e))
        out = out if self.batch_first else out.transpose(0, 1)
        return out, None


def _merge_masks(attn_mask, key_padding_mask, b, h, n, dtype) -> torch.Tensor | None:
    """nn.MultiheadAttention's masks (True/−inf = not attended) as one additive SDPA mask."""
    def additive(m):
        return torch.zeros_like(m, dtype=dtype).masked_fill(m, float("-inf")) if m.dtype == torch.bool else m.to(dtype)

    mask = None
    if attn_mask is not None:
        mask = additive(attn_mask)
        mask = mask.reshape(b, h, n, n) if mask.dim() == 3 else mask
    if key_padding_mask is not None:
        kpm = additive(key_padding_mask).reshape(b, 1, 1, n)
        mask = kpm if mask is None else mask + kpm
    return mask
