"""Adapter for timm Vision Transformers: ViT, DeiT (incl. distilled), DeiT-III, and any model built
from timm's `VisionTransformer` / `Block` / `Attention` / `Mlp`.

It finds every quantizable site (each Linear, the patch-embedding conv, both attention matmuls'
inputs, post-softmax and post-GELU) and declares which LayerNorm feeds which Linear. It refuses a model
with layers it does not know, naming them, instead of quantizing part of it silently.
"""
from __future__ import annotations

import copy

from torch import nn

from vitquant.errors import VitquantError
from vitquant.models.qmodules import QuantAttention, QuantConv2d, QuantLinear
from vitquant.models.quantized import NormLinearPair, QuantizedModel


def _timm_types() -> dict[str, tuple[type, ...]]:
    from timm.layers import DropPath, LayerScale, Mlp, PatchEmbed
    from timm.layers.attention import Attention
    from timm.models.vision_transformer import Block, VisionTransformer

    return {
        "model": (VisionTransformer,),
        "block": (Block,),
        "attention": (Attention,),
        "mlp": (Mlp,),
        # modules that need no quantization of their own (float ops, or containers)
        "passive": (PatchEmbed, LayerScale, DropPath, nn.LayerNorm, nn.GELU, nn.Dropout, nn.Identity,
                    nn.ModuleList, nn.Sequential),
    }


def _is_norm(m: nn.Module) -> bool:
    return isinstance(m, nn.LayerNorm)


class TimmViTAdapter:
    name = "timm-vit"

    def matches(self, model: nn.Module) -> bool:
        return isinstance(model, _timm_types()["model"])

    # -- validation ---------------------------------------------------------------------------------
    def unknown_layers(self, model: nn.Module) -> list[str]:
        """'name (Type)' of every module this adapter cannot quantize faithfully."""
        t = _timm_types()
        expected_linear = {"attn.qkv", "attn.proj", "mlp.fc1", "mlp.fc2"}
        bad = []
        for name, m in model.named_modules():
            if name == "" or isinstance(m, t["passive"] + t["block"] + t["mlp"]):
                if isinstance(m, t["block"]) and type(m) not in t["block"]:
                    bad.append(f"{name} ({type(m).__name__}: a Block subclass with its own forward)")
                continue
            if isinstance(m, t["attention"]) and type(m) in t["attention"]:
                if getattr(m, "gate", None) is not None:
                    bad.append(f"{name}.gate (gated attention)")
                continue
            if isinstance(m, nn.Conv2d) and name == "patch_embed.proj":
                continue
            if type(m) is nn.Linear and (name in ("head", "head_dist") or name.split(".", 2)[-1] in expected_linear):
                continue
            bad.append(f"{name} ({type(m).__name__})")
        # children of unknown modules are reported through their parent only
        return [b for b in bad if not any(b.startswith(o.split(" ")[0] + ".") for o in bad if o is not b)]

    def check(self, model: nn.Module) -> None:
        bad = self.unknown_layers(model)
        if bad:
            shown = ", ".join(bad[:8]) + (f" and {len(bad) - 8} more" if len(bad) > 8 else "")
            raise VitquantError(
                f"the timm-ViT adapter does not know these layers: {shown}. "
                "Supported: timm VisionTransformer built from Block/Attention/Mlp (ViT, DeiT, DeiT-III)."
            )

    # -- preparation --------------------------------------------------------------------------------
    def prepare(self, model: nn.Module, source: dict | None = None) -> QuantizedModel:
        self.check(model)
        model = copy.deepcopy(model).eval()
        pairs: list[NormLinearPair] = []
        model.patch_embed.proj = QuantConv2d(model.patch_embed.proj, "patch_embed.proj", "image")
        for i, blk in enumerate(model.blocks):
            p = f"blocks.{i}"
            attn = QuantAttention(blk.attn, f"{p}.attn")
            attn.qkv = QuantLinear(blk.attn.qkv, f"{p}.attn.qkv", "post_ln")
            scale_norm = _is_norm(attn.norm)
            attn.proj = QuantLinear(blk.attn.proj, f"{p}.attn.proj", "post_ln" if scale_norm else "attn_out")
            blk.attn = attn
            mlp_norm = _is_norm(blk.mlp.norm)
            blk.mlp.fc1 = QuantLinear(blk.mlp.fc1, f"{p}.mlp.fc1", "post_ln")
            blk.mlp.fc2 = QuantLinear(blk.mlp.fc2, f"{p}.mlp.fc2", "post_ln" if mlp_norm else "post_gelu")
            if _is_norm(blk.norm1):
                pairs.append(NormLinearPair(f"{p}.norm1", (f"{p}.attn.qkv",)))
            if _is_norm(blk.norm2):
                pairs.append(NormLinearPair(f"{p}.norm2", (f"{p}.mlp.fc1",)))
            if scale_norm:
                pairs.append(NormLinearPair(f"{p}.attn.norm", (f"{p}.attn.proj",)))
            if mlp_norm:
                pairs.append(NormLinearPair(f"{p}.mlp.norm", (f"{p}.mlp.fc2",)))
        heads = [h for h in ("head", "head_dist") if isinstance(getattr(model, h, None), nn.Linear)]
        for h in heads:
            setattr(model, h, QuantLinear(getattr(model, h), h, "head"))
        # The head sees pool(norm(x)) or fc_norm(pool(x)); token/avg pooling is per-channel linear, so
        # the norm → head pair is exact either way.
        head_norm = "fc_norm" if _is_norm(model.fc_norm) else ("norm" if _is_norm(model.norm) else None)
        if heads and head_norm and getattr(model, "attn_pool", None) is None:
            pairs.append(NormLinearPair(head_norm, tuple(heads)))
        return QuantizedModel(model, self.name, pairs, source)
