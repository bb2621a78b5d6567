import pytest
import torch

from vitquant.quantizers import RangeRule, quantizer_from_spec
from vitquant.quantizers.ptf import PowerOfTwoFactorQuantizer


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)


def _two_channels() -> torch.Tensor:
    # rows × channels: channel 0 spans the whole range, channel 1 a quarter of it
    return torch.tensor([[-2.0, -0.9], [0.0, 0.2], [2.0, 1.1], [4.0, 1.6]])


def test_hand_computed_scale_zero_point_and_factors():
    # b = 2 (codes 0..3), K = 1. Eq. 10: coarse step 2^K·s = (4 − (−2)) / 3 = 2, so s = 1;
    # zp = clip(round(2 / 2), 0, 3) = 1 (with the finest step, issue #34's reading, it would be 2).
    q = PowerOfTwoFactorQuantizer(2, max_factor=1).fit(_two_channels())
    assert float(q.scale) == 1.0 and float(q.zero_point) == 1.0
    # channel 0: coarse grid {−2, 0, 2, 4} is exact (error 0); fine grid {−1, 0, 1, 2} errs 1 + 4 → α = 1
    # channel 1: fine grid gives −1, 0, 1, 2 (error .01+.04+.01+.16 = .22); coarse gives 0, 0, 2, 2 (1.82) → α = 0
    assert q.alpha.tolist() == [1.0, 0.0]
    assert q.channel_scale().tolist() == [2.0, 1.0]
    assert q.fake_quant(_two_channels()).tolist() == [[-2.0, -1.0], [0.0, 0.0], [2.0, 1.0], [4.0, 2.0]]
    assert q.quantize(_two_channels()).tolist() == [[0.0, 0.0], [1.0, 1.0], [2.0, 2.0], [3.0, 3.0]]


def test_bitshift_puts_every_channel_on_one_integer_grid():
    """(X_Q − zp) << α_c is X̂ / s: integers, the shared grid the integer LayerNorm works on."""
    x = torch.randn(64, 8) * torch.tensor([0.1, 0.2, 0.5, 1, 2, 4, 8, 0.3])
    q = PowerOfTwoFactorQuantizer(8).fit(x)
    shifted = (q.quantize(x) - q.zero_point) * torch.exp2(q.alpha)
    assert torch.equal(shifted, torch.round(shifted))
    assert torch.allclose(shifted * q.scale, q.fake_quant(x), atol=1e-6)


def test_channels_with_small_ranges_get_finer_grids():
    x = torch.randn(256, 4) * torch.tensor([8.0, 4.0, 2.0, 1.0])
    q = PowerOfTwoFactorQuantizer(4, max_factor=3).fit(x)
    assert q.alpha.tolist() == sorted(q.alpha.tolist(), reverse=True)
    assert q.alpha[0] == 3 and q.alpha[3] < 3
    layer_wise = PowerOfTwoFactorQuantizer(4, max_factor=3)
    layer_wise.set_params(q.scale, q.zero_point, torch.full((4,), 3.0))  # α = K everywhere: plain min-max
    assert (q.fake_quant(x) - x).pow(2).sum() < (layer_wise.fake_quant(x) - x).pow(2).sum()


def test_ties_go_to_the_finer_grid():
    # every value is exact on both grids (b = 2, K = 1: coarse {−2, 0, 2, 4}, fine {−1, 0, 1, 2})
    x = torch.tensor([[-2.0, 0.0], [4.0, 2.0], [0.0, 0.0]])
    q = PowerOfTwoFactorQuantizer(2, max_factor=1).fit(x)
    assert q.alpha.tolist() == [1.0, 0.0]


def test_zeros_give_zeros_without_nan():
    q = PowerOfTwoFactorQuantizer(8).fit(torch.zeros(16, 4))
    out = q.fake_quant(torch.zeros(2, 16, 4))
    assert torch.equal(out, torch.zeros(2, 16, 4))
    assert float(q.zero_point) == 0.0 and q.alpha.tolist() == [0.0] * 4


def test_observer_range_is_used_and_channel_axis_respected():
    x = torch.randn(32, 3)
    q = PowerOfTwoFactorQuantizer(8, max_factor=2).fit(x, RangeRule("minmax"), lo=torch.tensor([-10.0, -1, -1]),
                                                        hi=torch.tensor([1.0, 1, 6.0]))
    assert float(q.scale) == pytest.approx(16 / 255 / 4)
    assert float(q.zero_point) == round(10 / (16 / 255))
    t = torch.randn(2, 3, 5)  # channels on axis 1
    q1 = PowerOfTwoFactorQuantizer(8, channel_axis=1).fit(t)
    assert q1.alpha.numel() == 3 and q1.fake_quant(t).shape == t.shape


def test_spec_round_trip_and_channel_mismatch():
    x = torch.randn(50, 6) * torch.arange(1, 7)
    q = PowerOfTwoFactorQuantizer(6, max_factor=3).fit(x)
    q2 = quantizer_from_spec(q.spec())
    assert isinstance(q2, PowerOfTwoFactorQuantizer)
    assert torch.equal(q2.fake_quant(x), q.fake_quant(x))
    with pytest.raises(ValueError, match="6 channels"):
        q.fake_quant(torch.randn(3, 5))
    with pytest.raises(ValueError, match="max_factor"):
        PowerOfTwoFactorQuantizer(8, max_factor=9)
