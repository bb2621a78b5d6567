"""`minmax`: the papers' "base PTQ" — per-channel min-max weights, per-tensor min-max activations.

Every matmul input (Linear inputs, q, k, v, post-softmax) gets a uniform asymmetric quantizer whose
range is the observed min/max of the float model's activations on the calibration set.
"""
from __future__ import annotations

from vitquant.calibration.engine import observe_float
from vitquant.methods.base import Method
from vitquant.methods.steps import fit_activations, fit_weights
from vitquant.quantizers import RangeRule, UniformQuantizer


class MinMax(Method):
    name = "minmax"
    summary = "base PTQ: per-channel min-max weights, per-tensor min-max activations"
    activation_rule = RangeRule("minmax")

    def calibrate(self, qmodel, calib, config, progress=True) -> None:
        fit_weights(qmodel, config.w_bits, RangeRule("minmax"))
        observers = observe_float(qmodel, list(calib.batches()), seed=config.seed, progress=progress)
        plan = lambda site, bits: (UniformQuantizer(bits), self.activation_rule)  # noqa: E731
        fit_activations(qmodel, observers, plan, config.a_bits, config.patch_embed_input_bits)
