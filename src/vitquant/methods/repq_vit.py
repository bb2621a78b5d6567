"""`repq-vit`: RepQ-ViT, Li et al., "RepQ-ViT: Scale Reparameterization for Post-Training Quantization
of Vision Transformers", ICCV 2023.

Recipe:
1. Weights: per-output-channel asymmetric uniform; range per channel picked by MSE among the
   percentiles {0.999, 0.9999, 0.99999}.
2. Activations (float model's statistics, 32 images): layer-wise asymmetric uniform with the same
   percentile-MSE search; post-softmax with the log√2 quantizer; post-LayerNorm inputs (qkv, fc1)
   channel-wise first.
3. Scale reparameterization: each post-LayerNorm channel-wise quantizer (s_c, z_c) becomes one
   layer-wise (s̃, z̃) = (mean s, mean z) with r = s/s̃ and b = (−z⊙s)/r + z̃·s̃ folded into the LayerNorm
   affine and the next Linear (see reparam.py). Channel c's grid maps exactly onto the shared grid.
4. Weight quantizers are re-fitted on the reparameterized weights.

Deviations from the paper / official code (zkkli/RepQ-ViT):
- z̃ is rounded to an integer so that the layer-wise quantizer is deployable with an integer zero point
  (the code keeps the fractional mean); b is derived from the rounded z̃, so the mapping stays exact.
- Calibration statistics come from the float model for every site ("parallel"); the official code
  fits quantizers lazily during a forward where earlier layers are already quantized.
- The log√2 → log2 inference reparameterization of the paper is not needed in simulation (the code does
  not implement it either); export handles deployment of log√2 (see vitquant.export).
Option `reparam_head` also reparameterizes the final norm → head input (off by default, as in the paper).
"""
from __future__ import annotations

from dataclasses import dataclass

import torch

from vitquant.methods.base import Method
from vitquant.methods.reparam import fold_channel_affine
from vitquant.methods.steps import fit_weights, observe_and_fit
from vitquant.models import roles
from vitquant.quantizers import LogSqrt2Quantizer, Quantizer, RangeRule, UniformQuantizer

PERCENTILE_MSE = RangeRule("mse", candidates=(0.999, 0.9999, 0.99999))


@dataclass
class RepQOptions:
    reparam_head: bool = False
    candidates: tuple[float, ...] = (0.999, 0.9999, 0.99999)

    def __post_init__(self) -> None:
        self.candidates = tuple(float(c) for c in self.candidates)
        RangeRule("mse", candidates=self.candidates)  # validates


class RepQViT(Method):
    name = "repq-vit"
    summary = "RepQ-ViT (ICCV'23): post-LN channel-wise→layer-wise reparameterization, log√2 softmax"
    Options = RepQOptions

    def calibrate(self, ctx) -> None:
        opts = self.options(ctx.config)
        rule = RangeRule("mse", candidates=opts.candidates)
        qmodel, plan = ctx.qmodel, ctx.plan
        mappings = reparam_mappings(ctx, opts.reparam_head)
        channel_wise = {ctx.structure.layer_input(m.layers[0]) for m in mappings}

        def choose(site, bits):
            if site.role == roles.POST_SOFTMAX:
                return self.softmax_quantizer(bits), rule
            return UniformQuantizer(bits, channel_axis=site.channel_axis if site.name in channel_wise else None), rule

        fit_weights(qmodel, plan, rule)
        observe_and_fit(ctx, choose)
        for mapping in mappings:
            reparameterize_post_ln(qmodel, mapping, self.layerwise_scale_choice(opts))
        # the reparameterized layers' weights changed (the others' fits would come out the same)
        fit_weights(qmodel, plan, rule, only={n for m in mappings for n in m.layers})

    # hooks for methods that are RepQ-ViT with one part swapped (DopQ-ViT)
    def softmax_quantizer(self, bits: int) -> Quantizer:
        return LogSqrt2Quantizer(bits)

    def layerwise_scale_choice(self, opts) -> str:
        return "mean"


def reparam_mappings(ctx, head: bool) -> list:
    """The verified norm → layers mappings whose layers' inputs are post-LayerNorm sites the plan
    quantizes (with `head`, also those into the classifier head)."""
    wanted = {roles.POST_LN} | ({roles.HEAD} if head else set())
    s = ctx.structure
    return [m for m in s.mappings if s.role(s.layer_input(m.layers[0])) in wanted
            and all(ctx.plan.act(s.layer_input(n)) is not None for n in m.layers)]


def reparameterize_post_ln(qmodel, mapping, scale_choice: str = "mean") -> tuple[torch.Tensor, torch.Tensor]:
    """Step 3: the mapping's channel-wise input quantizer becomes one layer-wise quantizer, exactly
    (shared with I&S-ViT's stage 2, AdaLog and DopQ-ViT). scale_choice: how (s̃, z̃) is taken from the
    channel-wise (s, z) — "mean" (RepQ-ViT) or "median" (DopQ-ViT's MOSF). Returns (r, b): the
    norm's output x became x / r − b."""
    linears = [qmodel.submodule(n) for n in mapping.layers]
    cw = linears[0].input_site.quantizer
    s, z = cw.scale, cw.zero_point
    if scale_choice == "mean":
        s_t, z_t = s.mean(), torch.round(z.mean())
    elif scale_choice == "median":  # the middle value (mean of the two middle ones for an even count)
        s_t, z_t = torch.quantile(s, 0.5), torch.round(torch.quantile(z, 0.5))
    else:
        raise ValueError(f"scale_choice must be 'mean' or 'median', not {scale_choice!r}")
    r = s / s_t
    b = (-z * s) / r + z_t * s_t
    fold_channel_affine(qmodel.submodule(mapping.norm), linears, r, b)
    for lin in linears:  # all consumers see the same tensor: one shared layer-wise grid
        q = UniformQuantizer(cw.bits, name=lin.input_site.name)
        q.set_params(s_t, z_t)
        lin.input_site.quantizer = q
    return r, b
