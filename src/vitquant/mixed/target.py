"""An accuracy target: raise the precision of the fewest, most sensitive points until the top-1 drop on
held-out labelled images is at most `max_drop` points (Intel Neural Compressor's and NNCF's
`quantize_with_accuracy_control(max_drop=…)`: they revert the most sensitive layers to float).

Recipe:
1. The held-out set is split in two fixed halves: *validation* (even positions) steers the search,
   *reporting* (odd positions) gives the final number, which no decision has seen. Neither may be the
   calibration images (the CLI refuses the same folder for both; the bundled data calibrate on the train
   split and hold out the test split).
2. Quantize with the config; if the validation drop already holds, stop.
3. Rank the points by the output KL (on the calibration images) with only that point quantized — the
   analyzer's offenders order. NNCF ranks by reverting one layer in the quantized model (leave-one-out);
   on the stress models, where several points each break the output alone, reverting any single one
   changes nothing and that ranking came out as noise (head.input, the culprit, ranked last).
4. Phase "8-bit": raise the top-k points below 8 bits to 8 — k by doubling (1, 2, 4, …) until the
   target holds, then bisection between the last failing and first passing k, so the result is the
   smallest k in that order whose neighbour k−1 was measured failing. Each trial calibrates the method
   anew with the raised points (every method reads the per-point plan) and evaluates on validation.
5. If all raised to 8 still miss, phase "float" keeps them at 8 and turns the top-k quantized points
   float, searched the same way; all float is the float model, so the search always ends.
Points the user's own site_bits/keep_float decide are left as they are. The path of trials is reported.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Callable

from torch import nn

from vitquant.analysis.calibrated import calibrate_unfrozen
from vitquant.analysis.sensitivity import measure
from vitquant.api import quantize
from vitquant.calibration.data import CalibrationSet, LabeledSet
from vitquant.config import QuantConfig
from vitquant.errors import VitquantError
from vitquant.evaluate import predict_logits
from vitquant.mixed.tables import plan_bits
from vitquant.plan import pinned_points, with_point_bits


@dataclass
class Trial:
    phase: str  # "start", "8-bit" or "float"
    k: int  # points changed in this phase
    changed: int  # points changed in all (phase "float" also counts the points raised to 8)
    val_top1: float
    drop: float
    size_bytes: int
    met: bool

    def to_dict(self) -> dict[str, Any]:
        return dict(self.__dict__)


@dataclass
class TargetResult:
    max_drop: float
    float_val_top1: float
    path: list[Trial]
    final: Trial
    config: QuantConfig
    changes: dict[str, int | None]  # point → its new bits (None: float)
    ranking: list[str]
    report: dict[str, Any] = field(default_factory=dict)  # the reporting half
    qmodel: nn.Module | None = None

    @property
    def met(self) -> bool:
        return self.final.met

    def to_dict(self) -> dict[str, Any]:
        return {"max_drop": self.max_drop, "met_on_validation": self.met, "float_val_top1": self.float_val_top1,
                "changed_points": len(self.changes),
                "changes": {p: ("float" if b is None else b) for p, b in self.changes.items()},
                "final": self.final.to_dict(), "path": [t.to_dict() for t in self.path], "report": self.report,
                "ranking_top": self.ranking[:20]}


def split_holdout(data: LabeledSet) -> tuple[LabeledSet, LabeledSet]:
    if len(data) < 2:
        raise VitquantError(f"the held-out set has {len(data)} image(s); an accuracy target needs a validation and "
                            "a reporting half")

    def half(start: int, what: str) -> LabeledSet:
        return LabeledSet(data.images[start::2], data.labels[start::2],
                          f"{data.source}, {what} half ({len(data.labels[start::2])} images)", data.classes, [])

    return half(0, "validation (even positions)"), half(1, "reporting (odd positions)")


def _top1(model: nn.Module, data: LabeledSet) -> float:
    return (predict_logits(model, data, progress=False).argmax(1) == data.labels).double().mean().item() * 100


def sensitivity_ranking(model: nn.Module, config: QuantConfig, calib: CalibrationSet, keep: set[str]) -> list[str]:
    """Quantized points, worst first by the output KL with only that point quantized (the analyzer's
    offenders order). Not leave-one-out: with several points each breaking the output on its own,
    reverting any one of them changes nothing and that ranking is noise (seen on the stress models)."""
    cal = calibrate_unfrozen(model, config, calib)
    sens = measure(cal, calib.images, fisher=False)
    return sorted((p for p in sens if p not in keep), key=lambda p: -sens[p].kl)


def _search(n: int, trial: Callable[[int], Trial]) -> Trial | None:
    """The smallest k in 1..n for which trial(k) meets the target, by doubling then bisection."""
    lo, hi, k = 0, None, 1
    while k < n:
        t = trial(k)
        if t.met:
            hi = (k, t)
            break
        lo, k = k, 2 * k
    if hi is None:
        t = trial(n)
        if not t.met:
            return None
        hi = (n, t)
    while hi[0] - lo > 1:
        mid = (lo + hi[0]) // 2
        t = trial(mid)
        if t.met:
            hi = (mid, t)
        else:
            lo = mid
    return hi[1]


def meet_target(model: nn.Module, config: QuantConfig, calib: CalibrationSet, holdout: LabeledSet, max_drop: float,
                keep: set[str] | None = None, progress: bool = False) -> TargetResult:
    """keep: points never changed (default: those the config's own globs decide, and the image site)."""
    if not isinstance(max_drop, (int, float)) or isinstance(max_drop, bool) or not 0 <= max_drop < 100:
        raise VitquantError(f"max_drop must be a number of top-1 points in [0, 100), got {max_drop!r}")
    val, rep = split_holdout(holdout)
    float_val = _top1(model, val)
    path: list[Trial] = []
    last_met: list = [None, None]  # (trial, model): the search's answer is always the last trial that met

    def run(phase: str, k: int, changes: dict[str, int | None]) -> Trial:
        q = quantize(model, with_point_bits(config, changes), calib, progress=False)
        acc = _top1(q, val)
        t = Trial(phase, k, len(changes), acc, float_val - acc, q.size_bytes(), float_val - acc <= max_drop)
        path.append(t)
        if t.met:
            last_met[:] = [t, q]
        if progress:
            print(f"  {phase} k={k}: validation top-1 {acc:.2f} (drop {t.drop:.2f})", flush=True)
        return t

    start = run("start", 0, {})
    changes: dict[str, int | None] = {}
    final = start
    ranking: list[str] = []
    if not start.met:
        if keep is None:
            from vitquant.models import prepare

            keep = pinned_points(config, prepare(model).structure)
        ranking = sensitivity_ranking(model, config, calib, keep)
        bits = plan_bits(model, config)
        low = [p for p in ranking if (bits.get(p) or 32) < 8]
        raise8 = lambda k: {p: 8 for p in low[:k]}  # noqa: E731
        found = _search(len(low), lambda k: run("8-bit", k, raise8(k))) if low else None
        if found is not None:
            final, changes = found, raise8(found.k)
        else:
            floated = lambda k: {**raise8(len(low)), **{p: None for p in ranking[:k]}}  # noqa: E731
            found = _search(len(ranking), lambda k: run("float", k, floated(k)))
            if found is None:  # cannot happen unless evaluation is not deterministic
                raise VitquantError("even the float fallback of every point missed the accuracy target")
            final, changes = found, floated(found.k)
    assert last_met[0] is final
    q = last_met[1]
    float_rep, q_rep = _top1(model, rep), _top1(q, rep)
    result = TargetResult(max_drop, float_val, path, final, with_point_bits(config, changes), changes, ranking,
                          {"data": rep.source, "float_top1": float_rep, "top1": q_rep, "drop": float_rep - q_rep,
                           "validation": val.source}, q)
    return result
