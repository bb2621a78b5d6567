"""`ias-vit`: I&S-ViT, Zhong et al., "I&S-ViT: An Inclusive & Stable Method for Pushing the Limit of
Post-Training ViTs Quantization", arXiv 2311.10126 (TPAMI 2025). Official code: zysxmu/IaS-ViT.

Recipe:
- Quantizers: uniform asymmetric everywhere (weights per output channel, activations layer-wise with
  the percentile-MSE search over {0.999, 0.9999, 0.99999}); post-softmax with SULQ, the
  shift-uniform-log2 quantizer (quantizers/sulq.py), η grid-searched by MSE and frozen.
- Three-stage smooth optimisation (SOS), with block reconstruction (methods/reconstruction.py): the
  patch-embedding conv and the head are reconstructed as single layers, every block as a unit.
  1. Weights float; post-LayerNorm inputs (qkv, fc1) channel-wise, all other activations layer-wise.
     Block-wise MSE reconstruction updates the float weights and biases (Adam, lr 4e-5, cosine) with
     every quantizer parameter frozen — channel-wise quantization gives the smooth loss landscape.
  2. RepQ-ViT reparameterization of the post-LayerNorm quantizers, channel-wise → layer-wise
     (repq_vit.reparameterize_post_ln): lossless, since the weights are still float.
  3. Weight quantizers are fitted on the current weights (per channel, MSE over the official code's
     percentiles) and switched on with a straight-through round; the same reconstruction runs again.
The teacher of both stages is the original float model.

Defaults and sizing. The paper uses 1024 calibration images, batch 64, 1000 iterations per unit and
stage at 3/4 bits and 200 at 6 bits (~31 min for 3-bit DeiT-S on an RTX 3090). On 2 CPU cores one
iteration of a 192-wide block at batch 32 takes 30-90 ms, so the reference schedule runs a fifth of
that: 200 iterations when min(w_bits, a_bits) ≤ 4, else 40, at batch 32 (`paper_iters` gives the
paper's; pass `iters=1000` to follow it). On a real-size model (DeiT-S: ~1.5 CPU-s per step at batch
32) that would be ~1,100 float forwards, so `schedule="auto"` (the default) switches such models, when
calibrated on a CPU (a GPU keeps the reference schedule), to the CPU schedule, at most 100 iterations at batch 8 (DeiT-S W4A4: 266× the float forward, 964 CPU-s, 10 min wall at 2 threads; see
schedule_for); its accuracy effect on a real model cannot be measured here (no pretrained weights);
on the bundled model, forced with `schedule="cpu"`: see benchmarks/results/accuracy_notes.md. On the bundled 6-block model, 200 iterations already lift W3A3 from
93.3 % (calibration only) to 95.9 % top-1 (256 images).

Calibration images: the method uses config.calib_size as given (32 by default). The paper trains on
1024; `recommended_calib_size` = 256 is what we suggest (`QuantConfig(..., calib_size=256)`) for
longer schedules, where 32 images are revisited hundreds of times. At the CPU default the bundled
model showed no overfitting: W3A3 reached 96.2 % top-1 with 32 images and 95.9 % with 256 (1000 test
images, ±0.5 standard error).

Deviations from the paper / official code:
- Activation ranges are fitted on the float model's statistics ("parallel", as repq-vit here); the
  code initialises them in a forward with activation quantization on and float weights.
- The patch-embedding input is quantized at `patch_embed_input_bits` (8, as RepQ-ViT); I&S-ViT's code
  leaves it float (pass patch_embed_input_bits=None for that).
- The reparameterized zero point is rounded to an integer (see repq_vit.py); the code keeps the mean.
- SULQ follows the paper's uniform quantizer (2^b codes, integer zero point); see quantizers/sulq.py.
- Stage-1 block inputs come from the float model, stage-3 inputs from the quantized model, as in the
  official code (the paper does not say); option `stage1_inputs="quantized"` uses the quantized
  model's inputs in stage 1 too.
- Option `reparam_head` (default "auto"; not in the paper or code) also runs the final norm → head input
  through stages 1-2, like repq-vit's option of the same name: "auto" only where that input's channel
  ranges spread > 10× (the outlier-stress models); false is the published recipe.
- The reconstruction loss sums squared errors over channels (BRECQ's lp_loss sums over dim 1, which is
  the token axis of a [B, N, C] ViT activation); the two differ only by a constant factor per unit.
- Options `early_stop` (a fraction: stop a unit's stage when its windowed loss improves by less) and
  `bf16` (bfloat16 autocast in the optimisation forwards) are CPU-cost options, off by default; their
  accuracy effect has not been measured yet, so the defaults stay the full schedule in float32.
- A unit whose output error is worse after its stage than before is put back (reconstruction.py).
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar, Literal

import torch

from vitquant.errors import VitquantError
from vitquant.methods.base import Method
from vitquant.methods.reconstruction import ReconstructionOptions, float_teacher, reconstruct_blocks
from vitquant.methods.repq_vit import HeadChoice, ReparamChoice, reparameterize_post_ln
from vitquant.methods.steps import REAL_SIZE_FLOATS  # noqa: F401  (re-exported: schedule_for's threshold)
from vitquant.methods.steps import fit_weights, largest_unit_output, observe_and_fit, schedule_name
from vitquant.models import roles
from vitquant.quantizers import RangeRule, UniformQuantizer
from vitquant.quantizers.sulq import DEFAULT_ETAS, ShiftUniformLog2Quantizer

# official code: activation and weight percentile candidates (quant/quantizer.py, init_quantization_scale)
ACT_PERCENTILES = (0.999, 0.9999, 0.99999)
WEIGHT_PERCENTILES = (0.97, 0.98, 0.99, 0.995, 0.9995, 0.9997, 0.9999, 0.99995, 0.99999)


@dataclass
class IaSViTOptions:
    iters: int | None = None  # per unit and stage; None: from `schedule`
    batch_size: int | None = None  # None: from `schedule`
    schedule: Literal["auto", "reference", "cpu"] = "auto"  # see schedule_for
    lr: float = 4e-5
    stage1_inputs: Literal["float", "quantized"] = "float"
    reparam_head: HeadChoice = "auto"  # also treat the final norm → head input channel-wise, then reparameterize
    etas: tuple[float, ...] = DEFAULT_ETAS
    act_candidates: tuple[float, ...] = ACT_PERCENTILES
    weight_candidates: tuple[float, ...] = WEIGHT_PERCENTILES
    early_stop: float = 0.0  # stop a unit's stage when its loss plateaus (reconstruction.py); 0: every step
    bf16: bool = False  # reconstruction forwards under bfloat16 autocast

    def __post_init__(self) -> None:
        if self.iters is not None and (not isinstance(self.iters, int) or self.iters < 0):
            raise ValueError(f"iters must be None or a non-negative integer, got {self.iters!r}")
        if self.batch_size is not None and (not isinstance(self.batch_size, int) or self.batch_size < 1):
            raise ValueError(f"batch_size must be None or a positive integer, got {self.batch_size!r}")
        if self.schedule not in ("auto", "reference", "cpu"):
            raise ValueError(f"schedule must be 'auto', 'reference' or 'cpu', got {self.schedule!r}")
        if self.stage1_inputs not in ("float", "quantized"):
            raise ValueError(f"stage1_inputs must be 'float' or 'quantized', got {self.stage1_inputs!r}")
        self.etas = tuple(float(e) for e in self.etas)
        if not self.etas or min(self.etas) <= 0:
            raise ValueError(f"etas must be positive shifts, got {self.etas!r}")
        self.act_candidates = tuple(float(c) for c in self.act_candidates)
        self.weight_candidates = tuple(float(c) for c in self.weight_candidates)
        RangeRule("mse", candidates=self.act_candidates)  # validates
        RangeRule("mse", candidates=self.weight_candidates)
        self.reconstruction("float", "float", 0, 0, self.batch_size or 32)  # validates lr

    def reconstruction(self, weights: str, inputs: str, iters: int, seed: int, batch_size: int) -> ReconstructionOptions:
        # every quantizer parameter stays frozen in both stages: only weights and biases learn
        return ReconstructionOptions(iters=iters, batch_size=batch_size, weights=weights, inputs=inputs,
                                     learn_act_scales=False, weight_lr=self.lr, seed=seed,
                                     early_stop=self.early_stop, bf16=self.bf16)


def paper_iters(w_bits: int, a_bits: int) -> int:
    """The README's schedule: 1000 iterations at W3A3/W4A4, 200 at W6A6 (and above)."""
    return 1000 if min(w_bits, a_bits) <= 4 else 200


