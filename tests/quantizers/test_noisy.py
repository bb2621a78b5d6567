"""NoisyBiasQuantizer (NoisyQuant) against hand-computed values; the denoising-bias fold is exact."""
import pytest
import torch
import torch.nn.functional as F

from vitquant.errors import UncalibratedError
from vitquant.quantizers import UniformQuantizer, quantizer_from_spec
from vitquant.quantizers.noisy import NoisyBiasQuantizer, denoising_bias


def base(scale=0.5, bits=4):
    q = UniformQuantizer(bits, symmetric=True)
    q.set_params(torch.tensor(scale), torch.tensor(0.0))
    return q


def test_hand_computed_4bit():
    # Δ = 0.5, codes ±7; N = (0.1, −0.2, 0) per channel; x̂ = Q(x + N) − N
    q = NoisyBiasQuantizer(base(), torch.tensor([0.1, -0.2, 0.0]))
    x = torch.tensor([[0.3, 0.3, 0.3],
                      [0.0, 0.0, 0.0],  # zeros do not stay zero: the noise is removed after rounding
                      [-0.26, 1.0, 10.0]])  # 10 clamps to code 7
    expected = torch.tensor([[0.4, 0.2, 0.5],
                             [-0.1, 0.2, 0.0],
                             [-0.1, 1.2, 3.5]])
    codes = torch.tensor([[1, 0, 1], [0, 0, 0], [0, 2, 7]])
    assert torch.allclose(q.fake_quant(x), expected, atol=1e-6)
    assert torch.equal(q.quantize(x), codes.float())
    assert torch.allclose(q.dequantize(q.quantize(x)), q.fake_quant(x))


def test_zero_noise_is_the_base_quantizer_and_denoise_off_keeps_noise():
    x = torch.randn(8, 5)
    assert torch.equal(NoisyBiasQuantizer(base(0.3), torch.zeros(5))(x), base(0.3)(x))
    noise = torch.rand(5) - 0.5
    q = NoisyBiasQuantizer(base(0.3), noise, denoise=False)
    assert torch.equal(q(x), base(0.3)(x + noise))


def test_channel_axis_for_channel_first_tensors():
    noise = torch.tensor([0.1, -0.1])
    x = torch.randn(3, 2, 4)
    q = NoisyBiasQuantizer(base(), noise, channel_axis=1)
    n = noise.reshape(1, 2, 1)
    assert torch.equal(q(x), base()(x + n) - n)


@pytest.mark.parametrize("dtype,atol", [(torch.float64, 1e-12), (torch.float32, 1e-5)])
def test_denoising_bias_fold_is_exact(dtype, atol):
    """W·(Q(x+N) − N) + b == W·Q(x+N) + (b − W·N): the deployed form computes the same function."""
    g = torch.Generator().manual_seed(0)
    W, b = torch.randn(6, 5, generator=g, dtype=dtype), torch.randn(6, generator=g, dtype=dtype)
    noise = (torch.rand(5, generator=g, dtype=dtype) - 0.5) * 0.5
    x = torch.randn(7, 5, generator=g, dtype=dtype)
    q = NoisyBiasQuantizer(base(), noise)
    y = F.linear(q.fake_quant(x), W, b)
    q.denoise = False
    y_folded = F.linear(q.fake_quant(x), W, denoising_bias(W, b, q.noise))  # the noise as stored (float32)
    assert torch.allclose(y, y_folded, atol=atol, rtol=0)
    assert torch.allclose(denoising_bias(W, None, noise), -W @ noise)


def test_uniform_noise_lowers_error_of_values_at_a_bin_edge():
    """The paper's Theorem 1 setting: values sitting 0.45Δ from a grid point have squared error
    0.2025Δ²; with N ~ U(−Δ/2, Δ/2) per channel the error averages Δ²/12 ≈ 0.083Δ²."""
    delta, channels = 0.5, 20_000
    x = torch.full((1, channels), 0.45 * delta)
    noise = (torch.rand(channels, generator=torch.Generator().manual_seed(0)) - 0.5) * delta
    plain = (base(delta)(x) - x).pow(2).mean() / delta**2
    noisy = (NoisyBiasQuantizer(base(delta), noise)(x) - x).pow(2).mean() / delta**2
    assert abs(float(plain) - 0.2025) < 1e-5
    assert abs(float(noisy) - 1 / 12) < 0.005


def test_spec_round_trip_and_uncalibrated():
    q = NoisyBiasQuantizer(base(0.25, 6), torch.rand(4) - 0.5, denoise=False)
    back = quantizer_from_spec(q.spec())
    x = torch.randn(3, 4)
    assert isinstance(back, NoisyBiasQuantizer) and not back.denoise and torch.equal(back(x), q(x))
    with pytest.raises(UncalibratedError):
        NoisyBiasQuantizer(UniformQuantizer(4, symmetric=True), torch.zeros(4))(x)
