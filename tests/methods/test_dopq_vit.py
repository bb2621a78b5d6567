import sys

import pytest
import torch

import vitquant
from vitquant import QuantConfig
from vitquant.calibration import CalibrationSet
from vitquant.calibration.engine import observe_float
from vitquant.errors import VitquantError
from vitquant.methods.repq_vit import reparameterize_post_ln
from vitquant.models import prepare
from vitquant.quantizers import RangeRule, TanQuantizer, UniformQuantizer


def _calib(x):
    return CalibrationSet(images=x, source="random", skipped=[])


@pytest.fixture(scope="module")
def model_and_data():
    from timm.models.vision_transformer import VisionTransformer

    torch.manual_seed(0)
    model = VisionTransformer(img_size=28, patch_size=7, in_chans=1, num_classes=10, embed_dim=64, depth=2,
                              num_heads=2).eval()
    model.pretrained_cfg = dict(input_size=(1, 28, 28), mean=(0.1307,), std=(0.3081,), crop_pct=1.0,
                                interpolation="bilinear")
    calib = _calib(torch.randn(32, 1, 28, 28, generator=torch.Generator().manual_seed(1)))
    x = torch.randn(16, 1, 28, 28, generator=torch.Generator().manual_seed(5))
    return model, calib, x


@pytest.fixture(scope="module")
def w4a4(model_and_data):
    model, calib, _ = model_and_data
    return vitquant.quantize(model, QuantConfig.preset("w4a4", method="dopq-vit"), calib, progress=False)


def test_median_reparameterization_is_exact(model_and_data):
    model, calib, x = model_and_data
    p = prepare(model)
    pair = p.structure.mappings[0]  # blocks.0.norm1 -> qkv
    site = p.submodule(pair.layers[0]).input_site
    obs = observe_float(p, [calib.images], sites=[site], progress=False)[site.name]
    rows = obs.sample()
    cw = UniformQuantizer(4, channel_axis=-1).fit(rows, RangeRule("mse"), obs.lo, obs.hi)
    site.quantizer = cw
    r, b = reparameterize_post_ln(p, pair, "median")
    lw = site.quantizer
    assert lw.scale.item() == pytest.approx(torch.quantile(cw.scale, 0.5).item())  # MOSF: the median
    assert lw.zero_point.item() == torch.round(torch.quantile(cw.zero_point, 0.5)).item()
    # channel c's grid lands exactly on the shared grid: x' = x / r - b
    assert torch.allclose(lw.fake_quant(rows / r - b), cw.fake_quant(rows) / r - b, atol=1e-5)
    with torch.no_grad(), p.bypassed():
        assert torch.allclose(p(x), model(x), atol=1e-5)  # the float function is unchanged


def test_tanq_on_softmax_and_layerwise_post_ln(w4a4):
    sites = w4a4.act_sites()
    soft = sites["blocks.0.attn.softmax"].quantizer
    assert isinstance(soft, TanQuantizer) and 0 < soft.alpha < torch.pi / 2 and soft.scale.item() <= 1.0
    assert sites["blocks.1.mlp.fc1.input"].quantizer.channel_axis is None
    assert sites["blocks.0.mlp.fc2.input"].quantizer.kind == "uniform"  # everything else as RepQ-ViT


def test_end_to_end_sqnr(model_and_data, w4a4, sqnr):
    model, calib, x = model_and_data
    w8a8 = vitquant.quantize(model, QuantConfig.preset("w8a8", method="dopq-vit"), calib, progress=False)
    ref = model(x).detach()
    with torch.no_grad():
        s8, s4 = sqnr(ref, w8a8(x)), sqnr(ref, w4a4(x))
    assert s8 > 25 and s4 > 5 and s8 > s4 + 10


def test_median_and_mean_give_the_same_quantized_function(model_and_data, w4a4, sqnr):
    """The documented finding: after an exact reparameterization the choice of s̃ only rescales the
    reparameterized weights, whose per-channel quantizer is scale-equivariant."""
    model, calib, x = model_and_data
    mean = vitquant.quantize(model, QuantConfig.preset("w4a4", method="dopq-vit", options={"scale_choice": "mean"}),
                             calib, progress=False)
    assert mean.act_sites()["blocks.0.attn.qkv.input"].quantizer.scale != w4a4.act_sites()[
        "blocks.0.attn.qkv.input"].quantizer.scale
    with torch.no_grad():
        assert sqnr(w4a4(x), mean(x)) > 60


def test_save_load_round_trip(w4a4, model_and_data, tmp_path):
    model, _, x = model_and_data
    back = vitquant.load(vitquant.save(w4a4, tmp_path / "dopq"), model=model)
    assert isinstance(back.act_sites()["blocks.1.attn.softmax"].quantizer, TanQuantizer)
    with torch.no_grad():
        assert torch.equal(back(x), w4a4(x))


def test_mad_rule_is_refused_with_the_reason():
    with pytest.raises(VitquantError, match="could not be pinned down"):
        QuantConfig(method="dopq-vit", options={"scale_choice": "mad"})
    with pytest.raises(VitquantError, match="scale_choice"):
        QuantConfig(method="dopq-vit", options={"scale_choice": "max"})


def test_reconstruct_without_the_step_says_so(model_and_data, monkeypatch):
    model, calib, _ = model_and_data
    monkeypatch.setitem(sys.modules, "vitquant.methods.reconstruction", None)  # as if it did not exist
    with pytest.raises(VitquantError, match="not available yet"):
        vitquant.quantize(model, QuantConfig.preset("w4a4", method="dopq-vit", options={"reconstruct": True}), calib,
                          progress=False)


def test_reconstruct_runs_the_shared_step(model_and_data, w4a4, sqnr):
    model, calib, x = model_and_data
    options = {"reconstruct": True, "reconstruct_iters": 5}
    rec = vitquant.quantize(model, QuantConfig.preset("w4a4", method="dopq-vit", options=options), calib, progress=False)
    ref = model(x).detach()
    with torch.no_grad():
        assert sqnr(ref, rec(x)) > sqnr(ref, w4a4(x)) - 3  # a few steps must not wreck it
