"""Twin uniform quantizers (PTQ4ViT) against hand-computed values."""
import pytest
import torch
import torch.nn.functional as F

from vitquant.errors import UncalibratedError
from vitquant.quantizers import quantizer_from_spec
from vitquant.quantizers.twin_uniform import (GELU_MIN, TwinUniformGeluQuantizer, TwinUniformSoftmaxQuantizer,
                                              gelu_twin_fake_quant, softmax_twin_fake_quant)


def softmax_q(bits=3, split=0.25):
    q = TwinUniformSoftmaxQuantizer(bits)
    q.set_split(split)
    return q


def test_softmax_hand_computed_3bit():
    # k = 3: n = 2^(k-1) - 1 = 3; low range [0, 0.25) step 0.25/3; high range [0.25, 1] step 1/3
    q = softmax_q()
    x = torch.tensor([0.0, 0.1, 0.2, 0.24, 0.25, 0.45, 0.6, 0.9, 1.0])
    codes = torch.tensor([0, 1, 2, 3, 5, 5, 6, 7, 7])  # 0.1·12 = 1.2 → 1; 0.25·3 = 0.75 → 1 (+4 range bit)
    expected = torch.tensor([0, 1 / 12, 2 / 12, 0.25, 1 / 3, 1 / 3, 2 / 3, 1.0, 1.0])
    assert torch.equal(q.quantize(x), codes.float())
    assert torch.allclose(q.fake_quant(x), expected, atol=1e-7)
    assert torch.equal(q.dequantize(q.quantize(x)), q.fake_quant(x))
    assert torch.equal(q.quantize(x) >= 4, x >= 0.25)  # the MSB is the range flag


@pytest.mark.parametrize("bits", [2, 3, 4, 6, 8])
def test_softmax_exact_one_and_zero(bits):
    q = softmax_q(bits, 2.0**-5)
    x = torch.tensor([0.0, 1.0])
    assert torch.equal(q.fake_quant(x), x)  # 1.0 = n/n exactly, no float drift
    assert q.quantize(x)[1] == 2**bits - 1


def test_softmax_out_of_range_values_clamp():
    q = softmax_q()
    assert torch.equal(q.fake_quant(torch.tensor([-0.1, 1.5])), torch.tensor([0.0, 1.0]))


def test_softmax_split_one_is_plain_uniform():
    # split = 1 puts everything but x = 1 in the low range: a (k-1)-bit uniform grid on [0, 1]
    x = torch.rand(1000)
    assert torch.allclose(softmax_twin_fake_quant(x, 1.0, 4), torch.round(x * 7) / 7, atol=1e-7)


def test_gelu_hand_computed_3bit():
    # k = 3: negative step 0.16997/4 (codes -4..0), positive step 0.5 (codes 0..3)
    q = TwinUniformGeluQuantizer(3)
    q.set_pos_scale(0.5)
    neg = GELU_MIN / 4
    x = torch.tensor([-GELU_MIN, -0.05, -0.01, -0.3, 0.0, 0.2, 0.3, 1.6, 10.0])
    codes = torch.tensor([-4, -1, 0, -4, 0, 0, 1, 3, 3])
    expected = torch.tensor([-GELU_MIN, -neg, 0.0, -GELU_MIN, 0.0, 0.0, 0.5, 1.5, 1.5])
    assert torch.equal(q.quantize(x), codes.float())
    assert torch.allclose(q.fake_quant(x), expected, atol=1e-7)
    assert torch.equal(q.dequantize(q.quantize(x)), q.fake_quant(x))


def test_gelu_negative_range_covers_gelu_minimum():
    x = torch.linspace(-6, 6, 100_001, dtype=torch.float64)
    assert abs(F.gelu(x).min().item() + GELU_MIN) < 1e-7
    q = TwinUniformGeluQuantizer(4)
    q.set_pos_scale(0.1)
    y = F.gelu(x.float())
    neg = y[y < 0]
    # every negative GELU output is within half a negative step: none is clipped
    assert (q.fake_quant(neg) - neg).abs().max() <= GELU_MIN / 8 / 2 + 1e-7


def test_functional_forms_broadcast_candidates():
    x = torch.rand(5, 7)
    splits = torch.tensor([1.0, 0.5, 0.125]).reshape(3, 1, 1)
    out = softmax_twin_fake_quant(x[None], splits, 4)
    for i, s in enumerate([1.0, 0.5, 0.125]):
        assert torch.equal(out[i], softmax_q(4, s).fake_quant(x))
    g = torch.randn(5, 7)
    scales = torch.tensor([0.1, 0.3]).reshape(2, 1, 1)
    assert torch.equal(gelu_twin_fake_quant(g[None], scales, 4)[1], gelu_twin_fake_quant(g, 0.3, 4))


def test_fit_prefers_small_split_for_peaked_softmax():
    probs = torch.softmax(torch.randn(64, 50) * 4, dim=-1)
    q = TwinUniformSoftmaxQuantizer(4).fit(probs)
    err = lambda s: (softmax_twin_fake_quant(probs, s, 4) - probs).pow(2).mean()  # noqa: E731
    assert float(q.split) < 1.0
    assert err(q.split) <= min(err(2.0**-i) for i in range(20)) + 1e-12


def test_gelu_fit_beats_min_max():
    y = F.gelu(torch.randn(4000) * 2)
    q = TwinUniformGeluQuantizer(4).fit(y)
    minmax = gelu_twin_fake_quant(y, y.max() / 7.5, 4)
    assert (q.fake_quant(y) - y).pow(2).mean() <= (minmax - y).pow(2).mean()


def test_spec_round_trip_and_uncalibrated():
    for q in (softmax_q(4, 2.0**-6), TwinUniformGeluQuantizer(5)):
        if isinstance(q, TwinUniformGeluQuantizer):
            q.set_pos_scale(0.037)
        back = quantizer_from_spec(q.spec())
        x = torch.rand(100) * 2 - 0.2
        assert type(back) is type(q) and torch.equal(back(x), q(x))
    with pytest.raises(UncalibratedError):
        TwinUniformSoftmaxQuantizer(4)(torch.rand(3))
    with pytest.raises(ValueError):
        TwinUniformGeluQuantizer(1)
    with pytest.raises(ValueError):
        softmax_q(4, 0.0)
