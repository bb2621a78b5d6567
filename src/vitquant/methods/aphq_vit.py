"""`aphq-vit`: APHQ-ViT, Wu, Zhang, Chen, Guo, Huang and Wang, "APHQ-ViT: Post-Training Quantization
with Average Perturbation Hessian Based Reconstruction for Vision Transformers", CVPR 2025
(arXiv 2504.02508). Official code: GoatWu/APHQ-ViT (read at 84c9fde; research notes:
shared/research/methods_2025.md §0-§1).

Recipe:
1. Calibration: RepQ-ViT's (repq_vit.py) — per-output-channel weights, layer-wise activations by the
   percentile-MSE search, post-LayerNorm inputs channel-wise then reparameterized into the norm and the
   next layer — except that the post-softmax input is quantized with a plain uniform quantizer (the
   paper's point: linear quantizers only, which integer kernels run directly).
2. Block reconstruction (reconstruction.py), unit by unit: AdaRound weights, every activation scale of
   the unit learned, QDrop 0.5, inputs from the already-reconstructed quantized model.
3. The loss is the Average-Perturbation-Hessian-weighted squared error (`APHObjective`): with
   L(O) = KL(softmax(z_FP/20) ‖ softmax(z(O)/20)) — the float model's logits when the unit's output is
   replaced by O — h_n = |∇L(O_n + εv) − ∇L(O_n − εv)| / 2ε per image (a central difference of
   gradients, i.e. |H_n v|), averaged over the calibration images to one map h̄ of the unit's output
   shape (token × channel), and L_rec = mean(h̄ ⊙ (Ô − O)²), divided by its value at the start and
   doubled (the official "normalization trick"). The head's loss is KL(softmax(z_FP) ‖ softmax(ẑ)).

Deviations from the paper / official code, with evidence:
- The perturbation direction. The official code perturbs every element by the same ε (v = 1). In a
  pre-norm transformer every consumer of a block's output is a LayerNorm or the residual add, and a
  LayerNorm removes a per-token constant exactly, so L(O + ε·1) = L(O): H·1 = 0 in exact arithmetic,
  and what the ε = 1e-6 float32 difference measures is rounding noise. Measured on the bundled model
  (block 2, 8 images, exact Hessian-vector products by double backward through the math attention
  kernel): mean |H·1| = 3e-15 against mean |H·v| = 2.3e-7 for a random-sign v, and the official finite
  difference's map has cosine 0.03 with the exact |H·v|. vitquant therefore uses v = a random ±1
  vector per image (a Hutchinson-style probe; `probe="ones"` gives the official direction for ablation).
- ε = `rel_eps` (1e-2) × the RMS of the unit's float output, not 1e-6: against the exact |H·v| the
  central difference's cosine is 0.03 at ε = 1e-6·RMS, 0.99985 at 1e-4, 0.999999 at 1e-3 and 1e-2,
  0.998 at 1e-1 (same measurement).
- The loss is normalised by its value on all calibration images before optimisation (weights rounded
  to nearest), not on the first minibatch: the same constant on every rank under torchrun.
- Activation quantizers are per tensor, zero point fixed, as the rest of vitquant (exportable); the
  official code quantizes the attention operands per head and the first conv's input at 8 bits (here
  the model's plan decides the patch-embedding input).
- The calibration search is RepQ-ViT's percentile-MSE (the official code's `hyperparameter_searching`
  does a 128-candidate scale × zero-point search with 3 weight/activation rounds).
- Schedule: `schedule="reference"` runs 200 iterations per unit at batch 32 on the calibration images
  (32 by default; the paper: 20 000 iterations on 1024 images, 128 for the initial calibration);
  `"paper"` runs 20 000; `"cpu"` (what "auto" picks for real-size models on a CPU) 100 at batch 8.
  AdaRound's V learns at 1e-2 as in reconstruction.py (the paper's 1e-3 is for 20 000 iterations).
- MLP reconstruction (GELU → ReLU, re-fitted MLPs) is not implemented here yet.
"""
from __future__ import annotations

