"""SULQ (I&S-ViT's shift-uniform-log2 quantizer) against hand-computed values."""
import math

import pytest
import torch

from vitquant.errors import UncalibratedError
from vitquant.quantizers import quantizer_from_spec
from vitquant.quantizers.sulq import ShiftUniformLog2Quantizer


def _fitted(bits, eta, lo=0.0, hi=1.0):
    return ShiftUniformLog2Quantizer(bits, etas=(eta,)).fit(torch.tensor([lo, hi]))


def test_three_bit_hand_computed_including_zero_and_one():
    q = _fitted(3, 0.01)
    # log domain: y = -log2(x + 0.01) in [-log2(1.01), -log2(0.01)] = [-0.014355, 6.643856]
    # s = 6.658211 / 7 = 0.951173, z = round(0.014355 / s) = 0
    assert float(q.scale) == pytest.approx((math.log2(1.01) - math.log2(0.01)) / 7)
    assert float(q.zero_point) == 0.0
    # x = 0:    y = 6.6439, y/s = 6.985 -> code 7, s·7 = 6.658 -> 2^-7 - 0.01 = -0.0021875 (the paper does not clamp)
    # x = 0.03: y = 4.6439 -> 4.882 -> 5, s·5 = 4.756 -> 2^-5 - 0.01 = 0.02125
    # x = 0.25: y = 1.9434 -> 2.043 -> 2, s·2 = 1.902 -> 2^-2 - 0.01 = 0.24
    # x = 0.5:  y = 0.9714 -> 1.021 -> 1, s·1 = 0.951 -> 2^-1 - 0.01 = 0.49
    # x = 1.0:  y = -0.0144 -> -0.015 -> 0, 0 -> 2^0 - 0.01 = 0.99
    x = torch.tensor([0.0, 0.03, 0.25, 0.5, 1.0])
    assert q.quantize(x).tolist() == [7, 5, 2, 1, 0]
    assert q.fake_quant(x).tolist() == pytest.approx([2**-7 - 0.01, 2**-5 - 0.01, 0.24, 0.49, 0.99], abs=1e-7)


def test_two_bit_large_shift_hand_computed():
    q = _fitted(2, 0.5)
    # y in [-log2(1.5), -log2(0.5)] = [-0.584963, 1]; s = 1.584963/3 = 0.528321; z = round(1.10721) = 1
    assert float(q.scale) == pytest.approx((1 + math.log2(1.5)) / 3)
    assert float(q.zero_point) == 1.0
    # x = 0: 1/s = 1.893 -> 2, +1 = 3 -> s·2 = 1.057 -> round 1 -> 2^-1 - 0.5 = 0
    # x = 1: -1.107 -> -1, +1 = 0 -> s·(-1) = -0.528 -> round -1 -> 2^1 - 0.5 = 1.5 (coarse: why η is searched)
    x = torch.tensor([0.0, 1.0])
    assert q.quantize(x).tolist() == [3, 0]
    assert q.fake_quant(x).tolist() == [0.0, 1.5]


def test_eta_is_the_mse_best_candidate():
    torch.manual_seed(0)
    x = torch.softmax(torch.randn(256, 17) * 3, dim=-1)
    etas = (0.001, 0.01, 0.1, 1.0)
    q = ShiftUniformLog2Quantizer(4, etas=etas).fit(x)
    errs = [(_single(x, e).fake_quant(x) - x).pow(2).mean().item() for e in etas]
    assert float(q.eta) == pytest.approx(etas[errs.index(min(errs))])
    assert float(q.eta) != 1.0  # η = 1 is far too coarse for softmax values


def _single(x, eta):
    return ShiftUniformLog2Quantizer(4, etas=(eta,)).fit(x)


def test_fit_uses_the_exact_stream_extremes():
    """An observer gives a sample plus exact min/max: the log-domain range must come from those."""
    sample = torch.tensor([0.1, 0.2, 0.4])
    q = ShiftUniformLog2Quantizer(3, etas=(0.01,)).fit(sample, None, torch.tensor(0.0), torch.tensor(1.0))
    assert float(q.scale) == pytest.approx(float(_fitted(3, 0.01).scale))


def test_straight_through_gradient():
    """round_ste in both roundings: dx̂/dx = 2^(-round(D))·ln2 · 1/((x+η)·ln2) = (x̂ + η)/(x + η)."""
    q = _fitted(3, 0.01)
    x = torch.tensor([0.03, 0.25, 0.5], requires_grad=True)
    y = q(x)
    y.sum().backward()
    assert torch.allclose(x.grad, (y.detach() + 0.01) / (x.detach() + 0.01))


def test_spec_round_trip_and_uncalibrated_raises():
    with pytest.raises(UncalibratedError):
        ShiftUniformLog2Quantizer(4)(torch.rand(3))
    q = ShiftUniformLog2Quantizer(4).fit(torch.softmax(torch.randn(64, 17), dim=-1))
    r = quantizer_from_spec(q.spec())
    x = torch.rand(100)
    assert isinstance(r, ShiftUniformLog2Quantizer) and torch.equal(r.fake_quant(x), q.fake_quant(x))
    assert quantizer_from_spec(ShiftUniformLog2Quantizer(4).spec()).calibrated is False
    with pytest.raises(ValueError):
        ShiftUniformLog2Quantizer(4, etas=(0.0,))
