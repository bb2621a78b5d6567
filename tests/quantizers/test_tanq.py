import math

import pytest
import torch

from vitquant.quantizers import RangeRule, TanQuantizer, quantizer_from_spec
from vitquant.quantizers.tanq import tan_levels


def _tan(bits, alpha, scale=1.0):
    q = TanQuantizer(bits)
    q.set_params(scale, alpha)
    return q


def test_two_bit_levels_and_thresholds_hand_computed():
    # α = π/4 (tan α = 1), 2 bits: v = -1, -1/3, 1/3, 1; level = 1/2 + atan(v)/(π/2)
    # atan(1/3) = 0.3217506 -> levels 0, 0.2951672, 0.7048328, 1
    # thresholds at v = -2/3, 0, 2/3: atan(2/3) = 0.5880026 -> 0.1256659, 0.5, 0.8743341
    levels, thresholds = tan_levels(2, math.pi / 4)
    assert levels.tolist() == pytest.approx([0.0, 0.2951672, 0.7048328, 1.0], abs=1e-6)
    assert thresholds.tolist() == pytest.approx([0.1256659, 0.5, 0.8743341], abs=1e-6)


def test_hand_computed_fake_quant_with_edges():
    q = _tan(2, math.pi / 4)
    x = torch.tensor([0.0, 0.1, 0.2, 0.45, 0.6, 0.9, 1.0, 1.3, -0.1])
    expected = [0.0, 0.0, 0.2951672, 0.2951672, 0.7048328, 1.0, 1.0, 1.0, 0.0]
    assert q.fake_quant(x).tolist() == pytest.approx(expected, abs=1e-6)
    assert q.quantize(x).tolist() == [0, 0, 1, 1, 2, 3, 3, 3, 0]


@pytest.mark.parametrize("bits", [2, 3, 4, 8])
@pytest.mark.parametrize("tan_alpha", [0.05, 1.0, 30.0, 1000.0])
def test_zero_and_exact_one_survive(bits, tan_alpha):
    q = _tan(bits, math.atan(tan_alpha))
    out = q.fake_quant(torch.tensor([0.0, 1.0]))
    assert out[0].item() == 0.0 and out[1].item() == 1.0  # exactly, not approximately
    q = _tan(bits, math.atan(tan_alpha), scale=0.625)
    assert q.fake_quant(torch.tensor([0.625])).item() == 0.625


def test_levels_are_dense_at_both_ends():
    levels, _ = tan_levels(4, math.atan(20.0))
    gaps = levels.diff()
    assert gaps[0] < gaps[7] / 10 and gaps[-1] < gaps[7] / 10  # ends much finer than the middle
    assert torch.allclose(levels + levels.flip(0), torch.ones(16), atol=1e-6)  # symmetric about 1/2


def test_small_alpha_is_uniform():
    levels, _ = tan_levels(3, math.atan(1e-4))
    assert torch.allclose(levels, torch.arange(8) / 7, atol=1e-6)


def test_rounding_is_nearest_level_in_the_tangent_domain():
    alpha = math.atan(5.0)
    q = _tan(4, alpha)
    x = torch.rand(2000, generator=torch.Generator().manual_seed(0))
    t = torch.tan(alpha * (2 * x.double() - 1)) / math.tan(alpha)  # [-1, 1]
    direct = torch.round((t + 1) / 2 * 15).long()
    assert torch.equal(q.quantize(x), direct)


def test_fit_keeps_the_max_and_picks_least_mse_alpha():
    probs = torch.softmax(torch.randn(64, 17, generator=torch.Generator().manual_seed(0)) * 3, dim=-1)
    grid = (0.5, 3.0, 20.0)
    q = TanQuantizer(3).fit(probs, RangeRule("mse"), tan_grid=grid)
    assert q.scale.item() == pytest.approx(probs.max().item())  # never clipped at the top
    errs = [(_tan(3, math.atan(t), probs.max()).fake_quant(probs) - probs).pow(2).mean().item() for t in grid]
    assert math.tan(q.alpha) == pytest.approx(grid[errs.index(min(errs))])


def test_spec_round_trip():
    q = _tan(4, math.atan(7.0), scale=0.93)
    back = quantizer_from_spec(q.spec())
    x = torch.rand(300)
    assert isinstance(back, TanQuantizer) and torch.equal(back.fake_quant(x), q.fake_quant(x))


def test_uncalibrated_and_bad_alpha_raise():
    with pytest.raises(ValueError):
        tan_levels(4, math.pi / 2)
    from vitquant.errors import UncalibratedError

    with pytest.raises(UncalibratedError):
        TanQuantizer(4)(torch.rand(3))
