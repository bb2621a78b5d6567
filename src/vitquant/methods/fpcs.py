"""FPCS, the fast progressive combining search of AdaLog (Wu et al., ECCV'24, §3.3), as a reusable step.

A quantizer's parameters are searched per group (a tensor, an output channel, a head) by the error
they cause, evaluated for many candidates in one batched pass:
1. Percentile-based candidates: ranges interpolated between the [p, 1−p] percentile range (p = 0.9)
   and the min-max range, `n_scale` scales, each with `n_zp` zero points around the range's own.
2. Keep the `top_k` best of each group.
3. Refine: around each kept candidate, `n_new` new scales spaced across ±δ/2 (δ = the current scale
   spacing), then δ ← δ/(n_new − ½); keep the `top_k` best again; `steps` rounds in all, then the best.
"Combining": the second parameter of a candidate (the zero point, or AdaLog's log base q) is combined
with every scale of the first stage and inherited by its refinements.

Deviations from the official code (GoatWu/AdaLog, `quant_layers/*.py`):
- Zero-point candidates sit around each candidate range's own zero point, round(−lo/s); the code
  takes a fixed window around the middle of the integer grid (2^(b−1) ± 8), which cannot represent
  one-sided ranges at 8 bits (e.g. an MNIST image in [−0.42, 2.82]; cf. AdaLog issue #2, W8A8 collapse).
- The kept candidates stay in the pool during refinement, so a refinement step never loses the best
  candidate found so far (the code replaces them by their children, dropping the parent when n_new is
  even).
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import torch

from vitquant.quantizers.ranges import RangeRule, candidate_ranges

_EPS = 1e-8
CHUNK_FLOATS = 2**20  # largest intermediate of one candidate chunk, in floats (4 MiB)
PERCENTILE = 0.9  # the inner end of the candidate ranges (the code's l = 0.9, r = 1.0)

# loss(scale [k, G], aux [k, G]) -> [k, G] error of each of k candidates, per group
LossFn = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]


def _fits(shape: torch.Size, into: torch.Size) -> bool:
    """Does `shape` broadcast into `into` without growing it? (torch.broadcast_shapes costs ~0.15 ms of
    Python per call: 4.4 of adalog's 168 CPU-s on DeiT-S.)"""
    return len(shape) <= len(into) and all(a == 1 or a == b for a, b in zip(reversed(shape), reversed(into)))


def uniform_fake(x: torch.Tensor, scale: torch.Tensor, zero_point: torch.Tensor, bits: int) -> torch.Tensor:
    """Asymmetric uniform fake quantization, broadcasting like UniformQuantizer (same math, so the
    searched error is the error of the installed quantizer). Without autograd the steps run in place on
    one fresh tensor: the same operations in the same order (so the same values) as
    (clamp(round(x / s) + z, 0, 2^b − 1) − z)·s, without a candidate-sized temporary per step. (One
    clamp to tensor bounds [−z, 2^b − 1 − z] would save two passes, but measured 2.5× slower here.)"""
    out = torch.div(x, scale)
    if out.requires_grad or not _fits(zero_point.shape, out.shape):
        return (torch.clamp(torch.round(out) + zero_point, 0, 2**bits - 1) - zero_point) * scale
    return out.round_().add_(zero_point).clamp_(0, 2**bits - 1).sub_(zero_point).mul_(scale)


def evaluate(loss: LossFn, scale: torch.Tensor, aux: torch.Tensor, floats_per_candidate: int) -> torch.Tensor:
    """loss over candidate chunks small enough that one chunk's intermediates fit CHUNK_FLOATS."""
    k = max(1, CHUNK_FLOATS // max(1, floats_per_candidate))
    with torch.no_grad():
        return torch.cat([loss(scale[i:i + k], aux[i:i + k]).float() for i in range(0, scale.shape[0], k)])


def percentile_candidates(rows: torch.Tensor, bits: int, n_scale: int, n_zp: int,
                          extremes: tuple[torch.Tensor, torch.Tensor] | None = None
                          ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(scales [K, G], zero points [K, G], spacing δ [G]) for rows [N, G] (G independent groups).
    extremes: the exact (min, max) [G] of the data when rows are only a sample of it."""
    qmax = 2**bits - 1
    ((lo_p, hi_p),) = candidate_ranges(rows, RangeRule("percentile", percentile=PERCENTILE))
    lo, hi = (rows.amin(dim=0), rows.amax(dim=0)) if extremes is None else extremes
    t = torch.linspace(0, 1, n_scale, device=rows.device)[:, None]
    lo_t, hi_t = lo_p + t * (lo - lo_p), hi_p + t * (hi - hi_p)  # [n_scale, G]
    scale = ((hi_t - lo_t) / qmax).clamp_min(_EPS)
    offsets = torch.arange(n_zp, dtype=torch.float32, device=rows.device)[:, None, None] - n_zp // 2
    zp = (torch.round(-lo_t / scale)[None] + offsets).clamp(0, qmax)  # [n_zp, n_scale, G]
    delta = scale[1] - scale[0] if n_scale > 1 else scale[0] / 4
    G = rows.shape[1]
    return scale.expand(n_zp, -1, -1).reshape(-1, G), zp.reshape(-1, G), delta.clamp_min(_EPS)


@dataclass(frozen=True)
class FPCS:
    candidates: int = 32  # candidates per search stage (the code's eq_n = 128)
    top_k: int = 4  # kept per stage (the code's fpcs_width = 16)
    steps: int = 4  # stages including the first (the code's steps = 6)

    def __post_init__(self) -> None:
        if self.candidates < 2 or self.top_k < 1 or self.steps < 1 or self.top_k > self.candidates:
            raise ValueError(f"FPCS needs candidates ≥ 2, 1 ≤ top_k ≤ candidates, steps ≥ 1; got {self}")

    def grid(self, bits: int) -> tuple[int, int]:
        """(n_scale, n_zp) of the first stage: up to 16 zero points (all of them at 4 bits, as the code)."""
        n_zp = max(1, min(16, 2**bits, self.candidates // 8))
        return max(2, self.candidates // n_zp), n_zp

    @property
    def n_new(self) -> int:
        return max(2, self.candidates // self.top_k)

    def search(self, loss: LossFn, scale: torch.Tensor, aux: torch.Tensor, delta: torch.Tensor,
               floats_per_candidate: int, top_k: int | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        """Best (scale [G], aux [G]) from first-stage candidates scale, aux [K, G]; δ [G] their spacing."""
        losses = evaluate(loss, scale, aux, floats_per_candidate)
        k = min(top_k or self.top_k, scale.shape[0])
        offsets = torch.linspace(0, 1, self.n_new, device=scale.device)[None, :, None] - 0.5
        for _ in range(self.steps - 1):
            keep = losses.topk(k, dim=0, largest=False).indices  # [k, G]
            scale, aux, losses = scale.gather(0, keep), aux.gather(0, keep), losses.gather(0, keep)
            G = scale.shape[1]
            child_s = (scale[:, None] + offsets * delta).reshape(-1, G).clamp_min(_EPS)
            child_a = aux[:, None].expand(-1, self.n_new, -1).reshape(-1, G)
            child_l = evaluate(loss, child_s, child_a, floats_per_candidate)
            scale, aux, losses = torch.cat([scale, child_s]), torch.cat([aux, child_a]), torch.cat([losses, child_l])
            delta = delta / (self.n_new - 0.5)
        best = losses.nan_to_num(nan=float("inf")).argmin(dim=0, keepdim=True)
        return scale.gather(0, best)[0], aux.gather(0, best)[0]

    def search_uniform(self, loss: LossFn, rows: torch.Tensor, bits: int, floats_per_candidate: int,
                       extra: list[tuple[torch.Tensor, torch.Tensor]] = (),
                       extremes: tuple[torch.Tensor, torch.Tensor] | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        """FPCS for an asymmetric uniform quantizer of the groups (columns) of rows [N, G]; `extra`:
        (scale [G], zero point [G]) pairs added to the first-stage candidates (e.g. the current best,
        so that a later round never ends worse than the one before); `extremes`: the exact (min, max)
        [G] when rows are a sample."""
        n_scale, n_zp = self.grid(bits)
        scale, zp, delta = percentile_candidates(rows, bits, n_scale, n_zp, extremes)
        G = scale.shape[1]
        for s, z in extra:
            scale = torch.cat([scale, s.reshape(-1).float().expand(G)[None]])
            zp = torch.cat([zp, z.reshape(-1).float().expand(G)[None]])
        return self.search(loss, scale, zp, delta, floats_per_candidate)
