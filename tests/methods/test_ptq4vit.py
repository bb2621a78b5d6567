"""PTQ4ViT end to end on a tiny random ViT, its quantizer layout, the captured Hessian-metric
gradients (checked against autograd), the grid search, and save/load."""
import pytest
import torch
import torch.nn.functional as F

import vitquant
from vitquant import QuantConfig
from vitquant.calibration import CalibrationSet
from vitquant.errors import VitquantError
from vitquant.methods import grid_search
from vitquant.calibration.capture import capture, pseudo_label_loss
from vitquant.methods.ptq4vit import full_range_symmetric, symmetric_fake_quant
from vitquant.models import prepare

FAST = {"candidates": 11}  # the search is exercised; the paper's 101 only refines the grid


def _calib(x):
    return CalibrationSet(images=x, source="random", skipped=[])


def _quantize(model, images, bits="w4a4", **options):
    config = QuantConfig.preset(bits, method="ptq4vit", options={**FAST, **options})
    return vitquant.quantize(model, config, _calib(images), progress=False)


def test_end_to_end_quality(tiny_vit, calib_images, sqnr):
    x = torch.randn(16, 1, 28, 28, generator=torch.Generator().manual_seed(5))
    ref = tiny_vit(x).detach()
    with torch.no_grad():
        s8 = sqnr(ref, _quantize(tiny_vit, calib_images, "w8a8")(x))
        s4 = sqnr(ref, _quantize(tiny_vit, calib_images, "w4a4", metric="mse")(x))
    assert s8 > 25 and s4 > 5 and s8 > s4 + 10


def test_quantizer_layout(tiny_vit, calib_images):
    q = _quantize(tiny_vit, calib_images)
    sites = q.act_sites()
    assert sites["blocks.0.attn.softmax"].quantizer.kind == "twin_uniform_softmax"
    assert sites["blocks.0.mlp.fc2.input"].quantizer.kind == "twin_uniform_gelu"
    assert not sites["patch_embed.proj.input"].enabled  # PTQ4ViT keeps the image in float
    for name in ("blocks.0.attn.q", "blocks.1.mlp.fc1.input", "head.input"):
        quant = sites[name].quantizer
        assert quant.channel_axis is None and float(quant.zero_point) == 8  # full signed grid [-8, 7]
    qkv = q.submodule("blocks.0.attn.qkv").weight_quantizer.scale
    thirds = qkv.reshape(3, -1)
    assert qkv.numel() == 3 * 64 and torch.all(thirds == thirds[:, :1])  # one scale each for q, k, v
    assert q.submodule("blocks.0.attn.proj").weight_quantizer.scale.numel() == 1  # per tensor
    assert q.submodule("patch_embed.proj").weight_quantizer.scale.numel() == 64  # per output channel


def test_options(tiny_vit, calib_images):
    q = _quantize(tiny_vit, calib_images, quantize_image=True, matmul_per_head=True, rounds=1, metric="mse")
    image = q.act_sites()["patch_embed.proj.input"]
    assert image.enabled and image.quantizer.bits == 8  # config.patch_embed_input_bits
    k = q.act_sites()["blocks.1.attn.k"].quantizer
    assert k.channel_axis == 1 and k.scale.numel() == 2  # one scale per head
    with pytest.raises(VitquantError, match="metric"):
        QuantConfig(method="ptq4vit", options={"metric": "kl"})


def test_deployable_uses_plain_grids(tiny_vit, calib_images):
    """Twin grids have no exact QDQ form: deployable=True searches the paper's no-twin ablation."""
    config = QuantConfig.preset("w8a8", method="ptq4vit", deployable=True, options={**FAST, "rounds": 1})
    q = vitquant.quantize(tiny_vit, config, _calib(calib_images), progress=False)
    kinds = {site.quantizer.kind for site in q.act_sites().values() if site.enabled}
    assert kinds == {"uniform"} and q.stats["deployable_stand_ins"] == []


