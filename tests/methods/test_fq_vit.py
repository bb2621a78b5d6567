import pytest
import torch

import vitquant
from vitquant import QuantConfig
from vitquant.calibration import CalibrationSet
from vitquant.errors import VitquantError
from vitquant.methods.fq_vit import FQViT
from vitquant.models import prepare
from vitquant.quantizers import UniformQuantizer
from vitquant.quantizers.log_int_softmax import LogIntSoftmaxQuantizer
from vitquant.quantizers.ptf import PowerOfTwoFactorQuantizer

EXTRA_ROLES = {"embed", "pos_embed", "residual", "branch_out", "attn_scores", "logits"}


@pytest.fixture
def vit(tiny_vit_factory):
    # a trained ViT's class token is as large as its patch tokens; timm's init (std 0.02) would leave it
    # far below the residual stream's grid and measure only that artefact
    model = tiny_vit_factory()
    with torch.no_grad():
        model.cls_token.normal_(generator=torch.Generator().manual_seed(3))
    return model


@pytest.fixture
def calib(calib_images):
    return CalibrationSet(images=calib_images, source="random", skipped=[])


def _quantize(model, calib, bits="w8a8", **options):
    return vitquant.quantize(model, QuantConfig.preset(bits, method="fq-vit", options=options), calib, progress=False)


def test_extra_sites_are_opt_in_and_keep_the_float_function(vit):
    x = torch.randn(4, 1, 28, 28)
    plain, full = prepare(vit), prepare(vit, extra_sites=FQViT.requires_sites)
    assert not {s.role for s in plain.act_sites().values()} & EXTRA_ROLES
    assert set(plain.act_sites()) < set(full.act_sites())
    assert {s.role for s in full.act_sites().values()} >= EXTRA_ROLES
    assert list(plain.model.state_dict()) == [k for k in vit.state_dict()]  # nothing renamed without extras
    with torch.no_grad(), plain.bypassed(), full.bypassed():
        ref = plain(x)  # explicit attention: equal to timm's fused attention up to float rounding
        assert torch.allclose(ref, vit(x), atol=1e-6)
        assert torch.equal(full(x), ref)
    with pytest.raises(VitquantError, match="unknown extra quantization sites"):
        prepare(vit, extra_sites=("layernorm_output",))


def test_w8a8_close_to_float_and_quantizers_as_in_the_paper(vit, calib, sqnr):
    q = _quantize(vit, calib)
    sites = q.act_sites()
    x = torch.randn(16, 1, 28, 28, generator=torch.Generator().manual_seed(5))
    with torch.no_grad():
        assert sqnr(vit(x), q(x)) > 25
    residual = [s for s in sites.values() if s.role == "residual"]
    assert len(residual) == 1 + 2 * len(vit.blocks)  # after the position add and after every residual add
    assert all(isinstance(s.quantizer, PowerOfTwoFactorQuantizer) and s.quantizer.bits == 8 for s in residual)
    lis = sites["blocks.0.attn.softmax"].quantizer
    assert isinstance(lis, LogIntSoftmaxQuantizer) and lis.bits == 4  # the paper's 4-bit attention at A8
    assert torch.equal(lis.scores_scale, sites["blocks.0.attn.scores"].quantizer.scale)
    q_k_v = [sites[f"blocks.0.attn.{t}"].quantizer for t in "qkv"]  # the code quantizes qkv as one tensor
    assert all(torch.equal(u.scale, q_k_v[0].scale) and torch.equal(u.zero_point, q_k_v[0].zero_point) for u in q_k_v)
    w = q.weight_layers()["blocks.0.mlp.fc1"].weight_quantizer
    assert w.symmetric and w.channel_axis == 0
    assert all(s.quantizer is not None for s in sites.values() if s.enabled)


def test_the_residual_stream_itself_is_quantized(vit, calib):
    """"Fully quantized": LayerNorm inputs and the skip path carry values on the PTF grid."""
    q = _quantize(vit, calib, "w6a6")
    blk = q.submodule("blocks.1")
    ptf = q.act_sites()["blocks.1.residual0"].quantizer  # after the attention branch's add
    seen = {}
    h = blk.norm2.register_forward_pre_hook(lambda m, args: seen.setdefault("x", args[0]))
    with torch.no_grad():
        q(torch.randn(2, 1, 28, 28))
    h.remove()
    steps = seen["x"] / ptf.channel_scale()
    assert torch.allclose(steps, torch.round(steps), atol=1e-3)


def test_low_bits_collapse_and_the_attention_bits_follow_the_paper(vit, calib, sqnr):
    x = torch.randn(16, 1, 28, 28, generator=torch.Generator().manual_seed(5))
    with torch.no_grad():
        ref = vit(x)
        errs = {b: sqnr(ref, _quantize(vit, calib, b)(x)) for b in ("w8a8", "w4a4")}
    assert errs["w4a4"] < errs["w8a8"] - 15
    q3 = _quantize(vit, calib, "w3a3")  # LIS never gets more bits than the other activations
    assert q3.act_sites()["blocks.0.attn.softmax"].quantizer.bits == 3
    q8 = _quantize(vit, calib, "w8a8", lis=False)  # the paper's Attn8 rows: float softmax, uniform 8-bit
    soft = q8.act_sites()["blocks.0.attn.softmax"].quantizer
    assert type(soft) is UniformQuantizer and soft.bits == 8
    q_no_ptf = _quantize(vit, calib, "w8a8", ptf=False, attn_bits=6)
    assert type(q_no_ptf.act_sites()["blocks.0.residual0"].quantizer) is UniformQuantizer
    assert q_no_ptf.act_sites()["blocks.0.attn.softmax"].quantizer.bits == 6
    with pytest.raises(VitquantError, match="observer"):
        QuantConfig.preset("w8a8", method="fq-vit", options={"observer": "ema"})


@pytest.mark.parametrize("observer", ["percentile", "omse"])
def test_other_observers_run(vit, calib, sqnr, observer):
    x = torch.randn(8, 1, 28, 28, generator=torch.Generator().manual_seed(5))
    q = _quantize(vit, calib, "w8a8", observer=observer, lis_variant="code")
    with torch.no_grad():
        assert sqnr(vit(x), q(x)) > 25


def test_save_load_recreates_the_extra_sites(vit, calib, tmp_path):
    q = _quantize(vit, calib, "w6a6")
    vitquant.save(q, tmp_path / "fq")
    loaded = vitquant.load(tmp_path / "fq", model=vit)
    assert set(loaded.act_sites()) == set(q.act_sites())
    assert isinstance(loaded.act_sites()["blocks.1.residual1"].quantizer, PowerOfTwoFactorQuantizer)
    assert isinstance(loaded.act_sites()["blocks.1.attn.softmax"].quantizer, LogIntSoftmaxQuantizer)
    x = torch.randn(4, 1, 28, 28)
    with torch.no_grad():
        assert torch.equal(loaded(x), q(x))