def cpu_iters(w_bits: int, a_bits: int) -> int:
    """The reference schedule: a fifth of the paper's, so CPU runs take minutes."""
    return paper_iters(w_bits, a_bits) // 5


CPU_SCHEDULE = (100, 8)  # (iterations at most, batch): real-size models' default on a CPU


def schedule_for(opts: "IaSViTOptions", w_bits: int, a_bits: int, unit_floats: int,
                 device: torch.device) -> tuple[int, int]:
    """(iterations per unit and stage, batch size). "reference": cpu_iters at batch 32, sized for the
    17-token reference models (on the bundled model W3A3 93.3 → 95.9); "cpu": at most 100 iterations at
    batch 8 — a DeiT-S step at batch 32 costs ~3× one at batch 8 and ~1.5 CPU-s, so the reference
    schedule would be ~6× this one (benchmarks/results/calibration_cost.md); "auto" (default): "cpu" for
    real-size models (a unit output of ≥ REAL_SIZE_FLOATS per image) on a CPU `device`, else "reference". Explicit
    `iters` / `batch_size` override either."""
    name = schedule_name(opts.schedule, unit_floats, device)
    iters, batch = cpu_iters(w_bits, a_bits), 32
    if name == "cpu":
        iters, batch = min(iters, CPU_SCHEDULE[0]), CPU_SCHEDULE[1]
    return (iters if opts.iters is None else opts.iters), (batch if opts.batch_size is None else opts.batch_size)


