"""The architecture contract: every supported family (vitquant.models.zoo, tiny random instances) is
traced completely, computes the float function when bypassed, has only exact scale mappings, runs every
registered method or refuses it with a VitquantError, and saves/loads to identical outputs.

Adding an architecture = adding a zoo entry and making this file pass.
"""
import copy

import pytest
import torch

import vitquant
from vitquant import QuantConfig, VitquantError
from vitquant.calibration import CalibrationSet
from vitquant.methods import available_methods
from vitquant.models import prepare
from vitquant.models.fold import fold_channel_affine
from vitquant.models.io import logits_of
from vitquant.models.mappings import bypass_all
from vitquant.models.zoo import FAMILIES, TINY

NAMES = [f.name for f in FAMILIES]
# cheap options: the contract is "runs or refuses", quality is tested per method elsewhere
CHEAP = {"ptq4vit": {"candidates": 5, "rounds": 1}, "adalog": {"candidates": 8, "rounds": 1},
         "noisyquant": {"clip_steps": 10}, "ias-vit": {"iters": 2, "batch_size": 4},
         "erq": {"max_flips": 2}, "aphq-vit": {"iters": 1, "batch_size": 4},
         "fima-q": {"iters": 2, "batch_size": 4, "rank": 2}}  # 2: a refresh
_CACHE: dict[str, tuple] = {}
# The refusals we know and accept, with what the one-line reason must say; any other refusal fails, and so does
# a listed one that stops happening (update the list). FQ-ViT's attention-score site needs the attention to
# be an F.scaled_dot_product_attention call.
_EAGER = "computes attention with explicit matmuls"
EXPECTED_REFUSALS = {(family, "fq-vit"): _EAGER for family in (
    "timm CaiT", "timm XCiT", "timm CrossViT", "timm ConViT", "timm TNT", "timm Swin", "timm Swin v2",
    "timm Swin v2-CR", "timm MViT v2", "torchvision swin_t")}


def _built(name: str):
    """(float model, prepared model, example batch), built once per family."""
    if name not in _CACHE:
        fam = next(f for f in FAMILIES if f.name == name)
        torch.manual_seed(0)
        model = fam.build(TINY)
        q = prepare(model, unknown="float")
        x = torch.randn(4, *q.structure.input_shape, generator=torch.Generator().manual_seed(1))
        _CACHE[name] = (model, q, x)
    return _CACHE[name]


@pytest.mark.parametrize("name", NAMES)
def test_structure_is_complete(name):
    model, q, _ = _built(name)
    s = q.structure
    assert s.layers and s.cores and s.units, "a ViT has weight layers, attention cores and units"
    assert set(q.act_sites()) == set(s.sites), "every site was reached by the traced forward"
    for layer in s.layers:  # every quantized layer's input is a site with a derived role
        assert s.sites[f"{layer}.input"].role
    for core in s.cores:
        assert {s.role(core.q), s.role(core.k)} == {"qk"} and s.role(core.v) == "v"
    assert [l for u in s.units for l in u.layers] == s.layers, "units partition the layers in forward order"
    assert s.heads, "a classifier's head is found from the output"
    assert not [op for op in s.float_ops if "not understand" in op or "belongs to no" in op]


@pytest.mark.parametrize("name", NAMES)
def test_bypassed_model_is_the_float_model(name):
    model, q, x = _built(name)
    with torch.no_grad(), q.bypassed():
        ref, out = logits_of(model(x)), logits_of(q(x))
    if q.structure.rewrites or any(type(m).__name__ == "QuantMultiheadAttention" for m in q.modules()):
        # folded BatchNorms round differently; nn.MultiheadAttention's own kernel orders its sums differently
        assert torch.allclose(out, ref, rtol=1e-5, atol=1e-6)
    else:
        assert torch.equal(out, ref)


@pytest.mark.parametrize("name", NAMES)
def test_mappings_are_function_preserving(name):
    """Fold a random per-channel affine map through every mapping at once, in float64: same output."""
    _, q, x = _built(name)
    probe = copy.deepcopy(q.model).double()
    bypass_all(probe)
    gen = torch.Generator().manual_seed(7)
    with torch.no_grad():
        ref = logits_of(probe(x.double()))
        for m in q.structure.mappings:
            norm = probe.get_submodule(m.norm)
            c = norm.weight.numel()
            r = torch.exp(torch.rand(c, generator=gen, dtype=torch.float64) - 0.5)
            fold_channel_affine(norm, [probe.get_submodule(n) for n in m.layers], r,
                                torch.randn(c, generator=gen, dtype=torch.float64))
        out = logits_of(probe(x.double()))
    assert float((out - ref).norm() / ref.norm()) < 1e-9


# `best` runs one of the other methods (tests/methods/test_best.py), each of which is here
@pytest.mark.parametrize("method", sorted(set(available_methods()) - {"best"}))
@pytest.mark.parametrize("name", NAMES)
def test_every_method_runs_or_refuses(name, method):
    model, q, x = _built(name)
    calib = CalibrationSet(torch.randn(8, *q.structure.input_shape, generator=torch.Generator().manual_seed(2)),
                           "random", [])
    config = QuantConfig.preset("w4a4", method=method, options=CHEAP.get(method, {}), calib_size=8,
                                unknown_layers="float")
    expected = EXPECTED_REFUSALS.get((name, method))
    try:
        qm = vitquant.quantize(model, config, calib, progress=False)
    except VitquantError as e:
        assert str(e) and "\n" not in str(e)  # a one-line refusal naming the structure
        assert expected is not None, f"unexpected refusal: {e}"
        assert expected in str(e)
        return
    assert expected is None, f"{method} was expected to refuse {name} ({expected}) and ran"
    with torch.no_grad():
        out = logits_of(qm(x))
    assert torch.isfinite(out).all()
    for site_name, site in qm.act_sites().items():
        assert not site.enabled or site.quantizer is not None, site_name


@pytest.mark.parametrize("name", NAMES)
def test_save_load_gives_identical_outputs(name, tmp_path):
    model, q, x = _built(name)
    calib = CalibrationSet(torch.randn(8, *q.structure.input_shape), "random", [])
    qm = vitquant.quantize(model, QuantConfig.preset("w8a8", method="minmax", calib_size=8, unknown_layers="float"),
                           calib, progress=False)
    vitquant.save(qm, tmp_path / "q")
    back = vitquant.load(tmp_path / "q", model=model)
    with torch.no_grad():
        assert torch.equal(logits_of(back(x)), logits_of(qm(x)))
