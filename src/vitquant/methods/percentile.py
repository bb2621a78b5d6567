"""`percentile`: base PTQ with activation ranges clipped at a percentile instead of the extremes.

Clipping the rare largest activations buys resolution for the bulk; weights stay per-channel min-max.
"""
from __future__ import annotations

from dataclasses import dataclass

from vitquant.methods.minmax import MinMax
from vitquant.quantizers import RangeRule


@dataclass
class PercentileOptions:
    percentile: float = 0.9999  # upper clip; the lower clip is 1 - percentile

    def __post_init__(self) -> None:
        if not 0.5 < self.percentile <= 1.0:
            raise ValueError(f"percentile must be in (0.5, 1.0], got {self.percentile}")


class Percentile(MinMax):
    name = "percentile"
    summary = "base PTQ with percentile-clipped activation ranges (default 99.99%)"
    Options = PercentileOptions

    def calibrate(self, ctx) -> None:
        self.activation_rule = RangeRule("percentile", percentile=self.options(ctx.config).percentile)
        super().calibrate(ctx)
