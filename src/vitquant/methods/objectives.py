"""Reconstruction objectives: the loss a unit's block reconstruction minimises (reconstruction.py).

The loop (AdaRound, learned activation scales, QDrop, Adam) is shared; what a method changes is the
loss, so a method is a recipe: `ReconstructionOptions(objective="aph", head_objective="kl")`.

- "mse": ‖Ô − O‖² summed over channels, averaged over images and tokens (BRECQ's lp_loss).
- "kl": KL(softmax(O/T) ‖ softmax(Ô/T)), T = 1, for a unit whose output is the logits (the head), as
  AdaLog, APHQ-ViT and FIMA-Q do.
- "aph": APHQ-ViT's average-perturbation-Hessian-weighted squared error (methods/aphq_vit.py).
- "fisher-dplr": FIMA-Q's diagonal-plus-low-rank Fisher loss (methods/fima_q.py).

An objective sees one unit at a time (`begin(job)`), may refresh what it measured before a step
(`before_step`), gives the minibatch loss (`loss`), and a fixed metric over every calibration image
(`measure`) that reconstruction uses to put a unit back when its optimisation made it worse.

Label-free sensitivity. APH and the Fisher loss need ∂L/∂O, L = KL(softmax(z_FP/T) ‖ softmax(z(O)/T)),
where z(O) are the float model's logits when the unit's output is replaced by O (T = 20, both official
codes). `rest_gradients` computes it generically: the float teacher runs on the images with a forward
hook that swaps the unit's output for a leaf tensor, and one backward gives its gradient — no model
attribute is read, any architecture the core traces works.

Under torchrun every rank computes these passes on its share of the batches and the sums are
all-reduced, so every rank holds the same weights.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Iterator

import torch
import torch.nn.functional as F
from torch import nn

from vitquant import distributed
from vitquant.calibration.engine import UnitInputs, first_tensor, run_unit
from vitquant.errors import VitquantError

TEMPERATURE = 20.0  # APHQ-ViT and FIMA-Q: the KL of the sensitivity passes is taken at T = 20


@dataclass
class UnitJob:
    """What an objective may use for one unit."""

    name: str
    unit: nn.Module  # the quantized unit being optimised
    teacher: nn.Module  # the float model (a QuantizedModel with every quantizer bypassed)
    images: torch.Tensor  # the calibration images, on the model's device
    f_in: UnitInputs  # the float model's calls to the unit
    f_out: torch.Tensor  # the float model's outputs of the unit (the targets)
    x_in: UnitInputs  # the calls the quantized unit is optimised on
    batch_size: int
    channel_dim: int
    iters: int
    seed: int
    is_head: bool  # the unit's output is the model's logits
    float_logits: Callable[[], torch.Tensor]  # the float model's logits of `images` (computed once, on demand)


class Objective:
    """The minibatch loss of one unit's reconstruction; "mse" itself."""

    name = "mse"

    def begin(self, job: UnitJob) -> None:
        self.job = job

    def before_step(self, step: int) -> None:
        """Called ahead of each optimisation step (FIMA-Q refreshes its probes here)."""

    def loss(self, out: torch.Tensor, idx: torch.Tensor | slice) -> torch.Tensor:
        return (out - self.job.f_out[idx]).pow(2).sum(self.job.channel_dim).mean()

    def element_loss(self, out: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        """The per-image sum behind `measure` (a fixed metric, unlike a loss with moving normalisers)."""
        return (out - target).pow(2).flatten(1).sum(1)

    @torch.no_grad()
    def measure(self, unit: nn.Module | None = None) -> float:
        """The metric over every calibration image, the unit run on job.x_in (under torchrun: each rank
        sums its share of the batches)."""
        job = self.job
        unit = job.unit if unit is None else unit
        bs = job.batch_size
        total = torch.zeros((), dtype=torch.float64)
        for b in distributed.shard(-(-len(job.x_in) // bs)):
            idx = slice(b * bs, (b + 1) * bs)
            total += self.element_loss(run_unit(unit, job.x_in, idx), job.f_out[idx]).sum().double().cpu()
        return float(distributed.all_reduce(total)) / job.f_out.numel()


class HeadKL(Objective):
    """KL(softmax(O/T) ‖ softmax(Ô/T)) per image, averaged: the head's loss in AdaLog, APHQ-ViT, FIMA-Q."""

    name = "kl"

    def __init__(self, temperature: float = 1.0) -> None:
        self.temperature = temperature

    def begin(self, job: UnitJob) -> None:
        if job.f_out.dim() != 2:
            raise VitquantError(f"objective 'kl' needs a unit that outputs logits [B, classes]; {job.name!r} "
                                f"outputs {tuple(job.f_out.shape)}")
        super().begin(job)

    def element_loss(self, out: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        t = self.temperature
        return F.kl_div(F.log_softmax(out.float() / t, -1), F.log_softmax(target.float() / t, -1),
                        log_target=True, reduction="none").sum(-1)

    def loss(self, out: torch.Tensor, idx: torch.Tensor | slice) -> torch.Tensor:
        return self.element_loss(out, self.job.f_out[idx]).mean()


# -- the float model's sensitivity at a unit's output ----------------------------------------------------
def kl_to_float(logits: torch.Tensor, fp_logits: torch.Tensor, temperature: float = TEMPERATURE) -> torch.Tensor:
    """Σ over the batch of KL(softmax(z_FP/T) ‖ softmax(z/T))."""
    return F.kl_div(F.log_softmax(logits.float() / temperature, -1), F.log_softmax(fp_logits.float() / temperature, -1),
                    log_target=True, reduction="sum")


def _replace_first(out, new: torch.Tensor):
    if isinstance(out, torch.Tensor):
        return new
    if isinstance(out, tuple) and out and isinstance(out[0], torch.Tensor):
        return (new, *out[1:])
    raise VitquantError(f"cannot substitute a unit output of type {type(out).__name__} (a tensor or a tuple "
                        "starting with one is needed for a sensitivity pass)")


def rest_gradients(teacher: nn.Module, unit_name: str, images: torch.Tensor, fp_logits: torch.Tensor,
                   batch_size: int, replacement: Callable[[tuple, dict, torch.Tensor, int], torch.Tensor],
                   temperature: float = TEMPERATURE) -> Iterator[tuple[torch.Tensor, torch.Tensor, torch.Tensor]]:
    """For this rank's share of the image batches: (O, Ô, ∂L/∂Ô), where O is the unit's float output in
    that batch's forward, Ô = replacement(args, kwargs, O, batch index) is put in its place (`args`,
    `kwargs`: the unit's call) and L = kl_to_float(the model's logits). O's first axis is the unit's own
    (images, or e.g. TNT's images × patches), so replacements are built from the call, not indexed."""
    unit = teacher.submodule(unit_name) if hasattr(teacher, "submodule") else teacher.get_submodule(unit_name)
    n = len(images)
    for b in distributed.shard(-(-n // batch_size)):
        rows = slice(b * batch_size, min(n, (b + 1) * batch_size))
        seen: dict[str, torch.Tensor] = {}

        def swap(_m, args, kwargs, out, b=b, seen=seen):
            o = first_tensor(out).detach()
            with torch.no_grad():
                seen["out"], seen["leaf"] = o, replacement(args, kwargs, o, b).detach().requires_grad_(True)
            # a copy, not the leaf itself: the model may update the output in place (timm TNT, Twins: `x += …`)
            return _replace_first(out, seen["leaf"].clone())

        handle = unit.register_forward_hook(swap, with_kwargs=True)
        try:
            with torch.enable_grad():
                logits = first_tensor(teacher(images[rows]))
                (grad,) = torch.autograd.grad(kl_to_float(logits, fp_logits[rows], temperature), seen["leaf"])
        finally:
            handle.remove()
        yield seen["out"], seen["leaf"].detach(), grad


class FloatLogits:
    """The float model's logits of the calibration images, computed once per reconstruction run."""

    def __init__(self) -> None:
        self._key: tuple | None = None
        self._logits: torch.Tensor | None = None

    @torch.no_grad()
    def __call__(self, teacher: nn.Module, images: torch.Tensor, batch_size: int) -> torch.Tensor:
        key = (id(teacher), images.data_ptr(), tuple(images.shape))
        if key != self._key:
            self._logits = torch.cat([first_tensor(teacher(x)) for x in images.split(batch_size)])
            self._key = key
        return self._logits


def make_objective(spec: "str | Objective | Callable[[], Objective]") -> Objective:
    """An Objective from a name, an instance, or a factory."""
    if isinstance(spec, Objective):
        return spec
    if isinstance(spec, str):
        from vitquant.methods.aphq_vit import APHObjective
        from vitquant.methods.fima_q import FisherDPLRObjective

        known = {"mse": Objective, "kl": HeadKL, "aph": APHObjective, "fisher-dplr": FisherDPLRObjective}
        if spec not in known:
            raise VitquantError(f"unknown reconstruction objective {spec!r}; choose among {sorted(known)}")
        return known[spec]()
    if callable(spec):
        made = spec()
        if not isinstance(made, Objective):
            raise VitquantError(f"an objective factory must return an Objective, got {type(made).__name__}")
        return made
    raise VitquantError(f"objective must be a name, an Objective or a factory, got {spec!r}")


OBJECTIVE_NAMES = ("mse", "kl", "aph", "fisher-dplr")
