import math

import pytest
import torch

from vitquant.quantizers import Log2Quantizer, LogSqrt2Quantizer, RangeRule, quantizer_from_spec


def test_log2_hand_computed():
    q = Log2Quantizer(3)
    q.set_scale(1.0)
    # -log2(x): 1.0 -> 0, 0.3 -> 1.74 -> 2 -> 0.25, 0.1 -> 3.32 -> 3 -> 0.125, 0.02 -> 5.64 -> 6 -> 1/64,
    # 2^-7.6 -> 7.6 -> 8 >= 2^3 -> underflow to 0; x = 0 -> 0; x above scale clamps to code 0 -> 1.0
    x = torch.tensor([1.0, 0.3, 0.1, 0.02, 2**-7.6, 0.0, 1.7])
    assert q.fake_quant(x).tolist() == [1.0, 0.25, 0.125, 1 / 64, 0.0, 0.0, 1.0]


def test_log_sqrt2_hand_computed():
    q = LogSqrt2Quantizer(4)
    q.set_scale(0.5)
    # code = round(-2 log2(x / 0.5)); value = 0.5 * 2^(-code/2)
    x = torch.tensor([0.5, 0.36, 0.25, 0.1, 0.0])
    codes = [0, round(-2 * math.log2(0.72)), 2, round(-2 * math.log2(0.2)), None]
    expected = [0.5 * 2 ** (-c / 2) if c is not None else 0.0 for c in codes]
    assert q.fake_quant(x).tolist() == pytest.approx(expected)
    assert codes[1] == 1  # 0.36 lands on 0.5/√2


def test_exact_one_in_softmax_is_kept():
    q = LogSqrt2Quantizer(4)
    q.set_scale(1.0)
    assert q.fake_quant(torch.tensor([1.0])).item() == 1.0


def test_underflow_boundary_log_sqrt2():
    q = LogSqrt2Quantizer(3)  # codes 0..7, smallest nonzero 2^-3.5
    q.set_scale(1.0)
    assert q.fake_quant(torch.tensor([2**-3.5])).item() == pytest.approx(2**-3.5)
    assert q.fake_quant(torch.tensor([2**-4.1])).item() == 0.0  # code 8 does not exist


def test_fit_prefers_scale_with_lower_mse():
    torch.manual_seed(0)
    x = torch.softmax(torch.randn(64, 17) * 3, dim=-1)
    q = LogSqrt2Quantizer(4).fit(x, RangeRule("mse", candidates=(0.9, 0.99, 1.0)))
    errs = []
    for p in (0.9, 0.99, 1.0):
        c = LogSqrt2Quantizer(4)
        c.set_scale(torch.quantile(x.flatten(), p) if p < 1 else x.max())
        errs.append((c.fake_quant(x) - x).pow(2).mean().item())
    assert (q.fake_quant(x) - x).pow(2).mean().item() == pytest.approx(min(errs))


def test_spec_round_trip():
    q = Log2Quantizer(4)
    q.set_scale(0.731)
    r = quantizer_from_spec(q.spec())
    x = torch.rand(100)
    assert torch.equal(q.fake_quant(x), r.fake_quant(x))
