"""Adapter for timm Vision Transformers: ViT, DeiT (incl. distilled), DeiT-III, and any model built
from timm's `VisionTransformer` / `Block` / `Attention` / `Mlp`.

It finds every quantizable site (each Linear, the patch-embedding conv, both attention matmuls'
inputs, post-softmax and post-GELU) and declares which LayerNorm feeds which Linear. It refuses a model
with layers it does not know, naming them, instead of quantizing part of it silently.

`extra_sites` (opt-in, for "fully quantized" methods such as FQ-ViT; see EXTRA_SITES) adds activation
sites outside the matmul inputs: the embeddings, the residual stream, the branch outputs, the attention
scores (with the softmax computed by a SoftmaxSite) and the logits. Without it nothing changes.
"""
from __future__ import annotations

import copy

import torch
from torch import nn
from torch.nn.utils import parametrize

from vitquant.errors import VitquantError
from vitquant.models.qmodules import ActSite, QuantAttention, QuantConv2d, QuantLinear, SoftmaxSite
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


# The extra site groups `prepare(..., extra_sites=...)` can add (each is also the role of its sites,
# except "embed", which adds "embed" and "pos_embed" sites).
EXTRA_SITES = ("embed", "residual", "branch_out", "attn_scores", "logits")


class QuantBlock(nn.Module):
    """timm `Block` with its residual stream quantized after each add (FQ-ViT's Block.qact2/qact4) and,
    in the first block, at its input (the embeddings after the position add, FQ-ViT's qact1).

    It adopts the Block's children under the same names, so parameter names do not change. Its forward
    mirrors timm 1.0's `Block.forward`; the adapter only accepts exact `Block`s.
    """

    def __init__(self, blk: nn.Module, name: str, quantize_input: bool) -> None:
        super().__init__()
        for child_name, child in blk.named_children():
            setattr(self, child_name, child)
        self.name = name
        self.input_residual = ActSite(f"{name}.input", "residual") if quantize_input else None
        self.attn_residual = ActSite(f"{name}.attn_residual", "residual")
        self.mlp_residual = ActSite(f"{name}.mlp_residual", "residual")

    def forward(self, x: torch.Tensor, attn_mask: torch.Tensor | None = None, is_causal: bool = False) -> torch.Tensor:
        if self.input_residual is not None:
            x = self.input_residual(x)
        x = x + self.drop_path1(self.ls1(self.attn(self.norm1(x), attn_mask=attn_mask, is_causal=is_causal)))
        x = self.attn_residual(x)
        return self.mlp_residual(x + self.drop_path2(self.ls2(self.mlp(self.norm2(x)))))


class TimmViTAdapter:
    name = "timm-vit"
    extra_sites = EXTRA_SITES

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
    def prepare(self, model: nn.Module, source: dict | None = None, extra_sites: tuple[str, ...] = ()) -> QuantizedModel:
        unknown = sorted(set(extra_sites) - set(EXTRA_SITES))
        if unknown:
            raise VitquantError(f"unknown extra quantization sites {unknown}; the timm-ViT adapter offers {EXTRA_SITES}")
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
        if extra_sites:
            self._add_extra_sites(model, set(extra_sites), heads)
        return QuantizedModel(model, self.name, pairs, source)

    @staticmethod
    def _add_extra_sites(model: nn.Module, extra: set[str], heads: list[str]) -> None:
        if "embed" in extra:
            if not isinstance(model.patch_embed.norm, nn.Identity):
                raise VitquantError("extra site 'embed' needs patch_embed.norm to be Identity (it takes its place); "
                                    f"this model has {type(model.patch_embed.norm).__name__}")
            model.patch_embed.norm = ActSite("patch_embed.output", "embed")
            # the tokens and the position embedding are parameters: a parametrization quantizes them
            # on every access, keeps the float originals and saves both with the model
            for param, role in (("cls_token", "embed"), ("reg_token", "embed"), ("pos_embed", "pos_embed")):
                if getattr(model, param, None) is not None:
                    parametrize.register_parametrization(model, param, ActSite(param, role), unsafe=True)
        for i, blk in enumerate(list(model.blocks)):
            p = f"blocks.{i}"
            if "branch_out" in extra:
                blk.attn.proj.output_site = ActSite(f"{p}.attn.proj.output", "branch_out")
                blk.mlp.fc2.output_site = ActSite(f"{p}.mlp.fc2.output", "branch_out")
            if "attn_scores" in extra:
                blk.attn.scores_site = ActSite(f"{p}.attn.scores", "attn_scores", channel_axis=1)
                blk.attn.softmax_site = SoftmaxSite(f"{p}.attn.softmax", "post_softmax", channel_axis=1)
            if "residual" in extra:
                model.blocks[i] = QuantBlock(blk, p, quantize_input=i == 0)
        if "logits" in extra:
            for h in heads:
                getattr(model, h).output_site = ActSite(f"{h}.output", "logits")
