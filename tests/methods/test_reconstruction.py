"""Block reconstruction (BRECQ/QDrop with AdaRound and learned activation scales) on a tiny ViT."""
import pytest
import torch

import vitquant
from vitquant import QuantConfig
from vitquant.calibration import CalibrationSet
from vitquant.errors import VitquantError
from vitquant.methods import get_method
from vitquant.methods.reconstruction import ReconstructionOptions, reconstruct_blocks, reconstruction_units
from vitquant.methods.steps import freeze
from vitquant.models import prepare
from vitquant.models.io import logits_of
from vitquant.models.zoo import FAMILIES, TINY

W4A4 = QuantConfig.preset("w4a4", method="repq-vit")


@pytest.fixture
def calibrated(tiny_vit_factory, calib_images):
    """A tiny ViT calibrated by RepQ-ViT (plain calibration), not yet frozen."""
    model = tiny_vit_factory(depth=2, embed_dim=32)
    qmodel = prepare(model)
    calib = CalibrationSet(calib_images, "random", [])
    get_method("repq-vit")().fit(qmodel, calib, W4A4, progress=False)
    return model, qmodel, calib


def test_units_in_forward_order(calibrated):
    _, qmodel, calib = calibrated
    assert reconstruction_units(qmodel) == ["patch_embed.proj", "blocks.0", "blocks.1", "head"]


def _block_output_mse(model, qmodel, x):
    """MSE of each block's output in the full quantized forward against the float model's."""
    outs = {}
    hooks = [b.register_forward_hook(lambda m, a, o, k=("f", i): outs.__setitem__(k, o)) for i, b in enumerate(model.blocks)]
    hooks += [b.register_forward_hook(lambda m, a, o, k=("q", i): outs.__setitem__(k, o))
              for i, b in enumerate(qmodel.model.blocks)]
    with torch.no_grad():
        model(x), qmodel(x)
    for h in hooks:
        h.remove()
    return [float((outs["f", i] - outs["q", i]).pow(2).mean()) for i in range(len(model.blocks))]


def test_reconstruction_lowers_block_output_error_vs_plain_calibration(calibrated):
    model, qmodel, calib = calibrated
    plain = _block_output_mse(model, qmodel, calib.images)
    fc2_quantizer = qmodel.submodule("blocks.0.mlp.fc2").input_site.quantizer
    fc2_scale = fc2_quantizer.scale.clone()
    opts = ReconstructionOptions(iters=40, batch_size=16, qdrop=0.5, adaround_lr=1e-2, act_lr=1e-3)
    results = reconstruct_blocks(qmodel, calib, opts, progress=False)
    for name in ("blocks.0", "blocks.1", "head"):
        assert results[name].mse_after < results[name].mse_before, name
    # a random ViT's blocks are near-identity residuals, so upstream error dominates: ~6-11 % less here
    for before, after in zip(plain, _block_output_mse(model, qmodel, calib.images)):
        assert after < 0.97 * before
    # the learned activation scale was written back into the real (saved) quantizer
    assert qmodel.submodule("blocks.0.mlp.fc2").input_site.quantizer is fc2_quantizer
    assert not torch.equal(fc2_quantizer.scale, fc2_scale)


def test_hardened_weights_are_on_the_grid_and_reload_exactly(calibrated, tmp_path):
    model, qmodel, calib = calibrated
    reconstruct_blocks(qmodel, calib, ReconstructionOptions(iters=20, batch_size=16), progress=False)
    layer = qmodel.submodule("blocks.0.mlp.fc1")
    hardened = layer.weight.detach().clone()
    layer.freeze_weight()
    assert torch.equal(layer.weight, hardened)  # freeze_weight gives the reconstructed weights
    freeze(qmodel)
    qmodel.config = W4A4
    vitquant.save(qmodel, tmp_path / "q")
    loaded = vitquant.load(tmp_path / "q", model=model)
    x = torch.randn(4, 1, 28, 28)
    with torch.no_grad():
        assert torch.equal(loaded(x), qmodel(x))


