import math

import pytest
import torch

from vitquant.quantizers import AdaLogQuantizer, Log2Quantizer, quantizer_from_spec
from vitquant.quantizers.adalog import GELU_SHIFT, adalog_codes, adalog_dequantize, mantissa_table


def _q(bits, q=37, scale=1.0, **kw):
    quant = AdaLogQuantizer(bits, q=q, **kw)
    quant.set_params(scale)
    return quant


def test_q_equal_r_is_log2_hand_computed():
    # base 2^(37/37) = 2: code = round(-log2(x)); 1.0 -> 0 (exact), 0.3 -> 1.74 -> 2 -> 0.25,
    # 0.1 -> 3.32 -> 3, 0.02 -> 5.64 -> 6, 2^-7.6 -> 8 ≥ 2^3 -> 0, 0 -> 0, above s clamps to code 0 -> s
    x = torch.tensor([1.0, 0.3, 0.1, 0.02, 2**-7.6, 0.0, 1.7])
    assert _q(3).fake_quant(x).tolist() == [1.0, 0.25, 0.125, 1 / 64, 0.0, 0.0, 1.0]
    log2 = Log2Quantizer(3)
    log2.set_scale(1.0)
    assert torch.equal(_q(3).fake_quant(x), log2.fake_quant(x))


def test_adaptive_base_hand_computed():
    # q = 20: base 2^(20/37), code = round(-log2(x) * 37/20), value = 2^(-code*20/37)
    # 0.9: 0.152*1.85 = 0.28 -> 0; 0.5: 1.85 -> 2; 0.2: 4.30 -> 4; 0.01: 12.29 -> 12;
    # 1e-4: 24.6 -> 25 ≥ 16 -> 0
    x = torch.tensor([0.9, 0.5, 0.2, 0.01, 1e-4])
    quant = _q(4, q=20)
    codes, under = quant.quantize(x)
    assert codes.tolist() == [0, 2, 4, 12, 15] and under.tolist() == [False, False, False, False, True]
    expected = [1.0, 2 ** (-40 / 37), 2 ** (-80 / 37), 2 ** (-240 / 37), 0.0]
    assert quant.fake_quant(x).tolist() == pytest.approx(expected, rel=1e-6)
    # table form: 240 = 6*37 + 18 -> 2^-6 * T[18], T[18] = 2^(-18/37)
    assert quant.mantissa[18].item() == pytest.approx(2 ** (-18 / 37), rel=1e-7)


def test_scale_hangs_the_grid_below_s():
    quant = _q(4, q=37, scale=0.5)
    assert quant.fake_quant(torch.tensor([0.5, 0.25, 0.3, 0.9])).tolist() == [0.5, 0.25, 0.25, 0.5]


def test_table_form_equals_closed_form_for_every_code_and_base():
    r, bits = 37, 8
    table = mantissa_table(r, bits)
    codes = torch.arange(2**bits, dtype=torch.float32)[:, None]
    qs = torch.arange(1, 139, dtype=torch.float32)[None]
    got = adalog_dequantize(codes, torch.zeros_like(codes * qs, dtype=torch.bool), torch.tensor(0.75), qs, r, table)
    closed = 0.75 * torch.exp2(-(codes * qs).double() / r)
    tiny = closed < 1e-37  # float32 flushes those to (sub)normal noise
    assert torch.allclose(got.double()[~tiny], closed[~tiny], rtol=2e-7, atol=0)


def test_exact_one_and_zero_in_softmax():
    quant = _q(4, q=25)
    assert quant.fake_quant(torch.tensor([1.0])).item() == 1.0
    assert quant.fake_quant(torch.tensor([0.0])).item() == 0.0


def test_post_gelu_shift_and_negative_gelu_outputs():
    # x + c with c = 0.16997: the GELU minimum -c maps to 0 -> underflow -> dequantizes to 0 - c = -c
    quant = _q(4, q=37, scale=1.0, shift=GELU_SHIFT)
    x = torch.tensor([-GELU_SHIFT, -0.1, 0.33003, 5.0])
    # -0.1 + c = 0.06997: -log2 = 3.837 -> 4 -> 1/16 - c; 0.33003 + c = 0.5 -> 1 -> 0.5 - c; 5 clamps to 1 - c
    expected = [-GELU_SHIFT, 1 / 16 - GELU_SHIFT, 0.5 - GELU_SHIFT, 1.0 - GELU_SHIFT]
    assert quant.fake_quant(x).tolist() == pytest.approx(expected, abs=1e-6)
    quant.shift_folded = True  # after the bias fold the quantizer hands on x̂ + c
    assert quant.fake_quant(x).tolist() == pytest.approx([0.0, 1 / 16, 0.5, 1.0], abs=1e-6)


def test_rounded_table_is_the_official_codes():
    # GoatWu/AdaLog: T[j] = round(2^(-j/37) * (2^(b+1) - 2)) / (2^(b+1) - 2); at 4 bits steps of 1/30
    table = mantissa_table(37, 4, "rounded")
    assert table[3].item() == pytest.approx(round(2 ** (-3 / 37) * 30) / 30) == pytest.approx(28 / 30)
    quant = _q(4, q=20, table="rounded")
    # x = 0.5 -> code 2 -> prod 40 = 37 + 3 -> 2^-1 * T[3]
    assert quant.fake_quant(torch.tensor([0.5])).item() == pytest.approx(0.5 * 28 / 30)


def test_codes_broadcast_over_candidate_axis():
    x = torch.rand(5, 7)
    qs = torch.tensor([10.0, 37.0])[:, None, None]
    codes, _ = adalog_codes(x[None], torch.tensor(1.0), qs, 37, 4)
    assert codes.shape == (2, 5, 7)
    assert torch.equal(codes[1], _q(4, q=37).quantize(x)[0])


def test_spec_round_trip_keeps_base_shift_and_fold():
    quant = _q(3, q=23, scale=0.81, shift=GELU_SHIFT, table="rounded")
    quant.shift_folded = True
    back = quantizer_from_spec(quant.spec())
    x = torch.randn(200)
    assert isinstance(back, AdaLogQuantizer) and back.q == 23 and back.shift_folded
    assert torch.equal(back.fake_quant(x), quant.fake_quant(x))
    assert math.isclose(back.base, 2 ** (23 / 37))


def test_invalid_parameters_are_refused():
    with pytest.raises(ValueError):
        AdaLogQuantizer(4, q=0)
    with pytest.raises(ValueError):
        AdaLogQuantizer(4, table="approx")
