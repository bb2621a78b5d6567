"""prepare(): the traced structure of a tiny timm ViT in detail, refusal or float-listing of what the
core does not understand, the dispatcher's numbering, and the per-site plan."""
import copy

import pytest
import torch
from torch import nn

import vitquant
from vitquant import QuantConfig, VitquantError
from vitquant.errors import UncalibratedError
from vitquant.models import prepare
from vitquant.models.dispatch import quiet
from vitquant.plan import SitePlan


def test_structure_of_a_timm_vit(tiny_vit):
    q = prepare(tiny_vit)
    s = q.structure
    roles = {}
    for site in s.sites.values():
        roles[site.role] = roles.get(site.role, 0) + 1
    # per block: qkv/fc1 inputs (post_ln), proj input, fc2 input, q, k, v, softmax; + image + head
    assert roles == {"image": 1, "post_ln": 4, "attn_out": 2, "post_gelu": 2, "qk": 4, "v": 2,
                     "post_softmax": 2, "head": 1}
    assert s.layers == ["patch_embed.proj"] + [f"blocks.{i}.{n}" for i in range(2) for n in
                                               ("attn.qkv", "attn.proj", "mlp.fc1", "mlp.fc2")] + ["head"]
    assert [(m.norm, m.layers) for m in s.mappings] == [
        ("blocks.0.norm1", ("blocks.0.attn.qkv",)), ("blocks.0.norm2", ("blocks.0.mlp.fc1",)),
        ("blocks.1.norm1", ("blocks.1.attn.qkv",)), ("blocks.1.norm2", ("blocks.1.mlp.fc1",)), ("norm", ("head",))]
    assert [(u.name, u.chained) for u in s.units] == [("patch_embed.proj", False), ("blocks.0", False),
                                                      ("blocks.1", True), ("head", False)]
    assert [c.name for c in s.cores] == ["blocks.0.attn", "blocks.1.attn"] and all(c.fused for c in s.cores)
    assert s.heads == ("head",) and s.fused_qkv == {"blocks.0.attn.qkv": 3, "blocks.1.attn.qkv": 3}
    assert s.sites["blocks.0.attn.proj.input"].producer_module == "blocks.0.attn"
    assert not any(type(m).__name__.startswith("Quant") for m in tiny_vit.modules())  # the original is untouched


def test_uncalibrated_model_raises(tiny_vit):
    with pytest.raises(UncalibratedError):
        prepare(tiny_vit)(torch.randn(1, 1, 28, 28))


class _MixedBlock(nn.Module):
    """A block followed by a token mixer on a Conv1d: a weighted op the core has no twin for."""

    def __init__(self, block, dim):
        super().__init__()
        self.block = block
        self.mixer = nn.Conv1d(dim, dim, 3, padding=1)

    def forward(self, x):
        x = self.block(x)
        return x + self.mixer(x.transpose(1, 2)).transpose(1, 2)


def test_unknown_layer_is_refused_by_name_or_left_float_and_listed(tiny_vit, calib_images):
    tiny_vit.blocks[1] = _MixedBlock(tiny_vit.blocks[1], 64)
    with pytest.raises(VitquantError) as e:
        prepare(tiny_vit)
    assert "blocks.1.mixer" in str(e.value) and "conv1d" in str(e.value) and "unknown='float'" in str(e.value)
    assert "\n" not in str(e.value)
    q = vitquant.quantize(tiny_vit, QuantConfig.preset("w8a8", method="minmax", unknown_layers="float"),
                          calib_images, progress=False)
    assert any("blocks.1.mixer" in op for op in q.stats["float_ops"])
    x = torch.randn(2, 1, 28, 28)
    with torch.no_grad():
        assert torch.allclose(q(x), tiny_vit(x), atol=0.5)


def test_numbering_ignores_vitquant_own_ops_and_survives_deepcopy(tiny_vit):
    """Ops run under quiet() (quantizers, observers, hooks) are not the model's: they must not shift
    which call a handler takes; a deep copy keeps working handlers of its own."""
    q = prepare(tiny_vit)
    calls = []
    site = q.act_sites()["blocks.0.attn.q"]

    class NoisyObserver:  # does matmuls and adds inside the attention owner's scope
        def update(self, x):
            calls.append((x @ x.transpose(-2, -1)).sum() + 1)

    class SilentObserver:
        def update(self, x):
            pass

    x = torch.randn(2, 1, 28, 28)
    outs = []
    for observer in (SilentObserver(), NoisyObserver()):  # an observer makes the attention explicit
        site.observer = observer
        with torch.no_grad(), q.bypassed():
            outs.append(q(x))
    site.observer = None
    assert calls and torch.equal(outs[0], outs[1])
    with torch.no_grad(), q.bypassed():
        out = q(x)
    assert torch.equal(out, tiny_vit(x))
    twin = copy.deepcopy(q)
    with torch.no_grad(), twin.bypassed():
        assert torch.equal(twin(x), out)
    handler = twin.submodule("blocks.0.attn").vq_handlers["sdpa0"]
    assert handler.q_site is not q.submodule("blocks.0.attn").vq_handlers["sdpa0"].q_site
    with quiet():  # nesting is fine
        with quiet():
            pass


def test_plan_by_name_weight_and_role(tiny_vit):
    s = prepare(tiny_vit).structure
    plan = SitePlan.resolve(QuantConfig.preset("w4a4", site_bits={"head*": 8, "role:post_softmax": 6},
                                               keep_float=["blocks.1.mlp.fc2.weight"]), s)
    assert plan.act("head.input") == 8 and plan.weight("head") == 8
    assert plan.act("blocks.0.attn.softmax") == 6 and plan.act("blocks.0.attn.q") == 4
    assert plan.act("patch_embed.proj.input") == 8  # the image keeps patch_embed_input_bits
    assert plan.weight("blocks.1.mlp.fc2") is None and plan.act("blocks.1.mlp.fc2.input") == 4
    with pytest.raises(VitquantError, match="matches no quantization site"):
        SitePlan.resolve(QuantConfig.preset("w4a4", keep_float=["hed*"]), s)


def test_plan_is_applied_by_every_kind_of_method(tiny_vit, calib_images):
    for method in ("minmax", "ptq4vit", "noisyquant"):
        q = vitquant.quantize(tiny_vit, QuantConfig.preset("w4a4", method=method, keep_float=["head*"],
                                                           options={"candidates": 5} if method == "ptq4vit" else {}),
                              calib_images, progress=False)
        assert not q.act_sites()["head.input"].enabled and q.act_sites()["head.input"].quantizer is None
        assert q.weight_layers()["head"].weight_quantizer is None
        assert torch.equal(q.weight_layers()["head"].weight, tiny_vit.head.weight)  # float weights kept
