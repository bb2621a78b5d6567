import sys

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import vitquant
from vitquant import QuantConfig
from vitquant.calibration import CalibrationSet
from vitquant.errors import VitquantError
from vitquant.methods.fpcs import FPCS, percentile_candidates, uniform_fake
from vitquant.methods.reparam import fold_input_shift
from vitquant.quantizers import AdaLogQuantizer, RangeRule, UniformQuantizer
from vitquant.quantizers.adalog import GELU_SHIFT

# a small search so that each quantization takes about a second on a tiny ViT
FAST = {"candidates": 8, "top_k": 2, "steps": 2, "rounds": 1, "q_range": (1, 41)}


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
    return vitquant.quantize(model, QuantConfig.preset("w4a4", method="adalog", options=FAST), calib, progress=False)


# -- bias reparameterization ----------------------------------------------------------------------
@pytest.mark.parametrize("with_bias", [True, False])
def test_fold_input_shift_is_exact_in_float(with_bias):
    torch.manual_seed(0)
    lin = nn.Linear(24, 8, bias=with_bias)
    q = AdaLogQuantizer(4, q=30, shift=GELU_SHIFT)
    q.set_params(2.5)
    x = F.gelu(torch.randn(50, 24) * 2)
    wq = UniformQuantizer(4, channel_axis=0).fit(lin.weight, RangeRule()).fake_quant(lin.weight)
    before = F.linear(q(x), wq, lin.bias)
    fold_input_shift(lin, q.shift, weight=wq)  # fold with the weight the layer computes with
    q.shift_folded = True
    after = F.linear(q(x), wq, lin.bias)
    assert torch.allclose(after, before, atol=1e-6)
    assert torch.all(q(x) >= 0)  # the folded quantizer hands on the non-negative x̂ + c


def test_model_level_fold_changes_nothing(model_and_data, w4a4):
    model, calib, x = model_and_data
    unfolded = vitquant.quantize(model, QuantConfig.preset("w4a4", method="adalog", options={**FAST, "fold_shift": False}),
                                 calib, progress=False)
    fc2 = "blocks.0.mlp.fc2"
    assert w4a4.submodule(fc2).input_site.quantizer.shift_folded
    assert not unfolded.submodule(fc2).input_site.quantizer.shift_folded
    assert not torch.equal(w4a4.submodule(fc2).bias, unfolded.submodule(fc2).bias)
    with torch.no_grad():
        assert torch.allclose(w4a4(x), unfolded(x), atol=1e-5)


# -- the recipe -----------------------------------------------------------------------------------
def test_quantizers_follow_the_paper(w4a4):
    sites = w4a4.act_sites()
    soft = sites["blocks.0.attn.softmax"].quantizer
    assert isinstance(soft, AdaLogQuantizer) and soft.scale.item() == 1.0 and soft.shift == 0.0
    gelu = sites["blocks.0.mlp.fc2.input"].quantizer
    assert isinstance(gelu, AdaLogQuantizer) and gelu.shift == pytest.approx(GELU_SHIFT) and gelu.shift_folded
    for name in ("q", "k", "v"):  # per-head asymmetric
        q = sites[f"blocks.1.attn.{name}"].quantizer
        assert isinstance(q, UniformQuantizer) and q.channel_axis == 1 and q.scale.numel() == 2
    qkv_in = sites["blocks.0.attn.qkv.input"].quantizer  # channel-wise, reparameterized to layer-wise
    assert qkv_in.channel_axis is None and float(qkv_in.zero_point).is_integer()
    assert sites["patch_embed.proj.input"].quantizer.bits == 8
    wq = w4a4.submodule("blocks.0.mlp.fc1").weight_quantizer
    assert wq.channel_axis == 0 and not wq.symmetric and wq.scale.numel() == 256


def test_end_to_end_sqnr(model_and_data, w4a4, sqnr):
    model, calib, x = model_and_data
    w8a8 = vitquant.quantize(model, QuantConfig.preset("w8a8", method="adalog", options=FAST), calib, progress=False)
    ref = model(x).detach()
    with torch.no_grad():
        s8, s4 = sqnr(ref, w8a8(x)), sqnr(ref, w4a4(x))
    assert s8 > 30 and s4 > 10 and s8 > s4 + 10


def test_reparameterized_float_model_equals_original(model_and_data):
    from vitquant.methods import get_method
    from vitquant.models import prepare

    model, calib, x = model_and_data
    p = prepare(model)
    config = QuantConfig.preset("w4a4", method="adalog", options={**FAST, "fold_shift": False})
    get_method("adalog")().fit(p, calib, config, progress=False)
    with torch.no_grad(), p.bypassed():
        assert torch.allclose(p(x), model(x), atol=1e-5)
    assert not torch.allclose(p.submodule("blocks.0.norm1").weight, model.blocks[0].norm1.weight)


def test_save_load_round_trip(w4a4, model_and_data, tmp_path):
    _, _, x = model_and_data
    path = vitquant.save(w4a4, tmp_path / "adalog")
    model, _, _ = model_and_data
    back = vitquant.load(path, model=model)
    assert isinstance(back.act_sites()["blocks.1.attn.softmax"].quantizer, AdaLogQuantizer)
    with torch.no_grad():
        assert torch.equal(back(x), w4a4(x))


