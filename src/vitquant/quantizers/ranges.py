"""Range setting: which [lo, hi] a quantizer maps onto its grid.

- minmax: the observed extremes.
- percentile: the p and 1−p quantiles (clips rare outliers).
- mse: several candidate ranges (percentiles, optionally a shrinking grid of the min-max range),
  the one with the least quantization MSE wins, per channel (RepQ-ViT picks among percentiles
  {0.999, 0.9999, 0.99999} this way).
All work on a [rows, channels] view; per-tensor is a single channel.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

import torch

RangeKind = Literal["minmax", "percentile", "mse"]
# quantiles of more than 2^24 values come from a strided subsample (sorting cost, same accuracy)
_QUANTILE_LIMIT = 2**24


@dataclass(frozen=True)
class RangeRule:
    kind: RangeKind = "minmax"
    percentile: float = 0.9999  # used by kind="percentile"
    candidates: tuple[float, ...] = (0.999, 0.9999, 0.99999)  # percentiles tried by kind="mse"
    grid: int = 0  # kind="mse": also try the min-max range scaled by (1 - i/(2*grid)), i = 0..grid-1

    def __post_init__(self) -> None:
        if self.kind not in ("minmax", "percentile", "mse"):
            raise ValueError(f"range rule kind must be minmax, percentile or mse, not {self.kind!r}")
        for p in (self.percentile, *self.candidates):
            if not 0.5 < p <= 1.0:
                raise ValueError(f"percentiles must be in (0.5, 1.0], got {p}")
        if self.kind == "mse" and not self.candidates and self.grid < 1:
            raise ValueError("an mse range rule needs percentile candidates or a grid")


def channels_last_2d(x: torch.Tensor, channel_axis: int | None) -> torch.Tensor:
    """[rows, C] view of x with the quantization channel last (C = 1 for per-tensor)."""
    x = x.detach().float()
    if channel_axis is None:
        return x.reshape(-1, 1)
    return x.movedim(channel_axis, -1).reshape(-1, x.shape[channel_axis])


def _quantiles(rows: torch.Tensor, qs: list[float]) -> list[torch.Tensor]:
    """Per-column quantiles with linear interpolation (as torch.quantile). Only the order statistics
    the quantiles need are computed: the extreme ones with two `topk`s (the same values a full sort
    gives, ~10x cheaper for the tail quantiles range rules use), a full sort when the quantiles reach
    into the middle."""
    if rows.numel() > _QUANTILE_LIMIT:
        rows = rows[:: -(-rows.numel() // _QUANTILE_LIMIT)]
    n = rows.shape[0]
    pairs = []
    for q in qs:
        pos = min(max(q, 0.0), 1.0) * (n - 1)
        i = int(pos)
        pairs.append((i, min(i + 1, n - 1), pos - i))
    ranks = {r for i, j, _ in pairs for r in (i, j)}
    k_lo = max((r + 1 for r in ranks if 2 * r < n), default=0)  # the k_lo smallest values
    k_hi = max((n - r for r in ranks if 2 * r >= n), default=0)  # the k_hi largest values
    if k_lo + k_hi > n // 2:
        srt = rows.sort(dim=0).values
        at = lambda r: srt[r]  # noqa: E731
    else:
        low = rows.topk(k_lo, dim=0, largest=False).values if k_lo else None  # ascending
        high = rows.topk(k_hi, dim=0, largest=True).values if k_hi else None  # descending
        at = lambda r: low[r] if 2 * r < n else high[n - 1 - r]  # noqa: E731
    return [at(i) + frac * (at(j) - at(i)) for i, j, frac in pairs]


def candidate_ranges(
    rows: torch.Tensor, rule: RangeRule, lo: torch.Tensor | None = None, hi: torch.Tensor | None = None
) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """Candidate (lo, hi) pairs, each of shape [C]."""
    lo = rows.amin(dim=0) if lo is None else lo.reshape(-1).float()
    hi = rows.amax(dim=0) if hi is None else hi.reshape(-1).float()
    if rule.kind == "minmax":
        return [(lo, hi)]
    pcts = [rule.percentile] if rule.kind == "percentile" else list(rule.candidates)
    values = _quantiles(rows, [1.0 - p for p in pcts] + pcts)
    cands = list(zip(values[: len(pcts)], values[len(pcts):]))
    if rule.kind == "percentile":
        return cands
    cands += [(lo * (1 - i / (2 * rule.grid)), hi * (1 - i / (2 * rule.grid))) for i in range(rule.grid)]
    return cands
