"""`fima-q`: FIMA-Q, Wu, Wang, Zhang, Chen and Wang, "FIMA-Q: Post-Training Quantization for Vision
Transformers by Fisher Information Matrix Approximation", CVPR 2025 (arXiv 2506.11543). Official code:
ShiheWang/FIMA-Q (read at 64c4b00; research notes: shared/research/methods_2025.md §0, §2).

Recipe: APHQ-ViT's (aphq_vit.py: RepQ-ViT calibration with a uniform post-softmax quantizer, then
AdaRound + learned activation scales + QDrop 0.5 block reconstruction, KL on the head) with the
diagonal-plus-low-rank Fisher loss (`FisherDPLRObjective`), per unit:
1. k times during the unit's optimisation (iterations 0, iters/k, 2·iters/k, …), a probe: the unit as it
   is then (quantized, soft AdaRound and QDrop active) runs on the float model's inputs, its output Ô
   replaces the unit's output in the float model, and g = ∂/∂Ô KL(softmax(z_FP/20) ‖ softmax(z/20)).
   The probe is g_j = mean over images of |g| and d_j = mean over images of |Ô − O| (vectors the size of
   one image's unit output, D = tokens × channels).
2. With G = [g_1 … g_j] and Δ = [d_1 … d_j] (j × D) and B = ΔΔᵀ, the loss of a minibatch, e = |Ô − O|
   per image: L_lr = mean_n (e_n Gᵀ) B⁻¹ (e_n Gᵀ)ᵀ (a rank-≤k quadratic form), L_diag = mean(e² ⊙ ḡ) with
   ḡ = mean_j g_j, and L = p1·L_lr/L_lr⁰ + p2·L_diag/L_diag⁰, the normalisers taken at each probe.

Deviations from the paper / official code:
- The first probe is taken before optimisation with the unit as it then is (weights rounded to nearest,
  QDrop off) instead of at iteration 0 in training mode (soft AdaRound, whose weights start at the float
  weights); it also defines the fixed metric (mean(e² ⊙ g_1)) reconstruction uses to put a unit back if
  its optimisation made it worse. The remaining k − 1 probes are the official ones.
- B⁻¹ is (B + δ·tr(B)/j·I)⁻¹ with δ = `damping` (1e-6): the official plain inverse fails when two probes
  are nearly parallel (late in training the error pattern changes little), as the research notes warn.
- The normalisers L⁰ are the losses over every calibration image at the probe (the official code: the
  first minibatch after it) — the same constants on every rank under torchrun.
- Activation scales are per tensor (the official code expands them per token, `token_channel_wise`,
  which ties the model to one token count), and what aphq_vit.py lists for the calibration and schedule.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

import torch

from vitquant import distributed
from vitquant.calibration.engine import first_tensor
from vitquant.methods.aphq_vit import APHQViT, RecipeOptions
from vitquant.methods.objectives import TEMPERATURE, Objective, UnitJob, rest_gradients


class FisherDPLRObjective(Objective):
    """FIMA-Q's diagonal-plus-low-rank Fisher loss (see the module docstring)."""

    name = "fisher-dplr"

    def __init__(self, rank: int = 5, p1: float = 1.0, p2: float = 1.0, temperature: float = TEMPERATURE,
                 damping: float = 1e-6) -> None:
        self.rank, self.p1, self.p2, self.temperature, self.damping = rank, p1, p2, temperature, damping

    def begin(self, job: UnitJob) -> None:
        super().begin(job)
        self.g: list[torch.Tensor] = []
        self.d: list[torch.Tensor] = []
        self.refresh_at = {i * job.iters // self.rank for i in range(1, self.rank)} - {0}
        self.probe()
        self.g1 = self.g[0] / self.g[0].mean() if self.g[0].mean() > 0 else torch.ones_like(self.g[0])

    def before_step(self, step: int) -> None:
        if step in self.refresh_at:
            self.probe()

    @torch.no_grad()
    def probe(self) -> None:
        job = self.job
        fp = job.float_logits()
        pairs: list[tuple[torch.Tensor, torch.Tensor]] = []  # (Ô, O) of this rank's batches
        g_sum = torch.zeros(job.f_out[0].numel(), dtype=torch.float64, device=job.f_out.device)
        d_sum = torch.zeros_like(g_sum)
        # the unit as it is now, on the float model's own call (every other unit float)
        quantized = lambda args, kwargs, _o, _b: first_tensor(job.unit(*args, **kwargs))  # noqa: E731
        for o, o_hat, grad in rest_gradients(job.teacher, job.name, job.images, fp, job.batch_size, quantized,
                                             self.temperature):
            g_sum += grad.abs().flatten(1).sum(0).double()
            d_sum += (o_hat - o).abs().flatten(1).sum(0).double()
            pairs.append((o_hat, o))
        n = len(job.f_out)
        g_sum = distributed.all_reduce(g_sum.cpu()).to(job.f_out.device)
        d_sum = distributed.all_reduce(d_sum.cpu()).to(job.f_out.device)
        self.g.append((g_sum / n).float())
        self.d.append((d_sum / n).float())
        G, D = torch.stack(self.g).double(), torch.stack(self.d).double()
        B = D @ D.T
        B = B + self.damping * (B.trace() / len(B)).clamp_min(1e-30) * torch.eye(len(B), dtype=B.dtype, device=B.device)
        self.G, self.B_inv = G.float(), torch.linalg.inv(B).float()
        self.g_bar = G.mean(0).float()
        # the normalisers: both parts over every image at this probe (this rank's rows, then summed)
        lr0 = torch.zeros((), dtype=torch.float64)
        diag0 = torch.zeros((), dtype=torch.float64)
        for o_hat, o in pairs:
            lr, diag = self._parts(o_hat, o)
            lr0 += lr.sum().double().cpu()
            diag0 += diag.sum().double().cpu()
        totals = distributed.all_reduce(torch.stack([lr0, diag0]))
        self.lr0 = float(totals[0]) / n if totals[0] > 0 else 1.0
        self.diag0 = float(totals[1]) / n if totals[1] > 0 else 1.0

    def _parts(self, out: torch.Tensor, target: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Per image: the low-rank quadratic form and the diagonal part."""
        e = (out - target).abs().flatten(1)
        a = e @ self.G.T
        return ((a @ self.B_inv) * a).sum(1), (e.pow(2) * self.g_bar).mean(1)

    def loss(self, out: torch.Tensor, idx: torch.Tensor | slice) -> torch.Tensor:
        lr, diag = self._parts(out, self.job.f_out[idx])
        return self.p1 * lr.mean() / self.lr0 + self.p2 * diag.mean() / self.diag0

    def element_loss(self, out: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        return (self.g1 * (out - target).flatten(1).pow(2)).sum(1)


@dataclass
class FIMAQOptions(RecipeOptions):
    objective: Literal["fisher-dplr", "mse"] = "fisher-dplr"
    rank: int = 5  # k: probes per unit (the official configs; its README's example run uses 15)
    p1: float = 1.0
    p2: float = 1.0
    damping: float = 1e-6

    def __post_init__(self) -> None:
        if not isinstance(self.rank, int) or self.rank < 1:
            raise ValueError(f"rank must be a positive integer, got {self.rank!r}")
        if self.p1 < 0 or self.p2 < 0 or self.p1 + self.p2 == 0:
            raise ValueError(f"p1 and p2 must be ≥ 0 and not both 0, got {self.p1!r}, {self.p2!r}")
        if self.damping < 0:
            raise ValueError(f"damping must be ≥ 0, got {self.damping!r}")
        super().__post_init__()

    def make_objective(self) -> Objective:
        if self.objective == "mse":
            return Objective()
        return FisherDPLRObjective(self.rank, self.p1, self.p2, self.temperature, self.damping)


class FIMAQ(APHQViT):
    name = "fima-q"
    summary = "FIMA-Q (CVPR'25): block reconstruction with a diagonal-plus-low-rank Fisher loss"
    Options = FIMAQOptions
