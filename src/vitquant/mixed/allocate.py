"""Bits per quantization point under a budget, by three criteria (weights 3/4/6/8/float, activations
4/6/8/float by default; budget.py says what the budget counts).

- "fisher" (Hessian/Fisher knapsack): cost of point p at b bits = its Fisher proxy ½Σ(g ⊙ δ_b)² measured
  in the model calibrated at b (sensitivity.py); Σ cost minimized exactly (to a 1/4000 grid of the
  spare budget, rounded so the budget always holds) by a multiple-choice knapsack dynamic programme.
  The additive, diagonal form is HAWQ-V3's ILP objective with the Fisher in place of the Hessian trace.
- "mptq" (MPTQ-ViT's greedy allocation, Tai & Wu 2024): the paper's objective is not public beyond
  "greedily lowers/raises layer bit-widths considering accuracy and compressibility". Our design: start
  with every point float and repeatedly take the one-rung lowering (float→8→6→4→3) with the least
  *measured* output KL increase per bit saved (Δ KL / Δ n·b, the accuracy/compressibility ratio),
  until the budget holds. The KL of a point at b is measured with only that point quantized.
- "lrp" (LRP-QViT, Ranjan & Savakis 2024, and its sensitivity extension Mix-QViT): the layer-relevance
  scores of LRP decide how much each point matters; LRP-QViT's score-to-bits mapping is not public. Our
  design: cost = relevance_p × relative noise_p(b) (‖δ_b‖²/‖x‖², the Mix-QViT "quantization
  sensitivity" term as SQNR rather than accuracy), minimized by the same knapsack. Relevance is LRP-0
  (gradient × input of the top-1 logit) on the float model, see sensitivity.relevance.
Weights and activations are separate budgets and separate problems (the costs are additive).

Not taken from the papers: MPTQ-ViT's SQ-b (SmoothQuant with bias) and OPT-m (post-GELU scale-ratio search),
and LRP-QViT/Mix-QViT's clipped channel-wise post-LN quantization are calibration techniques, not
allocation; here any registered method calibrates the chosen plan. Both papers allocate per *layer*;
we allocate per point (each activation site and each weight separately), which the additive costs allow.
The budget counts float as 32 bits and weights activations by elements (budget.py): the papers' "average
bit width" is, as far as the abstracts say, a plain mean over layers, which does not track size (a small
layer at 8 bits weighs as much as a large one).
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

import numpy as np

from vitquant.config import QuantConfig
from vitquant.errors import VitquantError
from vitquant.mixed.budget import Budget, level_bits, weight_avg_allowed
from vitquant.mixed.tables import SensitivityTable
from vitquant.plan import with_point_bits

CRITERIA = ("fisher", "mptq", "lrp")
GRID = 4000

Option = tuple[int | None, float, float]  # (level, resource n·bits, cost)


@dataclass
class Allocation:
    criterion: str
    budget: Budget
    bits: dict[str, int | None]  # every point the allocator chose for
    avg_weight_bits: float  # planned, pinned points included
    avg_act_bits: float
    size_bytes: int  # planned deployed size
    objective: float  # Σ cost of the chosen levels
    probe: str

    def config(self, base: QuantConfig) -> QuantConfig:
        return with_point_bits(base, self.bits)

    def counts(self) -> dict[str, int]:
        out: dict[str, int] = {}
        for p, b in self.bits.items():
            key = f"{'w' if p.endswith('.weight') else 'a'}{'float' if b is None else b}"
            out[key] = out.get(key, 0) + 1
        return dict(sorted(out.items()))

    def to_dict(self) -> dict[str, Any]:
        return {"criterion": self.criterion, "budget": {"avg_bits": self.budget.avg_bits,
                                                        "size_mb": self.budget.size_mb},
                "avg_weight_bits": round(self.avg_weight_bits, 4), "avg_act_bits": round(self.avg_act_bits, 4),
                "size_bytes": self.size_bytes, "objective": self.objective, "probe": self.probe,
                "counts": self.counts(), "bits": {p: ("float" if b is None else b) for p, b in self.bits.items()}}


def point_cost(table: SensitivityTable, criterion: str, point: str, level: int | None) -> float:
    c = table.costs[point][level]
    if criterion == "fisher":
        return c["fisher"]
    if criterion == "mptq":
        return c["kl"]
    return table.relevance.get(point, 0.0) * c["rel_noise"]


def knapsack(items: list[list[Option]], capacity: float, grid: int = GRID) -> list[int]:
    """Index of the chosen option per item: minimum Σ cost with Σ resource ≤ capacity (multiple-choice
    knapsack by dynamic programming over the spare resource, each option's extra resource rounded up)."""
    floor = sum(min(o[1] for o in opts) for opts in items)
    if floor > capacity * (1 + 1e-12):
        raise _infeasible(floor, capacity)
    unit = max((capacity - floor) / grid, 1e-12)
    dp = np.full(grid + 1, np.inf)
    dp[0] = 0.0
    choice = np.zeros((len(items), grid + 1), dtype=np.int16)
    extra = []
    for i, opts in enumerate(items):
        rmin = min(o[1] for o in opts)
        units = [math.ceil((o[1] - rmin) / unit - 1e-9) for o in opts]
        extra.append(units)
        new = np.full(grid + 1, np.inf)
        arg = np.zeros(grid + 1, dtype=np.int16)
        for j, (_, _, cost) in enumerate(opts):
            e = units[j]
            if e > grid:
                continue
            cand = np.full(grid + 1, np.inf)
            cand[e:] = dp[: grid + 1 - e] + cost
            better = cand < new
            new[better], arg[better] = cand[better], j
        dp, choice[i] = new, arg
    u = int(np.argmin(dp))
    picked = [0] * len(items)
    for i in range(len(items) - 1, -1, -1):
        picked[i] = int(choice[i, u])
        u -= extra[i][picked[i]]
    return picked


def greedy_descent(items: list[list[Option]], capacity: float) -> list[int]:
    """MPTQ-style: from the most expensive option of each item, lower one rung at a time, always the
    rung with the least cost increase per unit of resource saved, until Σ resource ≤ capacity."""
    order = [sorted(range(len(opts)), key=lambda j: opts[j][1]) for opts in items]
    pos = [len(o) - 1 for o in order]
    total = sum(items[i][order[i][pos[i]]][1] for i in range(len(items)))
    while total > capacity * (1 + 1e-12):
        best, best_ratio = None, math.inf
        for i, opts in enumerate(items):
            if pos[i] == 0:
                continue
            hi, lo = opts[order[i][pos[i]]], opts[order[i][pos[i] - 1]]
            saved = hi[1] - lo[1]
            ratio = (lo[2] - hi[2]) / saved if saved > 0 else math.inf
            if ratio < best_ratio:
                best, best_ratio = i, ratio
        if best is None:
            raise _infeasible(total, capacity)
        hi, lo = items[best][order[best][pos[best]]], items[best][order[best][pos[best] - 1]]
        total -= hi[1] - lo[1]
        pos[best] -= 1
    return [order[i][pos[i]] for i in range(len(items))]


def _infeasible(need: float, capacity: float) -> VitquantError:
    return VitquantError(f"the budget is below what the lowest bit widths need ({need:.4g} bit-elements against "
                         f"{capacity:.4g} allowed); raise --avg-bits / --size-mb or allow fewer bits")


def allocate(table: SensitivityTable, budget: Budget, criterion: str = "fisher") -> Allocation:
    if criterion not in CRITERIA:
        raise VitquantError(f"unknown allocation criterion {criterion!r}; choose one of {', '.join(CRITERIA)}")
    fp = table.footprint
    bits: dict[str, int | None] = {}
    objective = 0.0
    for kind in ("weight", "act"):
        free = table.points(kind)
        every = table.all_points(kind)
        avg = weight_avg_allowed(budget, fp, every) if kind == "weight" else budget.avg_bits
        if avg is None or not free:
            continue  # size_mb alone: activations keep the config's bits
        pinned_use = sum(fp.elements[p] * level_bits(table.pinned[p]) for p in every if p not in free)
        capacity = avg * sum(fp.elements[p] for p in every) - pinned_use
        items = [[(lv, fp.elements[p] * level_bits(lv), point_cost(table, criterion, p, lv))
                  for lv in table.levels[p]] for p in free]
        try:
            picked = (greedy_descent if criterion == "mptq" else knapsack)(items, capacity)
        except VitquantError as e:
            raise VitquantError(f"{kind}s at an average of {avg:.3g} bits: {e}") from None
        for p, opts, j in zip(free, items, picked):
            bits[p] = opts[j][0]
            objective += opts[j][2]
    full = {p: table.default_bits[table.kind[p]] for p in table.free} | table.pinned | bits
    weights, acts = table.all_points("weight"), table.all_points("act")
    return Allocation(criterion, budget, bits, fp.avg(full, weights), fp.avg(full, acts),
                      fp.weight_bytes(full, weights), objective, table.probe)