# -- options and the reconstruction hook ----------------------------------------------------------
def test_bad_options_are_refused():
    with pytest.raises(VitquantError, match="table"):
        QuantConfig(method="adalog", options={"table": "approx"})
    with pytest.raises(VitquantError, match="q_range"):
        QuantConfig(method="adalog", options={"q_range": (50, 10)})
    with pytest.raises(VitquantError, match="FPCS"):
        QuantConfig(method="adalog", options={"top_k": 64, "candidates": 16})


def test_reconstruct_without_the_step_says_so(model_and_data, monkeypatch):
    model, calib, _ = model_and_data
    monkeypatch.setitem(sys.modules, "vitquant.methods.reconstruction", None)  # as if it did not exist
    config = QuantConfig.preset("w4a4", method="adalog", options={**FAST, "reconstruct": True})
    with pytest.raises(VitquantError, match="not available yet"):
        vitquant.quantize(model, config, calib, progress=False)


# -- FPCS -----------------------------------------------------------------------------------------
def test_zero_point_candidates_follow_one_sided_ranges():
    # an MNIST-normalized image lies in [-0.42, 2.82]: its 8-bit zero point is ~33, far from 128
    x = torch.linspace(-0.4242, 2.8215, 1000)[:, None]
    scale, zp, delta = percentile_candidates(x, 8, n_scale=4, n_zp=4)
    assert scale.shape == zp.shape == (16, 1) and delta.shape == (1,)
    minmax_z = round(0.4242 / ((2.8215 + 0.4242) / 255))
    assert minmax_z in zp[:, 0].tolist() and zp.max() < 40


def test_fpcs_refines_to_the_grid_optimum_and_never_loses_the_best():
    torch.manual_seed(0)
    x = torch.randn(4000, 3) * torch.tensor([1.0, 3.0, 0.2])  # three groups (channels)

    def err(s, z):
        return (uniform_fake(x[None], s[:, None], z[:, None], 4) - x).pow(2).mean(1)

    first = FPCS(candidates=32, top_k=4, steps=1).search_uniform(err, x, 4, x.numel())
    best = FPCS(candidates=32, top_k=4, steps=5).search_uniform(err, x, 4, x.numel())
    e_first, e_best = err(first[0][None], first[1][None])[0], err(best[0][None], best[1][None])[0]
    assert torch.all(e_best <= e_first + 1e-9)
    dense = torch.linspace(0.05, 0.6, 400)[:, None] * torch.tensor([1.0, 3.0, 0.2])  # brute force, z = 8
    e_dense = err(dense, torch.full_like(dense, 8.0)).min(0).values
    assert torch.all(e_best <= e_dense * 1.02)


def test_reparam_head_rescues_outlier_channels_at_the_head(model_and_data, sqnr):
    from vitquant.models.outliers import inject_ln_outliers

    model, calib, x = model_and_data
    stressed = inject_ln_outliers(model, 4, 30.0)
    ref = stressed(x).detach()
    plain = vitquant.quantize(stressed, QuantConfig.preset("w4a4", method="adalog", options={**FAST, "reparam_head": False}),
                              calib, progress=False)
    head = vitquant.quantize(stressed, QuantConfig.preset("w4a4", method="adalog", options={**FAST, "reparam_head": True}),
                             calib, progress=False)
    assert head.act_sites()["head.input"].quantizer.channel_axis is None
    with torch.no_grad():
        assert sqnr(ref, head(x)) > sqnr(ref, plain(x)) + 2


def test_inputs_up_to_whole_rows_are_searched_whole(model_and_data):
    """32 images × 17 tokens = 544 rows per Linear input: with whole_rows ≥ 544 a tiny row budget
    (search_macs) changes nothing — the search is the unsampled one (search_macs=0), bit for bit; with
    whole_rows below 544 the same budget samples the rows and the quantizers change."""
    model, calib, x = model_and_data

    def run(**opts):
        q = vitquant.quantize(model, QuantConfig.preset("w4a4", method="adalog", options={**FAST, **opts}), calib,
                              progress=False)
        with torch.no_grad():
            return q(x)

    full = run(search_macs=0)
    assert torch.equal(run(search_macs=2**10, whole_rows=544), full)
    assert not torch.equal(run(search_macs=2**10, whole_rows=543), full)


def test_schedule_sets_the_rounds_one_on_real_size_models_two_on_the_reference_ones(model_and_data, monkeypatch):
    from vitquant.methods import steps

    model, calib, x = model_and_data
    fast = {k: v for k, v in FAST.items() if k != "rounds"}

    def logits(**options):
        cfg = QuantConfig(method="adalog", w_bits=4, a_bits=4, options={**fast, **options})
        with torch.no_grad():
            return vitquant.quantize(model, cfg, calib, progress=False)(x)

    one, two = logits(rounds=1), logits(rounds=2)
    assert not torch.equal(one, two)  # the rounds matter here, so the checks below can fail
    assert torch.equal(logits(), two)  # a 64-wide, 17-token model is a reference-size model
    assert torch.equal(logits(schedule="cpu"), one) and torch.equal(logits(schedule="reference", rounds=1), one)
    monkeypatch.setattr(steps, "REAL_SIZE_FLOATS", 17 * 64)  # now its unit outputs count as real-size
    assert torch.equal(logits(), one)
    from vitquant.methods.adalog import AdaLogOptions

    with pytest.raises(ValueError, match="schedule"):
        AdaLogOptions(schedule="fast")
