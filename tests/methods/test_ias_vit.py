"""I&S-ViT end to end on a tiny random ViT: SULQ on softmax, the three SOS stages, save/load."""
import pytest
import torch

import vitquant
from vitquant import QuantConfig
from vitquant.calibration import CalibrationSet
from vitquant.calibration.engine import observe_float
from vitquant.errors import VitquantError
from vitquant.methods import get_method
from vitquant.methods.ias_vit import cpu_iters, paper_iters
from vitquant.methods.repq_vit import reparameterize_post_ln
from vitquant.models import prepare
from vitquant.quantizers import RangeRule, ShiftUniformLog2Quantizer, UniformQuantizer


def _calib(x):
    return CalibrationSet(images=x, source="random", skipped=[])


def _quantize(model, calib, bits="w4a4", **options):
    return vitquant.quantize(model, QuantConfig.preset(bits, method="ias-vit", options=options), calib, progress=False)


@pytest.fixture
def small_vit(tiny_vit_factory):
    return tiny_vit_factory(depth=2, embed_dim=32)


def test_end_to_end_quantizers_quality_and_exact_reload(small_vit, calib_images, sqnr, tmp_path):
    q = _quantize(small_vit, _calib(calib_images), iters=15)
    sites = q.act_sites()
    assert all(isinstance(s.quantizer, ShiftUniformLog2Quantizer) for s in sites.values() if s.role == "post_softmax")
    # stage 2 turned the channel-wise post-LN quantizers into layer-wise ones
    post_ln = [s.quantizer for s in sites.values() if s.role == "post_ln"]
    assert post_ln and all(isinstance(p, UniformQuantizer) and p.scale.numel() == 1 for p in post_ln)
    x = torch.randn(16, 1, 28, 28, generator=torch.Generator().manual_seed(5))
    with torch.no_grad():
        ref, out = small_vit(x), q(x)
    assert sqnr(ref, out) > 8
    vitquant.save(q, tmp_path / "q")
    loaded = vitquant.load(tmp_path / "q", model=small_vit)
    with torch.no_grad():
        assert torch.equal(loaded(x), out)


def test_reconstruction_improves_on_calibration_alone(small_vit, calib_images):
    """Same quantizers, with and without the two reconstruction stages (iters=0 keeps only SULQ + RepQ)."""
    calib = _calib(calib_images)
    x = calib_images

    def err(q):
        with torch.no_grad():
            return (q(x) - small_vit(x)).pow(2).mean().item()

    assert err(_quantize(small_vit, calib, "w3a3", iters=40)) < err(_quantize(small_vit, calib, "w3a3", iters=0))


def test_stage_two_is_lossless_while_weights_are_float(small_vit, calib_images):
    """With float weights, the channel-wise → layer-wise step leaves the quantized model's output unchanged:
    the layer-wise grid reproduces each channel's grid exactly (RepQ-ViT's property)."""
    p = prepare(small_vit)
    p.requires_grad_(False)
    pair = p.structure.mappings[0]
    site = p.submodule(pair.layers[0]).input_site
    obs = observe_float(p, [calib_images], sites=[site], progress=False)[site.name]
    site.quantizer = UniformQuantizer(4, channel_axis=-1).fit(obs.sample(), RangeRule("mse"), obs.lo, obs.hi)
    for other in p.act_sites().values():
        other.enabled = other is site
    for layer in p.weight_layers().values():
        layer.bypass = True  # float weights, as in stage 1
    with torch.no_grad():
        before = p(calib_images)
        reparameterize_post_ln(p, pair)
        after = p(calib_images)
    assert torch.allclose(before, after, atol=1e-4)


def test_options_and_schedule():
    assert paper_iters(4, 4) == 1000 and paper_iters(3, 3) == 1000 and paper_iters(6, 6) == 200
    assert cpu_iters(4, 4) == 200 and cpu_iters(6, 6) == 40 and cpu_iters(8, 4) == 200
    assert get_method("ias-vit").recommended_calib_size == 256
    with pytest.raises(VitquantError, match="stage1_inputs"):
        QuantConfig.preset("w4a4", method="ias-vit", options={"stage1_inputs": "random"})
    with pytest.raises(VitquantError, match="no option"):
        QuantConfig.preset("w4a4", method="ias-vit", options={"iterations": 5})


def test_schedule_is_the_reference_one_on_small_models_and_the_cpu_one_on_real_size():
    from vitquant.methods.ias_vit import REAL_SIZE_FLOATS, IaSViTOptions, schedule_for

    small, real = 17 * 192, 197 * 384  # bundled block output, DeiT-S block output (floats per image)
    cpu, gpu = torch.device("cpu"), torch.device("cuda", 0)
    assert small < REAL_SIZE_FLOATS <= 197 * 192  # DeiT-T is real-size too
    assert schedule_for(IaSViTOptions(), 4, 4, small, cpu) == (200, 32)
    assert schedule_for(IaSViTOptions(), 6, 6, small, cpu) == (40, 32)
    assert schedule_for(IaSViTOptions(), 4, 4, real, cpu) == (100, 8)
    assert schedule_for(IaSViTOptions(), 8, 8, real, cpu) == (40, 8)
    assert schedule_for(IaSViTOptions(), 4, 4, real, gpu) == (200, 32)  # a GPU affords the reference schedule
    assert schedule_for(IaSViTOptions(schedule="cpu"), 4, 4, real, gpu) == (100, 8)
    assert schedule_for(IaSViTOptions(schedule="reference"), 4, 4, real, cpu) == (200, 32)
    assert schedule_for(IaSViTOptions(schedule="cpu"), 3, 3, small, cpu) == (100, 8)
    assert schedule_for(IaSViTOptions(iters=7, batch_size=3), 4, 4, real, cpu) == (7, 3)
    with pytest.raises(ValueError, match="schedule"):
        IaSViTOptions(schedule="fast")
    with pytest.raises(ValueError, match="batch_size"):
        IaSViTOptions(batch_size=0)
