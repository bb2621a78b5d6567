"""`dopq-vit`: DopQ-ViT, Yang, Gong, Lin, Wu, Sun and Gu, "DopQ-ViT: Towards Distribution-Friendly and
Outlier-Aware Post-Training Quantization for Vision Transformers", arXiv 2408.03291 (v1 Aug 2024,
v3 Jun 2025). No official code exists; this follows the paper's description.

Recipe: RepQ-ViT (repq_vit.py) with two parts swapped —
1. TanQ for the post-softmax input of softmax·V (quantizers/tanq.py): levels dense near 0 and near 1,
   the range never clipped at the top, its curvature searched by MSE.
2. MOSF for the post-LayerNorm reparameterization: the layer-wise scale (and zero point) is the
   *median* of the channel-wise ones (v1: "Median as the Optimal Scaling Factor") instead of RepQ's
   mean, which outlier channels drag upwards.
3. The paper's reconstruction stage: `reconstruct=True` runs the shared block-reconstruction step
   (methods/reconstruction.py) after calibration.

Ambiguities and their resolution:
- TanQ's formula, parameters and search are not given in the text available to us; see the design
  notes in quantizers/tanq.py.
- v3 renames MOSF to "MAD-guided Optimal Scaling Factor"; its rule could not be pinned down from the
  available text, so only the median (v1) is implemented. `scale_choice="mean"` gives RepQ's choice
  for ablations; "mad" is refused with that explanation.
- The paper names the scale only; the zero point is reduced the same way (rounded median), which
  keeps the mapping exact (see reparameterize_post_ln).
- Found while implementing: with RepQ-ViT's exact reparameterization the choice of s̃ does not change
  the quantized function. Every channel's grid maps exactly onto the shared grid whatever s̃ is, and a
  common factor on all r only rescales the reparameterized weights, whose per-output-channel quantizer
  is scale-equivariant. Median vs mean therefore changes results only once the layer-wise scale is
  refitted or learned afterwards (the reconstruction stage), or through float rounding.
- Calibration size and reconstruction iterations are not stated in the text we could read; the
  defaults are vitquant's (32 images) and the reconstruction step's.
"""
from __future__ import annotations

from dataclasses import dataclass

from vitquant.methods.adalog import reconstruction_step
from vitquant.methods.repq_vit import HeadChoice, RepQViT
from vitquant.quantizers import RangeRule, TanQuantizer

SCALE_CHOICES = ("median", "mean")


@dataclass
class DopQOptions:
    scale_choice: str = "median"
    reparam_head: HeadChoice = "auto"  # as repq-vit's option
    candidates: tuple[float, ...] = (0.999, 0.9999, 0.99999)  # RepQ-ViT's percentile-MSE candidates
    reconstruct: bool = False
    reconstruct_iters: int = 200

    def __post_init__(self) -> None:
        if self.scale_choice == "mad":
            raise ValueError("scale_choice 'mad' (DopQ-ViT v3's MAD-guided rule) is not implemented: its rule "
                             "could not be pinned down from the paper text; use 'median' (v1's MOSF)")
        if self.scale_choice not in SCALE_CHOICES:
            raise ValueError(f"scale_choice must be one of {SCALE_CHOICES}, got {self.scale_choice!r}")
        self.candidates = tuple(float(c) for c in self.candidates)
        RangeRule("mse", candidates=self.candidates)  # validates


class DopQViT(RepQViT):
    name = "dopq-vit"
    summary = "DopQ-ViT (arXiv'24): TanQ post-softmax quantizer, median (MOSF) post-LN reparameterization"
    Options = DopQOptions

    def calibrate(self, ctx) -> None:
        opts = self.options(ctx.config)
        if opts.reconstruct:
            reconstruct_blocks, ReconstructionOptions = reconstruction_step()  # fail before any work
        super().calibrate(ctx)
        if opts.reconstruct:
            reconstruct_blocks(ctx.qmodel, ctx.calib, ReconstructionOptions(iters=opts.reconstruct_iters), ctx.progress)

    def softmax_quantizer(self, bits: int) -> TanQuantizer:
        return TanQuantizer(bits)

    def layerwise_scale_choice(self, opts: DopQOptions) -> str:
        return opts.scale_choice
