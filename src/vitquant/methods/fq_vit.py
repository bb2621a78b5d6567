"""`fq-vit`: FQ-ViT, Lin et al., "FQ-ViT: Post-Training Quantization for Fully Quantized Vision Transformer",
IJCAI 2022 (arXiv 2111.13824); official code megvii-research/FQ-ViT.

"Fully quantized": besides every matmul input, the tensors the standard protocol keeps in float are
quantized too (the model gets the adapter's extra sites, `requires_sites`):
- the embeddings: patch tokens together with the class token (one joint range, the code's qact_embed)
  and the position embedding (qact_pos);
- the residual stream after the position add and after every residual add — every LayerNorm input —
  with the Power-of-Two Factor (PTF, quantizers/ptf.py; the code's qact1, Block.qact2/qact4);
- the qkv output (one quantizer shared by q, k and v, qact1 of Attention), the attention scores
  (qact_attn1) and the softmax output with Log-Int-Softmax (LIS, quantizers/log_int_softmax.py), which
  computes the probabilities from the quantized scores with an integer exponential;
- the branch outputs (attn.proj, mlp.fc2), the LayerNorm outputs (qkv and fc1 inputs), the attention
  output (proj input), the GELU output (fc2 input), the head input and the logits.
GELU stays float: its input, the fc1 output, is not quantized (as in the code).
Weights: per-output-channel symmetric min-max. Activations: unsigned layer-wise (scale and zero point)
with the range from the `observer` option — minmax (default), percentile or omse; the PTF sites always
use min-max, as the code's "ptf" observer does.

Options: ptf (True; False = plain layer-wise quantizers on the residual stream, the code without
--ptf); lis (True; False = float softmax then a uniform quantizer, the paper's "W8/A8/Attn8" rows);
attn_bits (None = with LIS min(4, a_bits): the paper's 4-bit attention maps — its headline W8/A8/Attn4
setting — but never more bits than every other activation gets, so at W3A3 it is 3; without LIS
a_bits); observer; max_factor (PTF's K, 3); lis_variant ("paper" or "code", see log_int_softmax.py).

Deviations from the paper / official code:
1. LayerNorm runs in float on the PTF-quantized input. The paper's integer LayerNorm computes mean and
   variance from the PTF integer codes (Phase 2), which equals float LayerNorm of the dequantized input;
   the code's QIntLayerNorm further rounds the affine factor to an 8-bit dyadic number M·2^−N, omits ε,
   and rounds its output onto the next quantizer's grid without zero point. Those are not simulated. γ
   and β stay float, as in the code (issue #42).
2. Patch tokens are rounded once, on the joint patch/class-token grid; the code rounds them twice (own
   range in patch_embed.qact, then the joint one in qact_embed).
3. Statistics come from config.calib_size float-model images (32 by default); the code calibrates on
   1000 training images and picks PTF factors and OMSE ranges on its last batch of 100 only.
4. Weights use the narrow range ±(2^(b−1)−1) with scale max|w|/(2^(b−1)−1); the code's int8 uses
   [−128, 127] with scale max|w|/127.5.
5. Uniform activation zero points are not clipped to [0, 2^b−1] (the code clips them: different only for
   tensors entirely above or below zero, where the code's grid no longer covers the range).
6. percentile: the 1e-5 / 1−1e-5 quantiles of the calibration sample (the code averages per-batch
   quantiles with an EMA, σ = 0.01). omse: the code's 90 candidates (1 − 0.01·i)·[min, max], L2 error on
   the calibration sample rather than on the last batch.
7. The image (patch-embedding input) follows config.patch_embed_input_bits (8 by default); the code
   quantizes it for DeiT and Swin but not for ViT.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch

from vitquant.methods.base import Method
from vitquant.methods.steps import fit_weights
from vitquant.errors import VitquantError
from vitquant.models import roles
from vitquant.models.qmodules import ActSite
from vitquant.quantizers import RangeRule, UniformQuantizer
from vitquant.quantizers.log_int_softmax import VARIANTS, LogIntSoftmaxQuantizer
from vitquant.quantizers.ptf import MAX_FACTOR_LIMIT, PowerOfTwoFactorQuantizer
from vitquant.quantizers.ranges import candidate_ranges

OBSERVERS = ("minmax", "percentile", "omse")
LIS_BITS = 4  # the paper's attention-map bit width
PERCENTILE = 0.99999  # the code's percentile_alpha
OMSE_STEPS = 90  # the code's candidates: (1 − 0.01·i)·[min, max], i < 90


@dataclass
class FQViTOptions:
    ptf: bool = True
    lis: bool = True
    attn_bits: int | None = None
    observer: str = "minmax"
    max_factor: int = 3
    lis_variant: str = "paper"

    def __post_init__(self) -> None:
        if self.observer not in OBSERVERS:
            raise ValueError(f"observer must be one of {OBSERVERS}, got {self.observer!r}")
        if self.lis_variant not in VARIANTS:
            raise ValueError(f"lis_variant must be one of {VARIANTS}, got {self.lis_variant!r}")
        if self.attn_bits is not None and not (isinstance(self.attn_bits, int) and 2 <= self.attn_bits <= 8):
            raise ValueError(f"attn_bits must be None or an integer in 2..8, got {self.attn_bits!r}")
        if not (isinstance(self.max_factor, int) and 0 <= self.max_factor <= MAX_FACTOR_LIMIT):
            raise ValueError(f"max_factor (PTF's K) must be an integer in 0..{MAX_FACTOR_LIMIT}, got {self.max_factor!r}")


def activation_range(samples: list[torch.Tensor], lo: torch.Tensor, hi: torch.Tensor, bits: int,
                     observer: str) -> tuple[torch.Tensor, torch.Tensor]:
    """Layer-wise [lo, hi] of one or more sites' samples by FQ-ViT's activation observers."""
    if observer == "minmax":
        return lo, hi
    flat = torch.cat([s.reshape(-1) for s in samples]).reshape(-1, 1)
    if observer == "percentile":
        (p_lo, p_hi), = candidate_ranges(flat, RangeRule("percentile", percentile=PERCENTILE))
        return p_lo.reshape(()), p_hi.reshape(())
    q, best = UniformQuantizer(bits), None  # omse: L2-best of the shrinking min-max ranges
    for i in range(OMSE_STEPS):
        c_lo, c_hi = lo * (1 - 0.01 * i), hi * (1 - 0.01 * i)
        s, z = q.params_for_range(c_lo, c_hi)
        err = ((torch.clamp(torch.round(flat / s) + z, q.qmin, q.qmax) - z) * s - flat).pow(2).mean()
        if best is None or err < best[0]:
            best = (err, c_lo, c_hi)
    return best[1], best[2]


class FQViT(Method):
    name = "fq-vit"
    summary = "FQ-ViT (IJCAI'22): fully quantized — PTF on LayerNorm inputs, 4-bit Log-Int-Softmax"
    Options = FQViTOptions
    requires_sites = ("embed", "residual", "branch_out", "attn_scores", "logits")

    def check(self, structure) -> None:
        fused = [c for c in structure.cores if not c.fused]
        if fused:
            raise VitquantError(f"fq-vit: {fused[0].owner} computes attention with explicit matmuls; FQ-ViT's "
                                "Log-Int-Softmax needs the attention scores, available for SDPA attention only")
        if structure.float_norm_inputs:
            names = ", ".join(structure.float_norm_inputs[:3])
            raise VitquantError(f"fq-vit: the input of {names} cannot be quantized (a norm computed without "
                                "F.layer_norm/F.group_norm, e.g. a BatchNorm or a hand-written RMSNorm): a fully "
                                "quantized model needs every norm input on a grid")

    def calibrate(self, ctx) -> None:
        qmodel, config, plan = ctx.qmodel, ctx.config, ctx.plan
        opts = self.options(config)
        fit_weights(qmodel, plan, RangeRule("minmax"), symmetric=True)
        # the extremes suffice for min-max ranges; PTF's factors and the other observers need samples
        observers = ctx.observe(sample=lambda site: opts.observer != "minmax" or (site.role == roles.RESIDUAL and opts.ptf))
        sites = qmodel.act_sites()

        def uniform(group: list[ActSite], bits: int | None) -> None:
            """One layer-wise range for the whole group (each site gets its own copy of the quantizer)."""
            if bits is None:
                for s in group:
                    s.enabled, s.quantizer = False, None
                return
            obs = [observers[s.name] for s in group]
            lo = torch.stack([o.lo.min() for o in obs]).min()
            hi = torch.stack([o.hi.max() for o in obs]).max()
            lo, hi = activation_range([o.sample() for o in obs], lo, hi, bits, opts.observer)
            for s in group:
                s.quantizer = UniformQuantizer(bits, name=s.name)
                s.quantizer.set_range(lo, hi)

        grouped = {"embed": [s for s in sites.values() if s.role == roles.EMBED]}
        for core in ctx.structure.cores:  # the code quantizes the qkv output as one tensor
            grouped[core.name] = [sites[core.q], sites[core.k], sites[core.v]]
        for group in grouped.values():
            if group:
                uniform(group, plan.act(group[0].name))
        in_group = {s.name for g in grouped.values() for s in g}
        for name, site in sites.items():
            if name in in_group or site.role == roles.POST_SOFTMAX:
                continue
            bits = plan.act(name)
            if site.role == roles.RESIDUAL and opts.ptf and bits is not None:
                obs = observers[name]
                site.quantizer = PowerOfTwoFactorQuantizer(bits, opts.max_factor, site.channel_axis, name).fit(
                    obs.sample(), RangeRule("minmax"), obs.lo, obs.hi)
            else:
                uniform([site], bits)
        for core in ctx.structure.cores:  # after the scores sites: LIS reads their scale
            site, bits = sites[core.softmax], plan.act(core.softmax)
            attn_bits = opts.attn_bits or (min(LIS_BITS, bits or 8) if opts.lis else bits)
            if bits is None:
                uniform([site], None)
            elif opts.lis and core.scores is not None and sites[core.scores].quantizer is not None:
                site.quantizer = LogIntSoftmaxQuantizer(attn_bits, opts.lis_variant, name=site.name)
                site.quantizer.set_scores_scale(sites[core.scores].quantizer.scale)
            else:
                uniform([site], attn_bits)
