"""APHQ-ViT end to end on a tiny random ViT: uniform quantizers, APH-weighted reconstruction, save/load."""
import pytest
import torch

import vitquant
from vitquant import QuantConfig
from vitquant.calibration import CalibrationSet
from vitquant.errors import VitquantError
from vitquant.methods import get_method
from vitquant.methods.aphq_vit import SCHEDULES, APHQOptions
from vitquant.methods.reconstruction import float_teacher, reconstruct_blocks
from vitquant.models import prepare
from vitquant.quantizers import UniformQuantizer

W4A4 = QuantConfig.preset("w4a4", method="repq-vit")


def _calib(x):
    return CalibrationSet(images=x, source="random", skipped=[])


def _quantize(model, calib, bits="w4a4", method="aphq-vit", **options):
    return vitquant.quantize(model, QuantConfig.preset(bits, method=method, options=options), calib, progress=False)


@pytest.fixture
def small_vit(tiny_vit_factory):
    return tiny_vit_factory(depth=2, embed_dim=32)


def test_end_to_end_uniform_quantizers_quality_and_exact_reload(small_vit, calib_images, sqnr, tmp_path):
    q = _quantize(small_vit, _calib(calib_images), iters=15)
    softmax = [s.quantizer for s in q.act_sites().values() if s.role == "post_softmax"]
    assert softmax and all(type(p) is UniformQuantizer for p in softmax)  # linear quantizers only
    x = torch.randn(16, 1, 28, 28, generator=torch.Generator().manual_seed(5))
    with torch.no_grad():
        ref, out = small_vit(x), q(x)
    assert sqnr(ref, out) > 8
    vitquant.save(q, tmp_path / "q")
    loaded = vitquant.load(tmp_path / "q", model=small_vit)
    with torch.no_grad():
        assert torch.equal(loaded(x), out)


def test_aph_reconstruction_lowers_each_units_weighted_error_and_kl_on_the_head(small_vit, calib_images):
    qmodel = prepare(small_vit)
    calib = _calib(calib_images)
    get_method("repq-vit")().fit(qmodel, calib, W4A4, progress=False)
    opts = APHQOptions(iters=30, batch_size=16, act_lr=1e-3).reconstruction(30, 16, 0)
    results = reconstruct_blocks(qmodel, calib, opts, progress=False, teacher=float_teacher(qmodel, small_vit))
    assert [r.objective for r in results.values()] == ["aph"] * 3 + ["kl"]
    for name, r in results.items():
        assert r.loss_after <= r.loss_before, name  # never left worse (the put-back rule)
    # the blocks really learned under the weighted loss (measured: blocks.0 −4.5 %, blocks.1 −37 %; a random
    # ViT's first block mostly passes on the patch embedding's error through its residual)
    assert results["blocks.0"].loss_after < 0.99 * results["blocks.0"].loss_before
    assert results["blocks.1"].loss_after < 0.8 * results["blocks.1"].loss_before


def test_reconstruction_improves_on_calibration_alone(small_vit, calib_images):
    calib = _calib(calib_images)

    def err(q):
        with torch.no_grad():
            return (q(calib_images) - small_vit(calib_images)).pow(2).mean().item()

    assert err(_quantize(small_vit, calib, "w3a3", iters=40)) < err(_quantize(small_vit, calib, "w3a3", iters=0))


def test_options_and_schedules():
    assert APHQOptions().schedule_for(17 * 192, torch.device("cpu")) == SCHEDULES["reference"]
    assert APHQOptions().schedule_for(197 * 384, torch.device("cpu")) == SCHEDULES["cpu"]
    assert APHQOptions().schedule_for(197 * 384, torch.device("cuda")) == SCHEDULES["reference"]
    assert APHQOptions(schedule="paper").schedule_for(0, torch.device("cpu")) == (20000, 32)
    assert APHQOptions(iters=7, batch_size=3).schedule_for(0, torch.device("cpu")) == (7, 3)
    opts = APHQOptions(objective="mse").reconstruction(5, 8, 1)
    assert opts.qdrop == 0.5 and opts.weights == "adaround" and opts.learn_act_scales and opts.head_objective == "kl"
    for bad in ({"probe": "diag"}, {"rel_eps": 0}, {"schedule": "fast"}, {"qdrop": 1.0}, {"iters": -1}):
        with pytest.raises(VitquantError):
            get_method("aphq-vit").validate_options(bad)
