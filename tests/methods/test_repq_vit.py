import pytest
import torch

import vitquant
from vitquant import QuantConfig
from vitquant.calibration import CalibrationSet
from vitquant.errors import VitquantError


def _calib(x):
    return CalibrationSet(images=x, source="random", skipped=[])


def test_reparameterized_float_model_equals_original(tiny_vit, calib_images):
    """RepQ-ViT's scale reparameterization changes LayerNorms and weights but not the float function."""
    q = vitquant.quantize(tiny_vit, QuantConfig.preset("w4a4", method="repq-vit"), _calib(calib_images), progress=False)
    # the frozen weights are quantized; rebuild the reparameterized float model from the un-frozen copy
    from vitquant.methods import get_method
    from vitquant.models import prepare

    p = prepare(tiny_vit)
    get_method("repq-vit")().fit(p, _calib(calib_images), q.config, progress=False)
    x = torch.randn(8, 1, 28, 28)
    with torch.no_grad(), p.bypassed():
        assert torch.allclose(p(x), tiny_vit(x), atol=1e-5)
    assert not torch.allclose(p.submodule("blocks.0.norm1").weight, tiny_vit.blocks[0].norm1.weight)


def test_channel_wise_grid_maps_exactly_to_layer_wise(tiny_vit, calib_images):
    """After reparameterization, layer-wise quantization of x' equals channel-wise quantization of x."""
    from vitquant.calibration.engine import observe_float
    from vitquant.models import prepare
    from vitquant.quantizers import RangeRule, UniformQuantizer

    p = prepare(tiny_vit)
    site = p.submodule("blocks.0.attn.qkv").input_site
    obs = observe_float(p, [calib_images], sites=[site], progress=False)[site.name]
    x = obs.sample()
    cw = UniformQuantizer(4, channel_axis=-1).fit(x, RangeRule("mse"), obs.lo, obs.hi)
    s, z = cw.scale, cw.zero_point
    s_t, z_t = s.mean(), torch.round(z.mean())
    r = s / s_t
    b = (-z * s) / r + z_t * s_t
    lw = UniformQuantizer(4)
    lw.set_params(s_t, z_t)
    # x' = x / r - b, so channel-wise x̂ maps to x̂' = x̂ / r - b
    assert torch.allclose(lw.fake_quant(x / r - b), cw.fake_quant(x) / r - b, atol=1e-4)


@pytest.mark.parametrize("method", ["minmax", "percentile", "repq-vit"])
def test_end_to_end_quality_ordering(tiny_vit, calib_images, sqnr, method):
    x = torch.randn(16, 1, 28, 28, generator=torch.Generator().manual_seed(5))
    ref = tiny_vit(x).detach()
    out8 = vitquant.quantize(tiny_vit, QuantConfig.preset("w8a8", method=method), _calib(calib_images), progress=False)
    out4 = vitquant.quantize(tiny_vit, QuantConfig.preset("w4a4", method=method), _calib(calib_images), progress=False)
    with torch.no_grad():
        s8, s4 = sqnr(ref, out8(x)), sqnr(ref, out4(x))
    assert s8 > 25 and s4 > 5 and s8 > s4 + 10


def test_repq_uses_log_sqrt2_and_layerwise_post_ln(tiny_vit, calib_images):
    q = vitquant.quantize(tiny_vit, QuantConfig.preset("w4a4"), _calib(calib_images), progress=False)
    sites = q.act_sites()
    assert sites["blocks.0.attn.softmax"].quantizer.kind == "log_sqrt2"
    assert sites["blocks.0.attn.qkv.input"].quantizer.channel_axis is None  # reparameterized to layer-wise
    assert float(sites["blocks.0.attn.qkv.input"].quantizer.zero_point).is_integer()
    assert sites["head.input"].quantizer.channel_axis is None


def test_unknown_method_option_is_refused():
    with pytest.raises(VitquantError, match="no option"):
        QuantConfig(method="repq-vit", options={"bogus": 1})
    with pytest.raises(VitquantError, match="percentile"):
        QuantConfig(method="percentile", options={"percentile": 2.0})


@pytest.mark.parametrize("method", ["repq-vit", "dopq-vit"])
def test_auto_head_reparameterizes_only_outlier_heads(tiny_vit, calib_images, method):
    """reparam_head="auto" (the default) is the published recipe (false) where the head input's channel
    ranges are even, and the reparameterized head (true) where a few channels are 30× wider — exactly:
    the same quantizers and outputs, decided from the float model's channel ranges."""
    from vitquant.models.outliers import inject_ln_outliers

    x = torch.randn(8, 1, 28, 28, generator=torch.Generator().manual_seed(2))

    def run(model, head):
        opts = {} if head is None else {"reparam_head": head}
        q = vitquant.quantize(model, QuantConfig.preset("w4a4", method=method, options=opts), _calib(calib_images),
                              progress=False)
        with torch.no_grad():
            return q(x), q.act_sites()["head.input"].quantizer

    stressed = inject_ln_outliers(tiny_vit, 4, 30.0)
    for model, same_as in ((tiny_vit, False), (stressed, True)):
        auto_out, auto_q = run(model, None)
        want_out, want_q = run(model, same_as)
        other_out, _ = run(model, not same_as)
        assert torch.equal(auto_out, want_out)
        assert torch.equal(auto_q.scale, want_q.scale) and torch.equal(auto_q.zero_point, want_q.zero_point)
        assert not torch.equal(auto_out, other_out)  # the choice matters on both models


def test_channel_range_is_the_float_extremes_with_or_without_an_observe_pass(tiny_vit, calib_images):
    """Context.channel_range: kept from an observe pass that saw the site, else measured — the float
    model's exact per-channel (min, max) either way; range_spread is max / median of hi − lo."""
    from vitquant.calibration.engine import Context, observe_float
    from vitquant.methods.repq_vit import range_spread
    from vitquant.models import prepare
    from vitquant.models.outliers import inject_ln_outliers
    from vitquant.plan import SitePlan

    config = QuantConfig.preset("w4a4")
    spreads = []
    for model in (tiny_vit, inject_ln_outliers(tiny_vit, 4, 30.0)):
        p = prepare(model)
        site = p.act_sites()["head.input"]
        new_ctx = lambda: Context(p, _calib(calib_images), config, SitePlan.resolve(config, p.structure),  # noqa: E731
                                  progress=False)
        obs = observe_float(p, [calib_images], sites=[site], progress=False)[site.name]
        measured = new_ctx().channel_range(site)  # its own extremes-only forward
        ctx = new_ctx()
        ctx.observe(on_complete=lambda s, o: None)  # every site, as methods observe
        kept = ctx.channel_range(site)
        assert torch.equal(measured[0], obs.lo) and torch.equal(measured[1], obs.hi)
        # observing every site makes attention explicit (its operands are sites): last-bit differences
        torch.testing.assert_close(kept, (obs.lo, obs.hi), rtol=1e-5, atol=1e-5)
        r = (obs.hi - obs.lo).double()
        assert range_spread(*measured) == pytest.approx(float(r.max() / r.median()), rel=1e-12)
        spreads.append(range_spread(*kept))
    assert spreads[0] < 10 < spreads[1]  # even channels; 4 channels ×30
