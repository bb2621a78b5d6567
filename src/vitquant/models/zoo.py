"""Randomly initialized instances of every architecture family vitquant supports, at two sizes.

- "tiny": a few blocks, 32–64 px, tens of thousands of parameters: the contract suite
  (tests/models/test_contract.py) runs every method on each in seconds.
- "bench": 224² (the family's own input size), the named variant with its depth cut to 2 blocks (1 per
  stage for hierarchical families): `benchmarks/architectures.py` builds the support table from these.
Adding an architecture = adding an entry here and making the contract suite pass. Nothing here is
used to quantize: the core finds structure by tracing (prepare.py), for these and any other model.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable

import torch
from torch import nn

TINY, BENCH = "tiny", "bench"


@dataclass(frozen=True)
class Family:
    name: str  # row label
    origin: str  # timm | hf | torchvision | user
    build: Callable[[str], nn.Module]  # size → model (eval mode, pretrained_cfg with input_size)
    note: str = ""


def _with_size(model: nn.Module, size: tuple[int, int, int]) -> nn.Module:
    model.pretrained_cfg = {**(getattr(model, "pretrained_cfg", None) or {}), "input_size": size}
    _no_zero_layers(model)
    return model.eval()


@torch.no_grad()
def _no_zero_layers(model: nn.Module) -> None:
    """Some families initialize their head to zero (Hiera, MViT): all logits would be 0 and every
    comparison with the float model meaningless. Such weights get a small random init instead."""
    for m in model.modules():
        w = getattr(m, "weight", None)
        if isinstance(m, (nn.Linear, nn.Conv2d)) and isinstance(w, torch.Tensor) and not w.any():
            w.normal_(0, 0.02)


def _timm(name: str, tiny: dict[str, Any], bench: dict[str, Any], tiny_px: int = 32, bench_px: int = 224):
    def build(size: str) -> nn.Module:
        import timm

        kw = tiny if size == TINY else bench
        model = timm.create_model(name, pretrained=False, num_classes=10, **kw)
        px = tiny_px if size == TINY else bench_px
        c = 3
        return _with_size(model, (c, px, px) if isinstance(px, int) else (c, *px))
    return build


VIT_TINY = dict(img_size=32, patch_size=8, embed_dim=32, depth=2, num_heads=2)
VIT_BENCH = dict(depth=2)
PYRAMID_TINY = dict(embed_dims=(16, 32, 32, 32), depths=(1, 1, 1, 1), num_heads=(1, 2, 2, 2))
SWIN_TINY = dict(img_size=64, window_size=4, embed_dim=16, depths=(2, 2), num_heads=(1, 2))


def _vitamin(size: str) -> nn.Module:
    import timm
    from timm.models.vitamin import VitCfg, VitConvCfg

    if size == TINY:
        cfg = VitCfg(embed_dim=(16, 32, 64), depths=(1, 1, 1), stem_width=16,
                     conv_cfg=VitConvCfg(norm_layer="layernorm2d", norm_eps=1e-6), head_type="1d")
        model = timm.create_model("vitamin_small_224", pretrained=False, num_classes=10, img_size=64, embed_dim=64,
                                  depth=2, num_heads=2, embed_cfg=cfg)
        return _with_size(model, (3, 64, 64))
    cfg = VitCfg(embed_dim=(64, 128, 384), depths=(1, 1, 1), stem_width=64,
                 conv_cfg=VitConvCfg(norm_layer="layernorm2d", norm_eps=1e-6), head_type="1d")
    model = timm.create_model("vitamin_small_224", pretrained=False, num_classes=10, depth=2, embed_cfg=cfg)
    return _with_size(model, (3, 224, 224))


def _mvitv2(size: str) -> nn.Module:
    from timm.models.mvitv2 import MultiScaleVit, MultiScaleVitCfg

    if size == TINY:
        return _with_size(MultiScaleVit(MultiScaleVitCfg(depths=(1, 1, 1, 1), embed_dim=16, num_heads=1),
                                        img_size=(64, 64), num_classes=10), (3, 64, 64))
    return _with_size(MultiScaleVit(MultiScaleVitCfg(depths=(1, 1, 1, 1), embed_dim=96, num_heads=1),
                                    img_size=(224, 224), num_classes=10), (3, 224, 224))


def _hf(kind: str) -> Callable[[str], nn.Module]:
    def build(size: str) -> nn.Module:
        import transformers as tf

        small = size == TINY
        common = dict(num_labels=10, image_size=32 if small else 224, num_hidden_layers=2,
                      attn_implementation="sdpa")
        vit = dict(hidden_size=32 if small else 192, num_attention_heads=2 if small else 3,
                   intermediate_size=64 if small else 768, patch_size=8 if small else 16)
        if kind == "vit":
            model = tf.ViTForImageClassification(tf.ViTConfig(**common, **vit))
        elif kind == "deit":
            model = tf.DeiTForImageClassificationWithTeacher(tf.DeiTConfig(**common, **vit))
        elif kind == "dinov2":
            model = tf.Dinov2ForImageClassification(tf.Dinov2Config(**common, **{**vit, "patch_size": 8 if small else 14}))
        elif kind == "beit":
            model = tf.BeitForImageClassification(tf.BeitConfig(**common, **vit, use_relative_position_bias=True))
        else:  # swin
            common.update(image_size=64 if small else 224)
            model = tf.SwinForImageClassification(tf.SwinConfig(
                **{k: v for k, v in common.items() if k != "num_hidden_layers"}, patch_size=4,
                embed_dim=16 if small else 48, depths=[2, 2] if small else [1, 1, 1, 1],
                num_heads=[1, 2] if small else [3, 6, 12, 24], window_size=4 if small else 7))
        px = model.config.image_size
        model.pretrained_cfg = {"input_size": (3, px, px), "mean": (0.5, 0.5, 0.5), "std": (0.5, 0.5, 0.5)}
        _no_zero_layers(model)
        return model.eval()
    return build


def _torchvision(kind: str) -> Callable[[str], nn.Module]:
    def build(size: str) -> nn.Module:
        from torchvision.models import swin_transformer, vision_transformer

        small = size == TINY
        if kind == "vit":
            model = vision_transformer.VisionTransformer(
                image_size=32 if small else 224, patch_size=8 if small else 16, num_layers=2,
                num_heads=2 if small else 3, hidden_dim=32 if small else 192, mlp_dim=64 if small else 768,
                num_classes=10)
            px = 32 if small else 224
        else:
            model = swin_transformer.SwinTransformer(
                patch_size=[4, 4], embed_dim=16 if small else 48, depths=[2, 2] if small else [1, 1, 1, 1],
                num_heads=[1, 2] if small else [3, 6, 12, 24], window_size=[4, 4] if small else [7, 7], num_classes=10)
            px = 64 if small else 224
        return _with_size(model, (3, px, px))
    return build


class MHAViT(nn.Module):
    """A ViT as a user writes it in 40 lines with `nn.MultiheadAttention` (no timm, no HF)."""

    def __init__(self, img_size: int = 32, patch: int = 8, dim: int = 32, depth: int = 2, heads: int = 2,
                 num_classes: int = 10) -> None:
        super().__init__()
        self.patch = nn.Conv2d(3, dim, patch, patch)
        self.cls = nn.Parameter(torch.randn(1, 1, dim) * 0.02)
        self.pos = nn.Parameter(torch.randn(1, (img_size // patch) ** 2 + 1, dim) * 0.02)
        self.blocks = nn.ModuleList(_MHABlock(dim, heads) for _ in range(depth))
        self.norm = nn.LayerNorm(dim)
        self.head = nn.Linear(dim, num_classes)
        self.pretrained_cfg = {"input_size": (3, img_size, img_size)}

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.patch(x).flatten(2).transpose(1, 2)
        x = torch.cat([self.cls.expand(x.shape[0], -1, -1), x], dim=1) + self.pos
        for blk in self.blocks:
            x = blk(x)
        return self.head(self.norm(x)[:, 0])


class _MHABlock(nn.Module):
    def __init__(self, dim: int, heads: int) -> None:
        super().__init__()
        self.ln1, self.ln2 = nn.LayerNorm(dim), nn.LayerNorm(dim)
        self.attn = nn.MultiheadAttention(dim, heads, batch_first=True)
        self.mlp = nn.Sequential(nn.Linear(dim, 4 * dim), nn.GELU(), nn.Linear(4 * dim, dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.ln1(x)
        x = x + self.attn(h, h, h, need_weights=False)[0]
        return x + self.mlp(self.ln2(x))


def _user(size: str) -> nn.Module:
    model = MHAViT() if size == TINY else MHAViT(img_size=224, patch=16, dim=192, depth=2, heads=3)
    return _with_size(model, model.pretrained_cfg["input_size"])


def _families() -> list[Family]:
    f = [
        Family("timm ViT", "timm", _timm("vit_tiny_patch16_224", VIT_TINY, VIT_BENCH)),
        Family("timm DeiT", "timm", _timm("deit_tiny_patch16_224", VIT_TINY, VIT_BENCH)),
        Family("timm DeiT distilled", "timm", _timm("deit_tiny_distilled_patch16_224", VIT_TINY, VIT_BENCH)),
        Family("timm DeiT-III", "timm", _timm("deit3_small_patch16_224", VIT_TINY, VIT_BENCH)),
        Family("timm DINOv2", "timm", _timm("vit_small_patch14_dinov2", {**VIT_TINY, "img_size": 28, "patch_size": 7},
                                            dict(depth=2, img_size=224), tiny_px=28)),
        Family("timm DINOv2 + registers", "timm", _timm("vit_small_patch14_reg4_dinov2",
                                                         {**VIT_TINY, "img_size": 28, "patch_size": 7},
                                                         dict(depth=2, img_size=224), tiny_px=28)),
        Family("timm CLIP ViT", "timm", _timm("vit_base_patch32_clip_224", VIT_TINY, VIT_BENCH)),
        Family("timm SigLIP (MAP head)", "timm", _timm("vit_base_patch16_siglip_224", VIT_TINY, VIT_BENCH)),
        Family("timm ViT rel-pos", "timm", _timm("vit_relpos_small_patch16_224", VIT_TINY, VIT_BENCH)),
        Family("timm BEiT", "timm", _timm("beit_base_patch16_224", VIT_TINY, VIT_BENCH)),
        Family("timm BEiT v2", "timm", _timm("beitv2_base_patch16_224", VIT_TINY, VIT_BENCH)),
        Family("timm EVA-02", "timm", _timm("eva02_tiny_patch14_224", {**VIT_TINY, "img_size": 28, "patch_size": 7},
                                            VIT_BENCH, tiny_px=28)),
        Family("timm CaiT", "timm", _timm("cait_xxs24_224", {**VIT_TINY, "depth_token_only": 1},
                                          dict(depth=2, depth_token_only=1))),
        Family("timm XCiT", "timm", _timm("xcit_nano_12_p16_224", {**VIT_TINY, "patch_size": 16, "cls_attn_layers": 1},
                                          dict(depth=2, cls_attn_layers=1))),
        Family("timm CrossViT", "timm", _timm(
            "crossvit_tiny_240", dict(img_size=[32, 48], patch_size=[8, 16], embed_dim=[32, 64], depth=[[1, 1, 0]],
                                      num_heads=[2, 2], mlp_ratio=[2, 2, 1]),
            dict(depth=[[1, 1, 0]]), tiny_px=(32, 48), bench_px=(240, 240))),
        Family("timm ConViT", "timm", _timm("convit_tiny", {**VIT_TINY, "local_up_to_layer": 1},
                                            dict(depth=2, local_up_to_layer=1))),
        Family("timm TNT", "timm", _timm("tnt_s_patch16_224", dict(img_size=32, patch_size=8, embed_dim=32, inner_dim=8,
                                                                   depth=2, num_heads_outer=2, num_heads_inner=2),
                                         VIT_BENCH)),
        Family("timm Twins-PCPVT", "timm", _timm("twins_pcpvt_small", {**PYRAMID_TINY, "img_size": 64},
                                                 dict(depths=(1, 1, 1, 1)), tiny_px=64)),
        Family("timm Twins-SVT", "timm", _timm("twins_svt_small", {**PYRAMID_TINY, "img_size": 64, "wss": [2, 2, 2, 2]},
                                               dict(depths=(1, 1, 1, 1)), tiny_px=64)),
        Family("timm PVT v2", "timm", _timm("pvt_v2_b0", PYRAMID_TINY, dict(depths=(1, 1, 1, 1)), tiny_px=64)),
        Family("timm Swin", "timm", _timm("swin_tiny_patch4_window7_224", SWIN_TINY, dict(depths=(1, 1, 1, 1)),
                                          tiny_px=64)),
        Family("timm Swin v2", "timm", _timm("swinv2_tiny_window8_256", SWIN_TINY, dict(depths=(1, 1, 1, 1)),
                                             tiny_px=64, bench_px=256)),
        Family("timm Swin v2-CR", "timm", _timm("swinv2_cr_tiny_224", SWIN_TINY, dict(depths=(1, 1, 1, 1)),
                                                tiny_px=64)),
        Family("timm Hiera", "timm", _timm("hiera_tiny_224", dict(img_size=(64, 64), embed_dim=16, num_heads=1,
                                                                  stages=(1, 1, 1, 1)),
                                           dict(stages=(1, 1, 1, 1)), tiny_px=64)),
        Family("timm MViT v2", "timm", _mvitv2, "relative-position einsums stay float (listed)"),
        Family("timm TinyViT", "timm", _timm("tiny_vit_5m_224", {**PYRAMID_TINY, "window_sizes": (2, 2, 2, 2)},
                                             dict(depths=(1, 1, 1, 1)), tiny_px=64)),
        Family("timm ViTamin", "timm", _vitamin),
        Family("HF ViT", "hf", _hf("vit")),
        Family("HF DeiT", "hf", _hf("deit")),
        Family("HF Swin", "hf", _hf("swin")),
        Family("HF DINOv2", "hf", _hf("dinov2")),
        Family("HF BEiT", "hf", _hf("beit")),
        Family("torchvision vit_b_16", "torchvision", _torchvision("vit")),
        Family("torchvision swin_t", "torchvision", _torchvision("swin")),
        Family("user nn.MultiheadAttention ViT", "user", _user),
    ]
    return f


FAMILIES: list[Family] = _families()


def family(name: str) -> Family:
    for f in FAMILIES:
        if f.name == name:
            return f
    raise KeyError(name)


__all__ = ["BENCH", "FAMILIES", "Family", "MHAViT", "TINY", "family"]
