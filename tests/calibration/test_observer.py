import torch

from vitquant.calibration.observer import ReservoirObserver


def test_exact_when_stream_fits():
    obs = ReservoirObserver(channel_axis=-1, max_elements=10_000)
    xs = [torch.randn(4, 5, 8) for _ in range(3)]
    for x in xs:
        obs.update(x)
    rows = torch.cat([x.reshape(-1, 8) for x in xs])
    assert obs.sample().shape == rows.shape
    # same multiset of rows (order is by random key)
    assert torch.allclose(obs.sample().sum(0), rows.sum(0), atol=1e-5)
    assert torch.equal(obs.lo, rows.amin(0)) and torch.equal(obs.hi, rows.amax(0))


def test_bounded_memory_keeps_exact_extremes():
    obs = ReservoirObserver(channel_axis=-1, max_elements=64)
    big = []
    for i in range(20):
        x = torch.randn(10, 8) * (i + 1)
        big.append(x)
        obs.update(x)
    assert obs.sample().shape == (8, 8)  # 64 elements / 8 channels
    allx = torch.cat(big)
    assert torch.equal(obs.lo, allx.amin(0)) and torch.equal(obs.hi, allx.amax(0))
    assert obs.count == 200


def test_reservoir_is_uniform_over_stream():
    # rows are their batch index; a uniform sample has mean ≈ the stream mean (4.5), not the last batches'
    means = []
    for seed in range(20):
        obs = ReservoirObserver(channel_axis=-1, max_elements=50, seed=seed)
        for i in range(10):
            obs.update(torch.full((100, 1), float(i)))
        means.append(obs.sample().mean().item())
    assert abs(sum(means) / len(means) - 4.5) < 0.5


def test_channel_axis_1_for_heads():
    obs = ReservoirObserver(channel_axis=1)
    x = torch.arange(3.0).reshape(1, 3, 1, 1).expand(2, 3, 4, 5)
    obs.update(x)
    assert obs.sample().shape == (2 * 4 * 5, 3)
    assert obs.hi.tolist() == [0.0, 1.0, 2.0]


def _reference_update(state: dict, rows: torch.Tensor, keys: torch.Tensor, cap: int) -> None:
    """The reservoir rule written plainly: append every row, then keep the rows of the top `cap` keys."""
    if state["rows"] is not None:
        rows, keys = torch.cat([state["rows"], rows]), torch.cat([state["keys"], keys])
    if rows.shape[0] > cap:
        keep = keys.topk(cap).indices
        rows, keys = rows[keep], keys[keep]
    state["rows"], state["keys"] = rows, keys


def test_sample_equals_the_plain_reservoir_rule_with_and_without_cuts():
    g = torch.Generator().manual_seed(3)
    for max_elements, axis in ((10_000, -1), (8 * 13, -1), (4 * 7, 1), (8, -1)):
        obs = ReservoirObserver(channel_axis=axis, max_elements=max_elements, seed=5)
        keys_gen = torch.Generator().manual_seed(5)
        state = {"rows": None, "keys": None}
        for i in range(6):
            x = torch.randn(2, 4, 8, generator=g) * (i + 1)
            obs.update(x)
            rows = x.movedim(axis, -1).reshape(-1, x.shape[axis])
            _reference_update(state, rows, torch.rand(rows.shape[0], generator=keys_gen),
                              max(1, max_elements // rows.shape[1]))
            assert torch.equal(obs.sample(), state["rows"]) and torch.equal(obs.keys, state["keys"])
