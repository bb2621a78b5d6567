import pytest
import torch
from torch import nn

from vitquant.errors import UncalibratedError, VitquantError
from vitquant.models import get_adapter, prepare


def test_sites_and_pairs(tiny_vit):
    q = prepare(tiny_vit)
    sites = q.act_sites()
    roles = {}
    for s in sites.values():
        roles[s.role] = roles.get(s.role, 0) + 1
    # per block: qkv/fc1 inputs (post_ln), proj input, fc2 input, q, k, v, softmax; + image + head
    assert roles == {"image": 1, "post_ln": 4, "attn_out": 2, "post_gelu": 2, "qk": 4, "v": 2,
                     "post_softmax": 2, "head": 1}
    assert set(q.weight_layers()) == {"patch_embed.proj", "head"} | {
        f"blocks.{i}.{n}" for i in range(2) for n in ("attn.qkv", "attn.proj", "mlp.fc1", "mlp.fc2")}
    assert [(p.norm, p.linears) for p in q.norm_pairs] == [
        ("blocks.0.norm1", ("blocks.0.attn.qkv",)), ("blocks.0.norm2", ("blocks.0.mlp.fc1",)),
        ("blocks.1.norm1", ("blocks.1.attn.qkv",)), ("blocks.1.norm2", ("blocks.1.mlp.fc1",)),
        ("norm", ("head",))]


def test_bypassed_equals_float_and_original_untouched(tiny_vit):
    x = torch.randn(3, 1, 28, 28)
    ref = tiny_vit(x)
    q = prepare(tiny_vit)
    with torch.no_grad(), q.bypassed():
        assert torch.allclose(q(x), ref, atol=1e-5)  # explicit attention == timm's (fused) attention
    assert not any(type(m).__name__.startswith("Quant") for m in tiny_vit.modules())


def test_uncalibrated_model_raises(tiny_vit):
    with pytest.raises(UncalibratedError):
        prepare(tiny_vit)(torch.randn(1, 1, 28, 28))


def test_distilled_deit_has_both_heads():
    from timm.models.deit import VisionTransformerDistilled

    m = VisionTransformerDistilled(img_size=28, patch_size=7, in_chans=1, num_classes=10, embed_dim=32, depth=1,
                                   num_heads=2).eval()
    q = prepare(m)
    assert {"head", "head_dist"} <= set(q.weight_layers())
    assert q.norm_pairs[-1].linears == ("head", "head_dist")
    x = torch.randn(2, 1, 28, 28)
    with torch.no_grad(), q.bypassed():
        assert torch.allclose(q(x), m(x), atol=1e-5)


def test_unknown_layer_is_named(tiny_vit):
    tiny_vit.blocks[1].mlp.act = nn.Sequential(nn.GELU(), nn.Linear(256, 256))  # an extra Linear
    tiny_vit.blocks[0].extra = nn.BatchNorm1d(64)
    with pytest.raises(VitquantError) as e:
        prepare(tiny_vit)
    msg = str(e.value)
    assert "blocks.1.mlp.act.1 (Linear)" in msg and "blocks.0.extra (BatchNorm1d)" in msg


def test_map_pooling_head_is_refused(tiny_vit_factory):
    with pytest.raises(VitquantError, match="attn_pool"):
        prepare(tiny_vit_factory(global_pool="map", class_token=False))


def test_non_vit_model_has_no_adapter():
    with pytest.raises(VitquantError, match="no vitquant adapter"):
        get_adapter(nn.Sequential(nn.Linear(2, 2)))
