"""`minmax`: the papers' "base PTQ" — per-channel min-max weights, per-tensor min-max activations.

Every matmul input (Linear inputs, q, k, v, post-softmax) gets a uniform asymmetric quantizer whose
range is the observed min/max of the float model's activations on the calibration set.
"""
from __future__ import annotations

from vitquant.methods.base import Method
from vitquant.methods.steps import fit_weights, observe_and_fit
from vitquant.quantizers import RangeRule, UniformQuantizer


class MinMax(Method):
    name = "minmax"
    summary = "base PTQ: per-channel min-max weights, per-tensor min-max activations"
    activation_rule = RangeRule("minmax")

    def calibrate(self, ctx) -> None:
        fit_weights(ctx.qmodel, ctx.plan, RangeRule("minmax"))
        # min-max ranges need the extremes only, not a sample of every site's values
        choose = lambda site, bits: (UniformQuantizer(bits), self.activation_rule)  # noqa: E731
        observe_and_fit(ctx, choose, sample=lambda site: self.activation_rule.kind != "minmax")