import zlib
from dataclasses import dataclass
from typing import ClassVar, Literal

import torch

from vitquant import distributed
from vitquant.methods.objectives import TEMPERATURE, Objective, UnitJob, rest_gradients
from vitquant.methods.reconstruction import ReconstructionOptions, float_teacher, reconstruct_blocks
from vitquant.methods.repq_vit import HeadChoice, RepQViT
from vitquant.methods.steps import largest_unit_output, schedule_name
from vitquant.quantizers import RangeRule, UniformQuantizer

SCHEDULES = {"reference": (200, 32), "cpu": (100, 8), "paper": (20000, 32)}


def probe_generator(seed: int, unit: str, batch: int) -> torch.Generator:
    """The same random probe on every rank for the same batch (Python's str hash is salted per process)."""
    return torch.Generator().manual_seed((seed * 1_000_003 + zlib.crc32(unit.encode()) * 8191 + batch) % 2**63)


class APHObjective(Objective):
    """mean(h̄ ⊙ (Ô − O)²), h̄ the average over images of |H_n v| (see the module docstring)."""

    name = "aph"

    def __init__(self, probe: Literal["random", "ones"] = "random", rel_eps: float = 1e-2,
                 temperature: float = TEMPERATURE) -> None:
        self.probe, self.rel_eps, self.temperature = probe, rel_eps, temperature

    def direction(self, job: UnitJob, like: torch.Tensor, batch: int) -> torch.Tensor:
        """v for one batch's unit output: random signs, the same on every rank and in both passes."""
        if self.probe == "ones":
            return torch.ones_like(like)
        gen = probe_generator(job.seed, job.name, batch)
        return (torch.randint(0, 2, like.shape, generator=gen) * 2 - 1).to(like.device, like.dtype)

    @torch.no_grad()
    def hessian_map(self, job: UnitJob) -> torch.Tensor:
        """h̄: the mean over every calibration image of |H_n v| (shape of one image's unit output)."""
        f_out, fp = job.f_out, job.float_logits()
        eps = self.rel_eps * float(f_out.float().pow(2).mean().sqrt().clamp_min(1e-12))
        total = torch.zeros(f_out.shape[1:], dtype=torch.float64, device=f_out.device)

        def passes(sign: float):
            return rest_gradients(job.teacher, job.name, job.images, fp, job.batch_size,
                                  lambda _a, _k, o, b: o + sign * eps * self.direction(job, o, b), self.temperature)

        for (_o, _p, g_plus), (_o2, _m, g_minus) in zip(passes(1.0), passes(-1.0)):
            total += ((g_plus - g_minus).abs() / (2 * eps)).sum(0).double()
        total = distributed.all_reduce(total.cpu()).to(f_out.device)
        return (total / len(f_out)).float()

    def begin(self, job: UnitJob) -> None:
        super().begin(job)
        h = self.hessian_map(job)
        mean = h.mean()
        # an all-zero map (a unit the logits do not depend on) falls back to plain squared error
        self.h = h / mean if mean > 0 else torch.ones_like(h)
        self.norm = 1.0
        start = self.measure()
        self.norm = start / 2 if start > 0 else 1.0  # L_rec ← 2·L_rec / L_rec(start)

    def element_loss(self, out: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        return (self.h * (out - target).pow(2)).flatten(1).sum(1)

    def loss(self, out: torch.Tensor, idx: torch.Tensor | slice) -> torch.Tensor:
        return (self.h * (out - self.job.f_out[idx]).pow(2)).mean() / self.norm


@dataclass
class RecipeOptions:
    """What APHQ-ViT and FIMA-Q share: their calibration and reconstruction settings; a subclass adds its
    objective's options and `make_objective`."""

    iters: int | None = None  # per unit; None: from `schedule`
    batch_size: int | None = None
    schedule: Literal["auto", "reference", "cpu", "paper"] = "auto"
    qdrop: float = 0.5
    head_objective: Literal["kl", "mse"] = "kl"
    temperature: float = TEMPERATURE  # of the KL behind the sensitivity passes
    reparam_head: HeadChoice = "auto"  # as repq-vit's option
    candidates: tuple[float, ...] = (0.999, 0.9999, 0.99999)
    act_lr: float = 4e-5
    adaround_lr: float = 1e-2

    def __post_init__(self) -> None:
        if self.iters is not None and (not isinstance(self.iters, int) or self.iters < 0):
            raise ValueError(f"iters must be None or a non-negative integer, got {self.iters!r}")
        if self.batch_size is not None and (not isinstance(self.batch_size, int) or self.batch_size < 1):
            raise ValueError(f"batch_size must be None or a positive integer, got {self.batch_size!r}")
        if self.schedule not in ("auto", *SCHEDULES):
            raise ValueError(f"schedule must be 'auto' or one of {sorted(SCHEDULES)}, got {self.schedule!r}")
        if self.temperature <= 0:
            raise ValueError(f"temperature must be > 0, got {self.temperature!r}")
        self.candidates = tuple(float(c) for c in self.candidates)
        RangeRule("mse", candidates=self.candidates)  # validates
        self.reconstruction(0, 32, 0)  # validates the rest

    def schedule_for(self, unit_floats: int, device: torch.device) -> tuple[int, int]:
        name = "paper" if self.schedule == "paper" else schedule_name(self.schedule, unit_floats, device)
        iters, batch = SCHEDULES[name]
        return (iters if self.iters is None else self.iters), (batch if self.batch_size is None else self.batch_size)

    def make_objective(self) -> Objective:
        raise NotImplementedError

    def reconstruction(self, iters: int, batch: int, seed: int) -> ReconstructionOptions:
        return ReconstructionOptions(iters=iters, batch_size=batch, weights="adaround", learn_act_scales=True,
                                     qdrop=self.qdrop, act_lr=self.act_lr, adaround_lr=self.adaround_lr, seed=seed,
                                     objective=self.make_objective, head_objective=self.head_objective)


@dataclass
class APHQOptions(RecipeOptions):
    objective: Literal["aph", "mse"] = "aph"  # "mse": the same recipe with BRECQ/QDrop's loss (ablation)
    probe: Literal["random", "ones"] = "random"  # "ones": the official perturbation direction (see above)
    rel_eps: float = 1e-2

    def __post_init__(self) -> None:
        if not 0 < self.rel_eps < 1:
            raise ValueError(f"rel_eps must be in (0, 1), got {self.rel_eps!r}")
        super().__post_init__()

    def make_objective(self) -> Objective:
        if self.objective == "mse":
            return Objective()
        return APHObjective(self.probe, self.rel_eps, self.temperature)


class APHQViT(RepQViT):
    name = "aphq-vit"
    summary = "APHQ-ViT (CVPR'25): uniform quantizers + average-perturbation-Hessian block reconstruction"
    Options = APHQOptions
    recommended_calib_size: ClassVar[int] = 256

    def calibrate(self, ctx) -> None:
        opts = self.options(ctx.config)
        unit_floats = largest_unit_output(ctx.qmodel, ctx.structure.units, ctx.images()) if opts.schedule == "auto" else 0
        iters, batch = opts.schedule_for(unit_floats, ctx.device)
        super().calibrate(ctx)  # RepQ-ViT's calibration with a uniform post-softmax quantizer
        teacher = float_teacher(ctx.qmodel, ctx.float_model)
        reconstruct_blocks(ctx.qmodel, ctx.calib, opts.reconstruction(iters, batch, ctx.config.seed),
                           progress=ctx.progress, teacher=teacher)

    def softmax_quantizer(self, bits: int) -> UniformQuantizer:
        return UniformQuantizer(bits)

