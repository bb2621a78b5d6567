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
Option `reparam_head` also reparameterizes the final norm → head input — a deviation, not in the paper
or code, which quantize the head input layer-wise. Default "auto": only where that input's channel
ranges spread more than HEAD_SPREAD = 10× (max / median over channels, float model, all calibration
images; one extra extremes-only forward). Measured: the reference models' natural final norms spread
NAT× (auto leaves them as published, bit-identical) and their outlier-stress variants STRESS× (where the
published recipe collapses at W4A4 — 13.6 / 15.1 / 10.0 on the 6-block, 12-block and Swin models — and
"auto" recovers natural accuracy: benchmarks/results/accuracy.md). `reparam_head=false` is the published
recipe everywhere; true forces it.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

import torch

from vitquant.methods.base import Method
from vitquant.methods.reparam import fold_channel_affine
from vitquant.methods.steps import fit_weights, observe_and_fit
from vitquant.models import roles
from vitquant.quantizers import LogSqrt2Quantizer, Quantizer, RangeRule, UniformQuantizer

# `reparam_head="auto"`: the head input is reparameterized when its channel ranges spread more than this
# (max / median over channels). The reference models' natural final norms spread 1.4-2.5x and their
# stress variants (6 channels x30) 20-30x; see head_outliers.
HEAD_SPREAD = 10.0

HeadChoice = Literal[True, False, "auto"]


PERCENTILE_MSE = RangeRule("mse", candidates=(0.999, 0.9999, 0.99999))


@dataclass
class RepQOptions:
    reparam_head: HeadChoice = "auto"
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
        reparam = ReparamChoice(ctx, opts.reparam_head)

        def choose(site, bits):
            if site.role == roles.POST_SOFTMAX:
                return self.softmax_quantizer(bits), rule
            return UniformQuantizer(bits, channel_axis=site.channel_axis if reparam.channel_wise(site) else None), rule

        fit_weights(qmodel, plan, rule)
        observe_and_fit(ctx, choose)
        mappings = reparam.mappings()
        for mapping in mappings:
            reparameterize_post_ln(qmodel, mapping, self.layerwise_scale_choice(opts))
        # the reparameterized layers' weights changed (the others' fits would come out the same)
        fit_weights(qmodel, plan, rule, only={n for m in mappings for n in m.layers})

    # hooks for methods that are RepQ-ViT with one part swapped (DopQ-ViT)
    def softmax_quantizer(self, bits: int) -> Quantizer:
        return LogSqrt2Quantizer(bits)

    def layerwise_scale_choice(self, opts) -> str:
        return "mean"


def head_mappings(ctx) -> list:
    """The verified norm → layers mappings into the classifier head whose inputs the plan quantizes."""
    return _mappings(ctx, roles.HEAD)


def _mappings(ctx, role: str) -> list:
    s = ctx.structure
    return [m for m in s.mappings if s.role(s.layer_input(m.layers[0])) == role
            and all(ctx.plan.act(s.layer_input(n)) is not None for n in m.layers)]


def range_spread(lo: torch.Tensor, hi: torch.Tensor) -> float:
    """max / median of the per-channel ranges hi − lo (the lower middle value for an even count)."""
    r = (hi - lo).double()
    return float(r.max() / r.median().clamp_min(1e-12))


def head_outliers(head: HeadChoice, lo: torch.Tensor, hi: torch.Tensor) -> bool:
    """Resolve a method's `reparam_head` option for one head input with per-channel (min, max) lo, hi:
    True/False as given; "auto": its channel ranges spread more than HEAD_SPREAD× (range_spread) —
    outlier channels a layer-wise grid cannot hold (on the stress variants RepQ-ViT's W4A4 collapses to
    10-15% without the reparameterization). Natural models keep the published recipes' layer-wise head."""
    if head != "auto":
        return bool(head)
    return range_spread(lo, hi) > HEAD_SPREAD


class ReparamChoice:
    """Which verified norm → layers mappings a RepQ-style method reparameterizes: every post-LayerNorm
    one the plan quantizes, and those into the head as `reparam_head` resolves (head_outliers). Ask
    `channel_wise(site)` while fitting (the site's float ranges are final by then: Context.observe keeps
    them) and `mappings()` after; nothing extra is computed unless "auto" meets a head mapping, and then
    only a head site's ranges (one extremes-only forward if no observe pass has seen it)."""

    def __init__(self, ctx, head: HeadChoice, every_layer: bool = False) -> None:
        """every_layer: every layer of a mapping gets a channel-wise input (I&S-ViT reconstructs with them);
        otherwise only its first (RepQ-ViT: reparameterize_post_ln derives the shared grid from it)."""
        self.ctx, self.head = ctx, head
        self.post_ln = _mappings(ctx, roles.POST_LN)
        self.heads = head_mappings(ctx) if head is not False else []
        s = ctx.structure
        self._of_site = {s.layer_input(n): m for m in self.post_ln + self.heads
                         for n in (m.layers if every_layer else m.layers[:1])}

    def channel_wise(self, site) -> bool:
        """Whether `site` (an input of a mapping's layer) is first quantized channel-wise, then reparameterized."""
        m = self._of_site.get(site.name)
        if m is None:
            return False
        if any(m is p for p in self.post_ln):
            return True
        return head_outliers(self.head, *self.ctx.channel_range(site)) if self.head == "auto" else bool(self.head)

    def mappings(self) -> list:
        """The chosen mappings, in the structure's order."""
        sites = self.ctx.qmodel.act_sites()
        chosen = [m for m in self.post_ln + self.heads
                  if self.channel_wise(sites[self.ctx.structure.layer_input(m.layers[0])])]
        return [m for m in self.ctx.structure.mappings if any(m is c for c in chosen)]


def reparam_mappings(ctx, head: HeadChoice) -> list:
    """ReparamChoice(ctx, head).mappings(), decided now."""
    return ReparamChoice(ctx, head).mappings()


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
