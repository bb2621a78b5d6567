import pytest
import torch

from vitquant.quantizers import RangeRule, UniformQuantizer, quantizer_from_spec
from vitquant.quantizers.log_int_softmax import LogIntSoftmaxQuantizer, integer_exp, log2_round


def _lis(bits=4, variant="paper", scale=0.25) -> LogIntSoftmaxQuantizer:
    return LogIntSoftmaxQuantizer(bits, variant).set_scores_scale(scale)


def test_integer_exp_hand_computed():
    # S = 0.25: x0 = ⌊−0.6931/0.25⌋ = −3, ⌊b/(aS)⌋ = ⌊10.83⌋ = 10, ⌊c/(aS²)⌋ = ⌊44.67⌋ = 44
    # x = 0:  q = 0, r = 0  → z = 44              → 44·2^30
    # x = −1: q = 0, r = −1 → z = −1·9 + 44 = 35  → 35·2^30
    # x = −4: q = 1, r = −1 → z = 35              → 35·2^29
    # x = −7: q = 2, r = −1 → z = 35              → 35·2^28
    # x = −200 saturates at n·x0 = −90: q = 30, r = 0 → 44·2^0
    x = torch.tensor([0.0, -1, -4, -7, -200], dtype=torch.float64)
    assert integer_exp(x, 0.25).tolist() == [44 * 2**30, 35 * 2**30, 35 * 2**29, 35 * 2**28, 44]


def test_lis_hand_computed_row():
    # scores on the S = 0.25 grid, integer codes 0, −1, −4, −7 below the row max (shifted by 10 = 40·S)
    scores = torch.tensor([[10.0, 9.75, 9.0, 8.25]])
    # Σ I_exp = 2^28·(176 + 140 + 70 + 35) = 421·2^28; ratios ⌊421/176⌉ = 2, ⌊421/140⌉ = 3, ⌊421/70⌉ = 6,
    # ⌊421/35⌉ = 12; codes ⌊log2⌉ = 1, 2, 3, 4 in both variants
    for variant in ("paper", "code"):
        assert _lis(variant=variant).fake_quant(scores).tolist() == [[0.5, 0.25, 0.125, 0.0625]]
    codes, below = _lis().quantize(scores)
    assert codes.tolist() == [[1.0, 2.0, 3.0, 4.0]] and not below.any()


def test_log2_rounding_variants_differ_between_sqrt2_and_1_5():
    ratio = torch.tensor([1.0, 2, 3, 5, 6, 11, 12, 22, 23, 24, 46, 47, 48])
    # paper: nearest in the log domain (up from √2·2^k); code: up from 1.5·2^k (bit after the leading one)
    assert log2_round(ratio, "paper").tolist() == [0, 1, 2, 2, 3, 3, 4, 4, 5, 5, 6, 6, 6]
    assert log2_round(ratio, "code").tolist() == [0, 1, 2, 2, 3, 3, 4, 4, 4, 5, 5, 5, 6]


def test_dominant_score_gives_exactly_one():
    # codes 0 and −200 (saturated): ratio for the max is ⌊(44·2^30 + 3·44)/(44·2^30)⌉ = 1 → code 0 → 1.0;
    # the others get ratio 2^30 + 3 → code 30 ≥ 16: below the 4-bit grid
    scores = torch.tensor([[10.0, -40.0, -40.0, -40.0]])
    assert _lis(variant="code").fake_quant(scores).tolist() == [[1.0, 0.0, 0.0, 0.0]]
    assert _lis(variant="paper").fake_quant(scores).tolist() == [[1.0, 2.0**-15, 2.0**-15, 2.0**-15]]


def test_uniform_row_is_exact():
    scores = torch.full((2, 3, 8), 1.5)
    out = _lis().fake_quant(scores)  # ratio 8 → code 3 → 1/8
    assert torch.equal(out, torch.full((2, 3, 8), 0.125))


def test_zero_integer_exponential_is_below_grid_not_nan():
    """FQ-ViT issue #13 (log2 of zero): with a coarse score step the polynomial constants round to 0,
    every I_exp is 0 and Σ/I_exp is 0/0; the output must stay finite."""
    # S = 2: x0 = ⌊−0.35⌋ = −1, ⌊b/(aS)⌋ = 1, ⌊c/(aS²)⌋ = ⌊0.698⌋ = 0 → z = r(r + 1) = 0 for r = 0
    scores = torch.tensor([[4.0, 2.0, 0.0, -2.0]])
    assert integer_exp(torch.tensor([0.0, -1, -2]), 2.0).tolist() == [0.0, 0.0, 0.0]
    assert _lis(variant="code", scale=2.0).fake_quant(scores).tolist() == [[0.0] * 4]
    assert _lis(variant="paper", scale=2.0, bits=3).fake_quant(scores).tolist() == [[2.0**-7] * 4]


def test_invariant_to_the_scores_zero_point_and_close_to_softmax():
    torch.manual_seed(0)
    raw = torch.randn(4, 2, 17, 17)
    uq = UniformQuantizer(8).fit(raw, RangeRule("minmax"))  # S ≈ 0.028
    scores = uq.fake_quant(raw)  # (q − z)·S: the input LIS expects
    lis = LogIntSoftmaxQuantizer(4).set_scores_scale(uq.scale)
    out = lis.fake_quant(scores)
    assert torch.equal(out, lis.fake_quant(scores + 7 * uq.scale))  # softmax is shift-invariant
    # i-exp approximates ln 2 by ⌊ln2/S⌋·S (4% off here) and the polynomial by a few %, so the code is
    # ⌊−log2 p⌉ up to one step near the boundary between two codes
    err = (torch.log2(out) - torch.log2(scores.softmax(-1))).abs()
    assert err.max() < 1.0
    assert (err <= 0.5 + 1e-6).float().mean() > 0.9


def test_spec_round_trip_and_validation():
    q = _lis(bits=3, variant="code", scale=0.125)
    q2 = quantizer_from_spec(q.spec())
    assert isinstance(q2, LogIntSoftmaxQuantizer) and q2.variant == "code" and q2.bits == 3
    x = torch.randn(2, 5, 5)
    assert torch.equal(q2.fake_quant(x), q.fake_quant(x))
    with pytest.raises(ValueError, match="variant"):
        LogIntSoftmaxQuantizer(4, "nearest")
    with pytest.raises(ValueError, match="one positive"):
        LogIntSoftmaxQuantizer(4).set_scores_scale(torch.tensor([0.1, 0.2]))
    with pytest.raises(Exception, match="calibration"):
        LogIntSoftmaxQuantizer(4)(x)