def test_save_load_round_trip(tiny_vit, calib_images, tmp_path):
    q = _quantize(tiny_vit, calib_images, rounds=1)
    vitquant.save(q, tmp_path / "q")
    back = vitquant.load(tmp_path / "q", model=tiny_vit)
    x = torch.randn(4, 1, 28, 28)
    with torch.no_grad():
        assert torch.equal(back(x), q(x))
    assert back.act_sites()["blocks.1.attn.softmax"].quantizer.split == q.act_sites()["blocks.1.attn.softmax"].quantizer.split


def test_captured_gradients_match_autograd(tiny_vit, calib_images):
    """∂L/∂O at the head, at Q·Kᵀ and at probs·V, checked through the chain rule against the
    gradients autograd gives at the matmul operands (∂L/∂q = G₁·k, ∂L/∂k = G₁ᵀ·q, ∂L/∂v = Pᵀ·G₂)."""
    p = prepare(tiny_vit)
    core = p.structure.core("blocks.1.attn")
    x = calib_images[:4]
    layers, cores = capture(p, [p.submodule("head")], [core], [x], with_grad=True)
    logits = tiny_vit(x).double()
    expected = torch.softmax(logits, -1) - F.one_hot(logits.argmax(-1), 10)
    assert torch.allclose(layers["head"].grad.double(), expected, atol=1e-6)

    class GradTap:  # an observer that keeps the gradient at what its site sees
        def __init__(self):
            self.grads = []

        def update(self, t):
            t.register_hook(self.grads.append)

    sites = p.core_sites(core)
    taps = {s: GradTap() for s in ("q", "k", "v")}
    for s, tap in taps.items():
        sites[s].observer = tap
    with p.bypassed(), torch.enable_grad():
        pseudo_label_loss(p(x.clone().requires_grad_(True))).backward()
    gq, gk, gv = (taps[s].grads[0] for s in ("q", "k", "v"))
    cap = cores["blocks.1.attn"]
    assert torch.allclose(cap.grad_scores @ cap.kt.transpose(-2, -1), gq, atol=1e-6)
    assert torch.allclose(cap.grad_scores.transpose(-2, -1) @ cap.q, gk, atol=1e-6)
    assert torch.allclose(cap.probs.transpose(-2, -1) @ cap.grad_context, gv, atol=1e-6)
    assert all(w.requires_grad for w in p.parameters())  # capture restores the parameters


def test_official_kl_gradient_vanishes_where_pseudo_label_ce_does_not(tiny_vit, calib_images):
    """PTQ4ViT issue #23: the code's KL(p_FP ‖ p) is taken at p = p_FP, so ∂L/∂z = 0."""
    z = tiny_vit(calib_images).detach().double().requires_grad_(True)
    kl = F.kl_div(F.log_softmax(z, -1), F.softmax(z, -1).detach(), reduction="batchmean")
    (g_kl,) = torch.autograd.grad(kl, z)
    (g_ce,) = torch.autograd.grad(pseudo_label_loss(z), z)
    assert g_kl.abs().max() < 1e-12 and g_ce.abs().max() > 1e-3


def test_full_range_quantizer_matches_search_math():
    x = torch.randn(1000) * 3
    for bits in (3, 4, 8):
        s = torch.tensor(0.37)
        q = full_range_symmetric(bits, s, None, "x")
        assert torch.equal(q.fake_quant(x), symmetric_fake_quant(x, s, bits))
        assert q.fake_quant(torch.tensor([-1e3])).item() == pytest.approx(-(2 ** (bits - 1)) * 0.37)


def test_grid_argmin_chunking_matches_brute_force(monkeypatch):
    g = torch.Generator().manual_seed(0)
    data = torch.randn(50, 3, generator=g)
    cands = torch.rand(17, 3, generator=g) * 2
    err = lambda c, items: (data[items][None] - c[:, None]).pow(2).sum(dim=1)  # noqa: E731
    brute = cands.gather(0, err(cands, slice(None)).argmin(0)[None])[0]
    monkeypatch.setattr(grid_search, "CHUNK_FLOATS", 7)  # forces candidate and item chunks
    assert torch.equal(grid_search.grid_argmin(cands, 50, 1, err), brute)
