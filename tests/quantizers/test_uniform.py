import pytest
import torch

from vitquant.quantizers import RangeRule, UniformQuantizer, quantizer_from_spec
from vitquant.errors import UncalibratedError


def test_asymmetric_per_tensor_hand_computed():
    # range [-1, 2], 2 bits: scale = 3/3 = 1, zero point = round(1/1) = 1, grid {-1, 0, 1, 2}
    q = UniformQuantizer(2)
    q.set_range(torch.tensor(-1.0), torch.tensor(2.0))
    assert q.scale.item() == pytest.approx(1.0) and q.zero_point.item() == 1.0
    x = torch.tensor([-3.0, -0.6, 0.4, 0.5, 1.49, 7.0])
    # round half to even: 0.5 -> 0
    assert q.fake_quant(x).tolist() == [-1.0, -1.0, 0.0, 0.0, 1.0, 2.0]
    assert q.quantize(x).tolist() == [0.0, 0.0, 1.0, 1.0, 2.0, 3.0]


def test_symmetric_narrow_range():
    # 4 bits symmetric: qmax = 7, scale = max|x| / 7
    q = UniformQuantizer(4, symmetric=True)
    q.set_range(torch.tensor(-0.5), torch.tensor(1.4))
    assert q.scale.item() == pytest.approx(0.2)
    assert q.zero_point.item() == 0
    x = torch.tensor([-2.0, -0.31, 0.29, 1.4])
    assert torch.allclose(q.fake_quant(x), torch.tensor([-1.4, -0.4, 0.2, 1.4]))


def test_per_channel_weight_axis0():
    w = torch.tensor([[0.0, 1.0, 3.0], [-2.0, 0.0, 2.0]])  # 2 output channels
    q = UniformQuantizer(2, channel_axis=0).fit(w, RangeRule("minmax"))
    assert q.scale.tolist() == pytest.approx([1.0, 4 / 3])
    assert q.zero_point.tolist() == [0.0, 2.0]  # round(2 / (4/3)) = round(1.5) = 2
    out = q.fake_quant(w)
    assert out[0].tolist() == [0.0, 1.0, 3.0]
    assert torch.allclose(out[1], torch.tensor([-8 / 3, 0.0, 4 / 3]))  # -2 clips to the grid's lowest point


def test_per_head_is_channel_axis_1():
    x = torch.zeros(2, 3, 4, 5)
    for h in range(3):
        x[:, h] = torch.linspace(0, h + 1, 5)
    q = UniformQuantizer(8, channel_axis=1).fit(x, RangeRule("minmax"))
    assert q.scale.tolist() == pytest.approx([1 / 255, 2 / 255, 3 / 255])
    assert torch.allclose(q.fake_quant(x), x, atol=3 / 255 / 2 + 1e-6)


def test_constant_tensor_does_not_divide_by_zero():
    q = UniformQuantizer(4).fit(torch.zeros(10), RangeRule("minmax"))
    assert torch.equal(q.fake_quant(torch.zeros(3)), torch.zeros(3))


def test_mse_search_clips_outlier():
    x = torch.cat([torch.linspace(-1, 1, 10000), torch.tensor([10.0])])
    mm = UniformQuantizer(4).fit(x, RangeRule("minmax"))
    mse = UniformQuantizer(4).fit(x, RangeRule("mse", candidates=(0.999, 0.9999, 1.0)))
    err = lambda q: (q.fake_quant(x) - x).pow(2).mean()  # noqa: E731
    assert err(mse) < err(mm)
    assert mse.scale.item() < mm.scale.item()


def test_percentile_range():
    x = torch.arange(0, 10001, dtype=torch.float32)
    q = UniformQuantizer(8).fit(x, RangeRule("percentile", percentile=0.99))
    # quantiles 0.01 and 0.99 of 0..10000 are 100 and 9900
    assert q.scale.item() == pytest.approx(9800 / 255, rel=1e-5)


def test_uncalibrated_raises():
    with pytest.raises(UncalibratedError, match="before calibration"):
        UniformQuantizer(8, name="blocks.0.attn.qkv.input")(torch.ones(2))


def test_spec_round_trip_is_exact():
    q = UniformQuantizer(4, channel_axis=0).fit(torch.randn(5, 7), RangeRule("minmax"))
    r = quantizer_from_spec(q.spec())
    x = torch.randn(5, 7)
    assert torch.equal(q.fake_quant(x), r.fake_quant(x))
