"""NoisyQuant end to end on a tiny random ViT: layout, clip search, exact bias folding, save/load."""
import pytest
import torch
import torch.nn.functional as F

import vitquant
from vitquant import QuantConfig
from vitquant.calibration import CalibrationSet
from vitquant.errors import VitquantError
from vitquant.calibration.capture import capture
from vitquant.methods.noisyquant import fold_noisy_bias, symmetric_narrow
from vitquant.models import prepare
from vitquant.quantizers import NoisyBiasQuantizer, UniformQuantizer

NOISY = ("attn.qkv", "attn.proj", "mlp.fc1", "mlp.fc2")


def _calib(x):
    return CalibrationSet(images=x, source="random", skipped=[])


def _quantize(model, images, bits="w4a4", seed=0, **options):
    options = {"clip_steps": 25, **options}  # the search is exercised; a finer grid only refines it
    config = QuantConfig.preset(bits, method="noisyquant", seed=seed, options=options)
    return vitquant.quantize(model, config, _calib(images), progress=False)


def test_end_to_end_quality(tiny_vit, calib_images, sqnr):
    x = torch.randn(16, 1, 28, 28, generator=torch.Generator().manual_seed(5))
    ref = tiny_vit(x).detach()
    with torch.no_grad():
        s8, s4 = sqnr(ref, _quantize(tiny_vit, calib_images, "w8a8")(x)), sqnr(ref, _quantize(tiny_vit, calib_images)(x))
    assert s8 > 25 and s4 > 5 and s8 > s4 + 10


def test_layout_and_noise_range(tiny_vit, calib_images):
    q = _quantize(tiny_vit, calib_images)
    sites = q.act_sites()
    for block in (0, 1):
        for layer in NOISY:
            quant = sites[f"blocks.{block}.{layer}.input"].quantizer
            assert isinstance(quant, NoisyBiasQuantizer) and quant.base.symmetric
            assert quant.noise.abs().max() <= float(quant.base.scale) / 2  # N ~ U(−Δ/2, Δ/2)
    assert type(sites["head.input"].quantizer) is UniformQuantizer  # the head gets no noisy bias
    assert type(sites["blocks.0.attn.softmax"].quantizer) is UniformQuantizer  # standard protocol
    assert sites["patch_embed.proj.input"].quantizer.bits == 8
    fc1 = q.submodule("blocks.0.mlp.fc1").weight_quantizer
    assert fc1.symmetric and fc1.channel_axis == 0
    ablation = _quantize(tiny_vit, calib_images, noise="none")
    assert type(ablation.act_sites()["blocks.0.mlp.fc1.input"].quantizer) is UniformQuantizer
    paper = _quantize(tiny_vit, calib_images, matmuls="float")
    assert not any(paper.act_sites()[f"blocks.0.attn.{s}"].enabled for s in ("q", "k", "v", "softmax"))


def test_seed_fixes_the_noise(tiny_vit, calib_images):
    noise = lambda q: q.act_sites()["blocks.0.mlp.fc2.input"].quantizer.noise  # noqa: E731
    a, b = _quantize(tiny_vit, calib_images), _quantize(tiny_vit, calib_images)
    c = _quantize(tiny_vit, calib_images, seed=1)
    assert torch.equal(noise(a), noise(b)) and not torch.equal(noise(a), noise(c))


def test_clip_search_is_no_worse_than_absmax(tiny_vit, calib_images):
    q = _quantize(tiny_vit, calib_images, matmuls="float")
    layer = q.submodule("blocks.1.mlp.fc2")
    p = prepare(tiny_vit)
    x = capture(p, [p.submodule("blocks.1.mlp.fc2")], [], [calib_images], with_grad=False)[0]["blocks.1.mlp.fc2"].x
    w = tiny_vit.blocks[1].mlp.fc2.weight.detach()
    ref = F.linear(x, w, tiny_vit.blocks[1].mlp.fc2.bias)
    err = lambda step: (F.linear(symmetric_narrow(x, step, 4), layer.weight, layer.bias) - ref).pow(2).mean()  # noqa: E731
    chosen = float(layer.input_site.quantizer.base.scale)
    assert err(chosen) <= err(float(x.abs().max()) / 7) + 1e-9
    assert chosen < float(x.abs().max()) / 7  # it clipped


def test_folding_noisy_bias_is_exact(tiny_vit, calib_images):
    q = _quantize(tiny_vit, calib_images)
    x = torch.randn(8, 1, 28, 28)
    with torch.no_grad():
        before = q(x)
        for layer in q.weight_layers().values():
            if isinstance(layer.input_site.quantizer, NoisyBiasQuantizer):
                fold_noisy_bias(layer)
        after = q(x)
    assert torch.allclose(before, after, atol=1e-5, rtol=0)
    assert not q.act_sites()["blocks.0.attn.qkv.input"].quantizer.denoise
    with pytest.raises(VitquantError, match="already folded"):
        fold_noisy_bias(q.submodule("blocks.0.attn.qkv"))
    with pytest.raises(VitquantError, match="no noisy-bias"):
        fold_noisy_bias(q.submodule("head"))


@pytest.mark.parametrize("fold", [False, True])
def test_save_load_round_trip(tiny_vit, calib_images, tmp_path, fold):
    q = _quantize(tiny_vit, calib_images, noise="code", mean_steps=4, range_steps=8)
    if fold:
        fold_noisy_bias(q.submodule("blocks.1.mlp.fc1"))
    vitquant.save(q, tmp_path / "q")
    back = vitquant.load(tmp_path / "q", model=tiny_vit)
    x = torch.randn(4, 1, 28, 28)
    with torch.no_grad():
        assert torch.equal(back(x), q(x))


def test_deployable_refuses_noisy_bias(tiny_vit, calib_images):
    with pytest.raises(VitquantError, match="noise"):
        vitquant.quantize(tiny_vit, QuantConfig.preset("w8a8", method="noisyquant", deployable=True),
                          _calib(calib_images), progress=False)


def test_invalid_options_are_refused():
    with pytest.raises(VitquantError, match="noise"):
        QuantConfig(method="noisyquant", options={"noise": "gaussian"})
    with pytest.raises(VitquantError, match="matmuls"):
        QuantConfig(method="noisyquant", options={"matmuls": "log2"})