class IaSViT(Method):
    name = "ias-vit"
    summary = "I&S-ViT (TPAMI'25): shift-uniform-log2 softmax quantizer + three-stage block reconstruction"
    Options = IaSViTOptions
    recommended_calib_size: ClassVar[int] = 256

    def calibrate(self, ctx) -> None:
        qmodel, calib, config, plan, progress = ctx.qmodel, ctx.calib, ctx.config, ctx.plan, ctx.progress
        opts = self.options(config)
        unit_floats = largest_unit_output(qmodel, ctx.structure.units, ctx.images())
        iters, batch = schedule_for(opts, config.w_bits, config.a_bits, unit_floats, ctx.device)
        act_rule = RangeRule("mse", candidates=opts.act_candidates)
        reparam = ReparamChoice(ctx, opts.reparam_head, every_layer=True)

        def choose(site, bits):
            if site.role == roles.POST_SOFTMAX:
                return ShiftUniformLog2Quantizer(bits, opts.etas), act_rule
            return UniformQuantizer(bits, channel_axis=site.channel_axis if reparam.channel_wise(site) else None), act_rule

        teacher = float_teacher(qmodel, ctx.float_model)  # the original float model: both stages' targets
        # Stage 1: float weights, channel-wise post-LN activations; reconstruction trains the weights
        observe_and_fit(ctx, choose)
        mappings = reparam.mappings()
        stage1 = opts.reconstruction("float", opts.stage1_inputs, iters, config.seed, batch)
        reconstruct_blocks(qmodel, calib, stage1, progress=progress, teacher=teacher)
        # Stage 2: channel-wise → layer-wise, lossless while weights are float
        for mapping in mappings:
            if qmodel.submodule(mapping.layers[0]).input_site.quantizer is None:
                raise VitquantError(f"ias-vit: {mapping.layers[0]} has no input quantizer to reparameterize")
            reparameterize_post_ln(qmodel, mapping)
        # Stage 3: weight quantization on (straight-through), the same reconstruction again
        fit_weights(qmodel, plan, RangeRule("mse", candidates=opts.weight_candidates))
        stage3 = opts.reconstruction("ste", "quantized", iters, config.seed + 1, batch)
        reconstruct_blocks(qmodel, calib, stage3, progress=progress, teacher=teacher)