def test_float_and_ste_modes_train_weights_and_restore_state(calibrated):
    _, qmodel, calib = calibrated
    w0 = qmodel.submodule("blocks.1.attn.proj").weight.detach().clone()
    quantizers = {n: l.weight_quantizer for n, l in qmodel.weight_layers().items()}
    for mode in ("float", "ste"):
        reconstruct_blocks(qmodel, calib, ReconstructionOptions(iters=5, weights=mode, learn_act_scales=False),
                           progress=False)
    assert not torch.equal(qmodel.submodule("blocks.1.attn.proj").weight, w0)
    assert all(l.weight_quantizer is quantizers[n] and not l.bypass for n, l in qmodel.weight_layers().items())
    assert not any(p.requires_grad is False for p in qmodel.submodule("blocks.0").parameters())


def test_errors_name_the_problem(calibrated):
    _, qmodel, calib = calibrated
    with pytest.raises(VitquantError, match="weights must be one of"):
        ReconstructionOptions(weights="magic")
    with pytest.raises(VitquantError, match="qdrop"):
        ReconstructionOptions(qdrop=1.5)
    freeze(qmodel)
    with pytest.raises(VitquantError, match="unfrozen weight"):
        reconstruct_blocks(qmodel, calib, ReconstructionOptions(iters=1), progress=False)


def test_a_unit_is_never_left_worse_than_it_came_in():
    """Random-init BEiT's head has weights ~1e-3: Adam's lr-sized steps made that unit (and the logits)
    worse — logit cosine 0.9998 → 0.5 at W8A8. Reconstruction must keep such a unit as it was."""
    fam = next(f for f in FAMILIES if f.name == "timm BEiT")
    torch.manual_seed(0)
    model = fam.build(TINY)
    shape = (3, 32, 32)
    x0 = torch.randn(8, *shape, generator=torch.Generator().manual_seed(0))
    x1 = torch.randn(8, *shape, generator=torch.Generator().manual_seed(1))
    q = vitquant.quantize(model, QuantConfig.preset("w8a8", method="ias-vit", options={"iters": 20}, calib_size=8,
                                                    unknown_layers="float"), CalibrationSet(x0, "random", []),
                          progress=False)
    with torch.no_grad():
        ref, out = logits_of(model(x1)).flatten().double(), logits_of(q(x1)).flatten().double()
    assert torch.nn.functional.cosine_similarity(ref, out, dim=0) > 0.99


def test_float_teacher_shares_the_original_weights_and_leaves_them_alone(tiny_vit_factory, calib_images):
    from vitquant.methods.reconstruction import float_teacher

    model = tiny_vit_factory(depth=2, embed_dim=32)
    qmodel = prepare(model)
    with torch.no_grad():
        qmodel.model.blocks[1].mlp.fc2.weight.mul_(2)  # a weight the prepared model no longer shares in value
    teacher = float_teacher(qmodel, model)
    original = dict(model.named_parameters())
    shared = {n for n, p in teacher.model.named_parameters() if p.data_ptr() == original[n].data_ptr()}
    assert shared == set(original) - {"blocks.1.mlp.fc2.weight"}  # that one is copied, as it is in qmodel
    assert torch.equal(teacher.model.blocks[1].mlp.fc2.weight, qmodel.model.blocks[1].mlp.fc2.weight)
    assert all(p.requires_grad for p in model.parameters())  # the user's flags are untouched
    assert not any(p.requires_grad for p in teacher.parameters())
    with torch.no_grad():  # training qmodel in place does not move the teacher
        qmodel.model.blocks[0].attn.qkv.weight.add_(1)
        with qmodel.bypassed():
            changed = qmodel(calib_images[:4])
        assert not torch.equal(teacher(calib_images[:4]), changed)
        assert torch.equal(teacher.model.blocks[0].attn.qkv.weight, model.blocks[0].attn.qkv.weight)
