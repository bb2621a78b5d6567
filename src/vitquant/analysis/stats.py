"""Streaming float statistics of one tensor stream (an activation site over batches, or a weight):
range, percentiles and a histogram from a bounded random sample, and the inter-channel spread.

Inter-channel spread = max over channels of max|x| divided by the median over channels of max|x|: the
ratio that makes one per-tensor grid waste its levels on a few outlier channels (post-LayerNorm inputs
of ImageNet ViTs reach 10–100×; RepQ-ViT, Lin et al. FQ-ViT §3.2). Channels are the last axis, except
for a convolution's input (axis 1).
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any

import torch

SAMPLE = 20_000  # values kept per stream for percentiles and histograms
BINS = 60


def sqnr_db(signal: float, noise: float) -> float:
    """10·log10(‖x‖² / ‖x̂ − x‖²); +inf for an exact copy (kept as None in JSON)."""
    if noise <= 0.0:
        return math.inf
    if signal <= 0.0:
        return -math.inf
    return 10.0 * math.log10(signal / noise)


@dataclass
class StreamStats:
    channel_axis: int = -1
    seed: int = 0
    count: int = 0
    lo: float = math.inf
    hi: float = -math.inf
    sumsq: float = 0.0
    channel_absmax: torch.Tensor | None = None
    sample: list[torch.Tensor] = field(default_factory=list)
    _kept: int = 0

    def update(self, x: torch.Tensor) -> None:
        x = x.detach().float()
        self.count += x.numel()
        self.lo, self.hi = min(self.lo, x.min().item()), max(self.hi, x.max().item())
        self.sumsq += x.double().pow(2).sum().item()
        axis = self.channel_axis % x.dim()
        cmax = x.abs().movedim(axis, -1).reshape(-1, x.shape[axis]).amax(0)
        self.channel_absmax = cmax if self.channel_absmax is None else torch.maximum(self.channel_absmax, cmax)
        flat = x.reshape(-1)
        want = min(flat.numel(), max(1, SAMPLE // 4))  # a few batches fill the sample with a mix of them
        if self._kept < SAMPLE:
            gen = torch.Generator().manual_seed(self.seed + self._kept)
            idx = torch.randperm(flat.numel(), generator=gen)[:want]
            self.sample.append(flat[idx].cpu())
            self._kept += want

    def values(self) -> torch.Tensor:
        return torch.cat(self.sample) if self.sample else torch.zeros(0)

    def channel_spread(self) -> float | None:
        c = self.channel_absmax
        if c is None or c.numel() < 2:
            return None
        med = c.median().item()
        return c.max().item() / med if med > 0 else math.inf

    def top_channels(self, k: int = 6) -> list[int]:
        c = self.channel_absmax
        return [] if c is None else c.topk(min(k, c.numel())).indices.tolist()

    def summary(self) -> dict[str, Any]:
        v = self.values()
        q = torch.quantile(v, torch.tensor([0.001, 0.5, 0.999])).tolist() if v.numel() else [0.0, 0.0, 0.0]
        return {"min": self.lo, "max": self.hi, "p0.1": q[0], "median": q[1], "p99.9": q[2],
                "rms": math.sqrt(self.sumsq / max(self.count, 1)), "channel_spread": self.channel_spread(),
                "channels": None if self.channel_absmax is None else int(self.channel_absmax.numel()),
                "top_channels": self.top_channels()}

    def histogram(self, bins: int = BINS) -> dict[str, list[float]]:
        v = self.values()
        if not v.numel():
            return {"edges": [], "counts": []}
        lo, hi = v.min().item(), v.max().item()
        if hi <= lo:
            hi = lo + 1e-6
        counts = torch.histc(v, bins=bins, min=lo, max=hi)
        edges = torch.linspace(lo, hi, bins + 1)
        return {"edges": [round(e, 6) for e in edges.tolist()], "counts": [int(c) for c in counts.tolist()]}

    def channel_profile(self) -> list[float]:
        return [] if self.channel_absmax is None else [round(v, 6) for v in self.channel_absmax.tolist()]
