"""AdaRound soft rounding and the straight-through views, against hand-computed values."""
import pytest
import torch

from vitquant.quantizers import LogSqrt2Quantizer, RangeRule, UniformQuantizer
from vitquant.quantizers.adaround import AdaRoundWeight, beta_schedule
from vitquant.quantizers.ste import LearnedScaleUniform, StraightThrough, round_ste


def _uniform(bits, scale, zero_point=0.0, symmetric=False, channel_axis=None):
    q = UniformQuantizer(bits, symmetric=symmetric, channel_axis=channel_axis)
    q.set_params(torch.as_tensor(scale), torch.as_tensor(zero_point))
    return q


def test_adaround_starts_at_the_float_weight_and_hardens_by_h():
    q = _uniform(4, [0.1, 0.1], [0.0, 0.0], symmetric=True, channel_axis=0)
    w = torch.tensor([[0.26], [-0.14]])
    ada = AdaRoundWeight(q, w)
    # W/s = 2.6 -> floor 2, h = 0.6 ;  -1.4 -> floor -2, h = 0.6
    assert ada.w_floor.flatten().tolist() == [2.0, -2.0]
    assert ada.h().flatten().tolist() == pytest.approx([0.6, 0.6], abs=1e-5)
    assert torch.allclose(ada(), w, atol=1e-6)
    hard = ada.hard_weight()  # h ≥ 0.5 rounds up: 0.3 and -0.1
    assert hard.flatten().tolist() == pytest.approx([0.3, -0.1])
    # regulariser 1 - |2h - 1|^β at β = 2: 1 - 0.2² = 0.96 per weight
    assert ada.regularizer(2.0).item() == pytest.approx(1.92, abs=1e-4)
    # hardened weights lie on the grid: the quantizer reproduces them bit for bit
    assert torch.equal(q.fake_quant(hard), hard)


def test_adaround_respects_the_clamp():
    q = _uniform(2, 0.1)  # asym 2-bit: codes 0..3 -> values 0..0.3
    ada = AdaRoundWeight(q, torch.tensor([0.35, -0.05]))
    with torch.no_grad():
        ada.v.fill_(10.0)  # h = 1: round up everywhere
    assert ada.hard_weight().tolist() == pytest.approx([0.3, 0.0])


def test_beta_schedule():
    # warm-up 20 % of 100 steps: no regulariser, then β linear 20 -> 2
    assert beta_schedule(10, 100, 0.2) is None
    assert beta_schedule(20, 100, 0.2) == 20.0
    assert beta_schedule(60, 100, 0.2) == pytest.approx(11.0)
    assert beta_schedule(100, 100, 0.2) == pytest.approx(2.0)


def test_round_ste_forward_is_round_and_backward_identity():
    x = torch.tensor([-2.5, -0.49, 0.5, 1.5, 2.6, 1e6 + 0.5], requires_grad=True)
    y = round_ste(x)
    assert torch.equal(y, torch.round(x.detach()))
    y.sum().backward()
    assert x.grad.tolist() == [1.0] * 6


def test_learned_scale_forward_equals_the_quantizer_and_has_the_lsq_gradient():
    torch.manual_seed(0)
    x = torch.randn(200, 8) * 3
    base = UniformQuantizer(4, channel_axis=-1).fit(x, RangeRule("minmax"))
    assert torch.equal(LearnedScaleUniform(base)(x), base.fake_quant(x))
    # LSQ: dx̂/ds = round(x/s) - x/s inside the grid, (qmax - z) when clamped above
    q = LearnedScaleUniform(_uniform(3, 0.1))  # asym 3-bit: codes 0..7
    x = torch.tensor([0.26, 0.9])  # 2.6 -> 3 inside the grid; 9 -> clamped to 7
    q(x).sum().backward()
    assert q.scale.grad.item() == pytest.approx((3 - 2.6) + 7)
    q.scale.data.fill_(0.2)
    q.write_back()
    assert float(q.base.scale) == pytest.approx(0.2)


def test_straight_through_keeps_values_and_passes_gradient():
    log = LogSqrt2Quantizer(4)
    log.set_scale(1.0)
    x = torch.tensor([0.3, 0.01], requires_grad=True)
    y = StraightThrough(log)(x)
    assert torch.equal(y, log.fake_quant(x.detach()))
    y.sum().backward()
    assert x.grad.tolist() == [1.0, 1.0]
