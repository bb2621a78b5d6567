"""`vitquant.analyze` against a known ground truth: the bundled 6-block ViT's outlier-stress variant,
whose injected channels (×30 in every norm → layers mapping) are the only thing that makes it hard."""
import json
import math

import pytest
import torch

import vitquant
from vitquant.analysis.analyzer import analyze
from vitquant.analysis.calibrated import calibrate_unfrozen, logits
from vitquant.analysis.stats import StreamStats, sqnr_db
from vitquant.bench import STRESS
from vitquant.calibration.data import data_config_for, load_calibration
from vitquant.config import QuantConfig
from vitquant.models import prepare
from vitquant.models.outliers import inject_ln_outliers


@pytest.fixture(scope="module")
def models():
    natural = vitquant.load_model("bundled")
    return natural, inject_ln_outliers(natural, **STRESS)


@pytest.fixture(scope="module")
def calib(models):
    return load_calibration("bundled", data_config_for(models[1]), n=32, seed=0)


@pytest.fixture(scope="module")
def minmax_analysis(models, calib):
    return analyze(models[1], QuantConfig.preset("w4a4", method="minmax"), calib, name="bundled stress")


def _consumers(model):
    """The injected ground truth: the input sites of every layer fed by a norm with outlier channels."""
    s = prepare(model).structure
    return {s.layer_input(layer) for m in s.mappings for layer in m.layers}, s.mappings


def test_offenders_are_the_injected_outlier_consumers(models, minmax_analysis):
    consumers, mappings = _consumers(models[1])
    assert len(consumers) == 13  # 6 blocks × (qkv, fc1) + head
    ranked = minmax_analysis.offenders
    # min-max per-tensor 4-bit grids: every stressed input is broken; the first 8 offenders are all of them
    assert set(ranked[:8]) <= consumers, ranked[:8]
    assert len(consumers & set(ranked[:14])) >= 12  # nearly all 13 among the first 14 of 76 points
    # and the analyzer names the very channels: its top-6 channels of each consumer are the injected ones
    natural, stress = models
    for m in mappings:
        ratio = stress.get_submodule(m.norm).weight / natural.get_submodule(m.norm).weight
        injected = set((ratio.abs() > 10).nonzero().flatten().tolist())
        assert len(injected) == STRESS["n_channels"]
        for layer in m.layers:
            site = minmax_analysis.points[f"{layer}.input"]
            assert set(site["top_channels"]) == injected, layer
            assert site["channel_spread"] > 10


def test_repq_vit_offender_is_the_head_input(models, calib):
    """RepQ-ViT's published recipe reparameterizes the post-LN inputs of qkv and fc1 but not the head's
    (reparam_head=false; the default "auto" would reparameterize it on this model):
    the analyzer must point at the head input, the one stressed consumer left, and nothing else close."""
    few = load_calibration("bundled", data_config_for(models[1]), n=12, seed=1, min_images=8)  # cheaper
    a = analyze(models[1], QuantConfig.preset("w4a4", method="repq-vit", calib_size=12, seed=1,
                                                         options={"reparam_head": False}), few)
    assert a.offenders[0] == "head.input"
    top, second = (a.points[p]["kl"] for p in a.offenders[:2])
    assert top > 50 * second


def test_every_point_has_every_number(minmax_analysis):
    a = minmax_analysis
    text = json.dumps(a.to_dict(), allow_nan=False)  # strict JSON: no NaN/inf
    back = json.loads(text)
    structure = prepare(vitquant.load_model("bundled")).structure
    assert len(back["points"]) == len(structure.sites) + len(structure.layers)  # every site and weight
    assert set(back["points"]) == set(a.points)
    for p, r in a.points.items():
        for key in ("kind", "bits", "kl", "fisher", "sqnr_isolated_db", "sqnr_context_db", "relevance", "min", "max"):
            assert key in r, (p, key)
        assert r["kl"] >= 0 and r["fisher"] >= 0
    assert set(a.layers) == set(structure.layers)
    for layer, r in a.layers.items():
        assert r["kl"] == pytest.approx((a.points[f"{layer}.input"]["kl"] or 0) + a.points[f"{layer}.weight"]["kl"])
    assert a.overall["agreement"] < 50  # the fully quantized stress model is broken, and the report says so


def test_fisher_proxy_tracks_the_measured_loss(minmax_analysis):
    """The diagonal-Fisher estimate and the measured KL rank the 76 points alike (Spearman ρ > 0.7;
    0.89 when written)."""
    pts = list(minmax_analysis.points)
    kl = torch.tensor([minmax_analysis.points[p]["kl"] for p in pts])
    fisher = torch.tensor([minmax_analysis.points[p]["fisher"] for p in pts])
    rk, rf = kl.argsort().argsort().double(), fisher.argsort().argsort().double()
    rho = torch.corrcoef(torch.stack([rk, rf]))[0, 1].item()
    assert rho > 0.7


def test_relevance_is_a_share_per_kind(minmax_analysis):
    for kind in ("act", "weight"):
        total = sum(r["relevance"] for r in minmax_analysis.points.values() if r["kind"] == kind)
        assert total == pytest.approx(1.0, abs=1e-6)


def test_unfrozen_calibration_is_what_quantize_computes(models, calib):
    """The analysis switches quantizers of a model calibrated like vitquant.quantize, left unfrozen: all on,
    it computes what quantize's model does; all off, the float model; one on, something in between."""
    model = models[0]
    config = QuantConfig.preset("w4a4", method="repq-vit")
    cal = calibrate_unfrozen(model, config, calib)
    q = vitquant.quantize(model, config, calib, progress=False)
    x = calib.images[:16]
    torch.testing.assert_close(logits(cal.qmodel, x), logits(q, x), rtol=1e-4, atol=1e-4)
    with cal.only([]):
        torch.testing.assert_close(logits(cal.qmodel, x), logits(model, x), rtol=1e-4, atol=1e-4)
    with cal.all_but(cal.quantized_points()):
        torch.testing.assert_close(logits(cal.qmodel, x), logits(model, x), rtol=1e-4, atol=1e-4)
    with cal.only(["head.input"]):
        one = logits(cal.qmodel, x)
    assert not torch.allclose(one, logits(model, x)) and not torch.allclose(one, logits(q, x))
    with pytest.raises(KeyError):
        with cal.only(["no.such.site"]):
            pass


def test_stream_stats_on_a_known_tensor():
    x = torch.ones(4, 5, 8)
    x[..., 3] = 20.0  # one outlier channel
    st = StreamStats(channel_axis=-1)
    st.update(x)
    st.update(x * 0.5)
    s = st.summary()
    assert s["channel_spread"] == pytest.approx(20.0)
    assert s["top_channels"][0] == 3 and s["min"] == 0.5 and s["max"] == 20.0
    h = st.histogram(bins=10)
    assert sum(h["counts"]) == st.values().numel() and len(h["edges"]) == 11
    assert sqnr_db(1.0, 0.0) == math.inf and sqnr_db(100.0, 1.0) == pytest.approx(20.0)
