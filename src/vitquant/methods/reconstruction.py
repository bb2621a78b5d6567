"""Block reconstruction: the optimisation step that BRECQ, QDrop and the ViT methods built on them share.

Li et al., "BRECQ: Pushing the Limit of Post-Training Quantization by Block Reconstruction", ICLR'21;
Wei et al., "QDrop: Randomly Dropping Quantization for Extremely Low-bit PTQ", ICLR'22; used by
I&S-ViT, AdaLog (--optimize), DopQ-ViT and APHQ-ViT.

Unit by unit, in forward order (the traced structure's units: every transformer block — whatever its
class — as one unit, layers outside blocks such as the patch embedding and the head alone), minimise ‖f_q(x) − f(x̄)‖² between the unit's quantized output and the
float model's output, on calibration images:
- x (`inputs="quantized"`): the unit's input as the quantized model computes it, earlier units already
  reconstructed (sequential, BRECQ); `inputs="float"`: the float model's input of the unit.
- weights (`weights=`): "adaround" learns the rounding on the fitted grid (AdaRound, quantizers/
  adaround.py) and hardens it into the weights afterwards; "ste" trains the float weights and biases
  through the frozen weight grid with a straight-through round (I&S-ViT stage 3); "float" trains the
  float weights and biases with weight quantization off in the whole model (I&S-ViT stage 1); "fixed"
  keeps the weights.
- activation scales (`learn_act_scales`): every `UniformQuantizer` at an activation site of the unit
  learns its scale (LSQ gradient through a straight-through round; zero point fixed, as in BRECQ).
  Other quantizers (log2, log√2, SULQ, …) keep their fitted parameters and pass an identity
  (straight-through) gradient so the layers before them still learn; SULQ uses its own STE.
- QDrop (`qdrop=p`): during optimisation each activation element keeps its float value with
  probability p (elementwise, as the QDrop code does); off when measuring.
- Adam: AdaRound's V at `adaround_lr` with a constant rate (BRECQ/QDrop), activation scales and
  float weights at `act_lr`/`weight_lr` with cosine decay to 0; the rounding regulariser (weight
  `round_weight`) starts after `warmup`·iters with β annealed 20 → 2.
- Loss (`objective`, `head_objective` for units that output the logits; methods/objectives.py): "mse",
  the squared error summed over channels, averaged over batch and tokens (BRECQ's lp_loss), by default;
  "kl" (the head's logits), "aph" (APHQ-ViT), "fisher-dplr" (FIMA-Q), or any `Objective`.

Usage, after a method has fitted every quantizer (weights included, unless weights="float"):
    results = reconstruct_blocks(qmodel, calib, ReconstructionOptions(qdrop=0.5), progress)
Afterwards every quantizer holds what was learned (scales written back, weights hardened onto the grid
or updated in float), so `freeze_weight` and `vitquant.save`/`load` reproduce the result exactly.

Deviations: AdaLog/APHQ use KL on the head's output; the default here is MSE for every unit
(`head_objective="kl"` gives theirs). BRECQ optimises
weights and activations in two passes; this runs them jointly (QDrop's setting). AdaRound's V learns
at 1e-2, not BRECQ's 1e-3: the CPU default is 200 iterations instead of 20 000, and at 1e-3 V (which
starts within ±2.4) can hardly move far enough to flip a rounding. Measured on the bundled model at
W3A3 (repq-vit calibration + reconstruction, QDrop 0.5, 256 images): 1e-3 → 95.5 % top-1, block
output MSE ×0.53-0.93; 1e-2 → 96.0 %, ×0.40-0.84 (repq-vit alone, 32 images: 94.2 %).
A unit whose objective metric (its output MSE for "mse"; see Objective.measure) on all calibration images
is higher after its optimisation than before is put back as it was (no official code does this): Adam steps by about the learning rate whatever the loss's
scale, and on units with weights small against it (random-init BEiT/EVA-02 heads) that made the model
worse (W8A8 logit cosine 0.9998 without reconstruction, 0.5 with it; 0.9999 with the rule). On the bundled
model no unit gets worse, so its results are unchanged (ias-vit W4A4 96.1).
"""
from __future__ import annotations

import copy
import math
import time
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Callable, Iterator, Literal

import torch
from torch import nn
from tqdm.auto import tqdm

from vitquant import distributed
from vitquant.calibration.data import CalibrationSet
from vitquant.calibration.engine import UnitInputs, UnitStream, run_unit, unit_io, unit_outputs
from vitquant.errors import VitquantError
from vitquant.methods.objectives import OBJECTIVE_NAMES, FloatLogits, Objective, UnitJob, make_objective
from vitquant.models.qmodules import ActSite, QuantConv2d, QuantLinear
from vitquant.models.quantized import QuantizedModel
from vitquant.profiling import release_memory
from vitquant.quantizers import UniformQuantizer
from vitquant.quantizers.adaround import AdaRoundWeight, beta_schedule
from vitquant.quantizers.ste import LearnedScaleUniform, StraightThrough

# Steps between two release_memory() calls: each step allocates and frees an autograd graph of a few
# hundred MB (DeiT-S at batch 8), and the heap fragments across steps. Measured on a 2-block DeiT-S
# (ias-vit W4A4, 100 steps per unit and stage, 2 threads): peak RSS 1283 MB without, 1243 every 10 steps
# (process CPU 172 → 168 s), 1226 every step (CPU 238 s: re-faulting the returned pages costs more).
TRIM_EVERY = 10


WEIGHT_MODES = ("adaround", "ste", "float", "fixed")


@dataclass
class ReconstructionOptions:
    iters: int = 200  # per unit; the papers use 1000-20000 on a GPU
    batch_size: int = 32
    weights: Literal["adaround", "ste", "float", "fixed"] = "adaround"
    learn_act_scales: bool = True
    inputs: Literal["quantized", "float"] = "quantized"
    qdrop: float = 0.0  # QDrop uses 0.5
    adaround_lr: float = 1e-2  # BRECQ's 1e-3 is for 20 000 iterations; see the module docstring
    weight_lr: float = 4e-5
    act_lr: float = 4e-5
    round_weight: float = 0.01
    beta: tuple[float, float] = (20.0, 2.0)
    warmup: float = 0.2
    seed: int = 0
    # stop a unit once the mean loss of a window of steps (iters/20, at least 10) improves on the previous
    # window's by less than this fraction (0: run every iteration); not with AdaRound, whose rounding
    # regulariser needs its whole annealing schedule
    early_stop: float = 0.0
    bf16: bool = False  # optimisation forwards under bfloat16 autocast (the measured MSEs stay float32)
    # the loss (methods/objectives.py): a name in OBJECTIVE_NAMES, an Objective, or a factory of one;
    # head_objective: for units that output the logits (None: the same as `objective`)
    objective: "str | Objective | object" = "mse"
    head_objective: "str | Objective | object | None" = None

    def __post_init__(self) -> None:
        def bad(what: str) -> VitquantError:
            return VitquantError(f"reconstruction option {what}")

        if not isinstance(self.iters, int) or self.iters < 0:
            raise bad(f"iters must be a non-negative integer, got {self.iters!r}")
        if not isinstance(self.batch_size, int) or self.batch_size < 1:
            raise bad(f"batch_size must be a positive integer, got {self.batch_size!r}")
        if self.weights not in WEIGHT_MODES:
            raise bad(f"weights must be one of {WEIGHT_MODES}, got {self.weights!r}")
        if self.inputs not in ("quantized", "float"):
            raise bad(f"inputs must be 'quantized' or 'float', got {self.inputs!r}")
        if not 0.0 <= self.qdrop < 1.0:
            raise bad(f"qdrop must be a probability in [0, 1), got {self.qdrop!r}")
        for name in ("adaround_lr", "weight_lr", "act_lr", "round_weight"):
            if getattr(self, name) < 0:
                raise bad(f"{name} must be ≥ 0, got {getattr(self, name)!r}")
        self.beta = tuple(float(b) for b in self.beta)
        if len(self.beta) != 2 or min(self.beta) <= 0:
            raise bad(f"beta must be (start, end) > 0, got {self.beta!r}")
        if not 0.0 <= self.warmup < 1.0:
            raise bad(f"warmup must be a fraction in [0, 1), got {self.warmup!r}")
        if not 0.0 <= self.early_stop < 1.0:
            raise bad(f"early_stop must be a fraction in [0, 1), got {self.early_stop!r}")
        for name in ("objective", "head_objective"):
            spec = getattr(self, name)
            if spec is None and name == "head_objective":
                continue
            if isinstance(spec, str) and spec not in OBJECTIVE_NAMES:
                raise bad(f"{name} must be one of {OBJECTIVE_NAMES} (or an Objective), got {spec!r}")
            if not isinstance(spec, (str, Objective)) and not callable(spec):
                raise bad(f"{name} must be one of {OBJECTIVE_NAMES}, an Objective or a factory, got {spec!r}")
        if self.early_stop and self.weights == "adaround":
            raise bad("early_stop needs weights other than 'adaround' (AdaRound's rounding regulariser anneals "
                      "over all iterations)")


@dataclass
class UnitResult:
    mse_before: float  # mean squared error of the unit's output vs the float output, on all images
    mse_after: float
    seconds: float
    iters: int = 0  # optimisation steps run (fewer than asked when stopped early)
    objective: str = "mse"
    loss_before: float = 0.0  # the objective's metric on all images (Objective.measure); = mse_* for "mse"
    loss_after: float = 0.0


# -- structure ---------------------------------------------------------------------------------------
def reconstruction_units(qmodel: QuantizedModel) -> list[str]:
    """Names of the units in forward order (the traced structure's units: blocks, and single layers)."""
    if not qmodel.structure.units:
        raise VitquantError("block reconstruction needs units, but this model's structure has none")
    return [u.name for u in qmodel.structure.units]


def float_teacher(qmodel: QuantizedModel, original: nn.Module | None = None) -> QuantizedModel:
    """A frozen float copy: the targets stay those of the original model while `qmodel` changes.
    original: the float model `qmodel` was prepared from; each parameter of it that `qmodel` still holds
    unchanged (same name, shape and values) is shared with the teacher, not copied (DeiT-S: 84 MB less
    while calibrating); the original's own parameters and flags are not touched."""
    memo: dict[int, torch.Tensor] = {}
    if original is not None:
        mine = dict(original.named_parameters())
        for name, p in qmodel.model.named_parameters():
            o = mine.get(name)
            if (o is not None and o.shape == p.shape and o.dtype == p.dtype and o.device == p.device
                    and torch.equal(o.detach(), p.detach())):
                memo[id(p)] = nn.Parameter(o.detach(), requires_grad=False)  # the same storage
    teacher = copy.deepcopy(qmodel, memo)
    for unit in [*teacher.act_sites().values(), *teacher.weight_layers().values()]:
        unit.bypass = True
    return teacher.eval().requires_grad_(False)


# -- training views ----------------------------------------------------------------------------------
class _SiteView(nn.Module):
    """A site's quantizer during optimisation: differentiable, optionally dropped (QDrop)."""

    def __init__(self, inner: nn.Module, drop: float, gen: torch.Generator) -> None:
        super().__init__()
        self.inner, self.drop, self.gen, self.dropping = inner, drop, gen, False

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        xq = self.inner(x)
        if self.dropping and self.drop > 0:
            keep_float = torch.rand(x.shape, generator=self.gen).to(x.device) < self.drop
            return torch.where(keep_float, x, xq)
        return xq


@contextmanager
def _weights_float(qmodel: QuantizedModel, on: bool) -> Iterator[None]:
    layers = list(qmodel.weight_layers().values())
    before = [layer.bypass for layer in layers]
    if on:
        for layer in layers:
            layer.bypass = True
    try:
        yield
    finally:
        for layer, b in zip(layers, before):
            layer.bypass = b


class _UnitTrainer:
    """Installs the training views of one unit, collects what learns, and restores the unit after."""

    def __init__(self, unit: nn.Module, opts: ReconstructionOptions, gen: torch.Generator,
                 quantized: set[str]) -> None:
        self.unit, self.opts = unit, opts
        self.sites = [m for m in unit.modules() if isinstance(m, ActSite) and m.enabled and m.quantizer is not None]
        # only the structure's quantized layers learn: a layer the structure leaves float (one computing
        # from constants only, e.g. a relative-position MLP) or the plan keeps float stays as it is
        self.layers = [m for m in unit.modules() if isinstance(m, QuantLinear | QuantConv2d)
                       and m.name in quantized and m.weight_enabled]
        self.requires_grad = {p: p.requires_grad for p in unit.parameters()}
        unit.requires_grad_(False)
        self.site_views, self.weight_views = [], []
        self.site_quantizers = [s.quantizer for s in self.sites]
        for site in self.sites:
            q = site.quantizer
            inner = (LearnedScaleUniform(q, learn_scale=opts.learn_act_scales) if isinstance(q, UniformQuantizer)
                     else StraightThrough(q))
            site.quantizer = _SiteView(inner, opts.qdrop, gen)
            self.site_views.append(site.quantizer)
        self.weight_quantizers = [layer.weight_quantizer for layer in self.layers]
        for layer in self.layers:
            if opts.weights in ("adaround", "ste"):
                q = layer.weight_quantizer
                if layer.weight_frozen or not isinstance(q, UniformQuantizer) or not q.calibrated:
                    raise VitquantError(
                        f"layer {layer.name!r}: weights={opts.weights!r} reconstruction needs an unfrozen weight with a "
                        f"fitted UniformQuantizer (fit it first, e.g. methods.steps.fit_weights); got {q!r}")
                view = AdaRoundWeight(q, layer.weight) if opts.weights == "adaround" else LearnedScaleUniform(q, False)
                layer.weight_quantizer = view
                self.weight_views.append(view)
            if opts.weights in ("ste", "float"):
                layer.weight.requires_grad_(True)
                if layer.bias is not None:
                    layer.bias.requires_grad_(True)

    def param_groups(self) -> list[dict]:
        o = self.opts
        groups = []
        scales = [v.inner.scale for v in self.site_views if isinstance(v.inner, LearnedScaleUniform) and o.learn_act_scales]
        if scales:
            groups.append({"params": scales, "lr": o.act_lr, "cosine": True})
        if o.weights == "adaround":
            groups.append({"params": [v.v for v in self.weight_views], "lr": o.adaround_lr, "cosine": False})
        elif o.weights in ("ste", "float"):
            params = [p for layer in self.layers for p in (layer.weight, layer.bias) if p is not None]
            groups.append({"params": params, "lr": o.weight_lr, "cosine": True})
        return [g for g in groups if g["params"]]

    def regularizer(self, step: int) -> torch.Tensor | None:
        if self.opts.weights != "adaround" or not self.weight_views:
            return None
        beta = beta_schedule(step, self.opts.iters, self.opts.warmup, *self.opts.beta)
        if beta is None:
            return None
        return self.opts.round_weight * sum(v.regularizer(beta) for v in self.weight_views)

    def set_dropping(self, on: bool) -> None:
        for v in self.site_views:
            v.dropping = on

    @torch.no_grad()
    def finish(self) -> None:
        """Write what was learned into the real quantizers and weights, and remove the views."""
        for site, view, q in zip(self.sites, self.site_views, self.site_quantizers):
            view.inner.write_back()
            site.quantizer = q
        for layer, q in zip(self.layers, self.weight_quantizers):
            if isinstance(layer.weight_quantizer, AdaRoundWeight):
                layer.weight.copy_(layer.weight_quantizer.hard_weight())
            layer.weight_quantizer = q
        for p, flag in self.requires_grad.items():
            p.grad = None  # the last step's gradients: a weight-sized tensor per parameter, never read again
            p.requires_grad_(flag)


@torch.no_grad()
def _mse(unit: nn.Module, inputs: UnitInputs, targets: torch.Tensor, batch_size: int) -> float:
    """The unit's output MSE over every image (under torchrun each rank sums its part of the batches)."""
    total = torch.zeros((), dtype=torch.float64)
    for b in distributed.shard(-(-len(inputs) // batch_size)):
        idx = slice(b * batch_size, (b + 1) * batch_size)
        total += (run_unit(unit, inputs, idx) - targets[idx]).pow(2).sum().double().cpu()
    return float(distributed.all_reduce(total)) / targets.numel()


def _channel_dim(qmodel: QuantizedModel, name: str, out: torch.Tensor) -> int:
    """Conv outputs are [B, C, H, W]; token outputs (even 4-D, Swin's [B, H, W, C]) keep channels last."""
    last = qmodel.submodule(qmodel.structure.unit(name).layers[-1])
    return 1 if isinstance(last, QuantConv2d) and out.dim() == 4 else -1


class _Plateau:
    """Early stop: the mean loss of each window of steps against the previous window's."""

    def __init__(self, iters: int, tolerance: float) -> None:
        self.window, self.tolerance = max(10, iters // 20), tolerance
        self.losses: list[float] = []
        self.previous: float | None = None

    def stop(self, loss: torch.Tensor) -> bool:
        if not self.tolerance:
            return False
        self.losses.append(float(loss))
        if len(self.losses) < self.window:
            return False
        mean, self.losses = sum(self.losses) / len(self.losses), []
        previous, self.previous = self.previous, mean
        return previous is not None and previous - mean < self.tolerance * previous


def _reconstruct_unit(qmodel: QuantizedModel, f_in: UnitInputs, f_out: torch.Tensor, name: str,
                      images: torch.Tensor, opts: ReconstructionOptions, gen: torch.Generator,
                      bar: tqdm, chained_input: torch.Tensor | None, teacher: QuantizedModel,
                      objectives: tuple[Objective, Objective],
                      float_logits: Callable[[], torch.Tensor]) -> tuple[UnitResult, UnitInputs]:
    t0 = time.perf_counter()
    unit = qmodel.submodule(name)
    if opts.inputs == "float":
        x_in = f_in
    elif chained_input is not None:  # the previous (quantized) unit's output is this unit's input
        x_in = f_in.with_x(chained_input)
    else:
        x_in = unit_io(qmodel, name, images, opts.batch_size, with_output=False)[0]
    mse_before = _mse(unit, x_in, f_out, opts.batch_size)
    channel_dim = _channel_dim(qmodel, name, f_out)
    is_head = f_out.dim() == 2 and set(qmodel.structure.unit(name).layers) <= set(qmodel.structure.heads)
    objective = objectives[1] if is_head else objectives[0]
    objective.begin(UnitJob(name, unit, teacher, images, f_in, f_out, x_in, opts.batch_size, channel_dim,
                            opts.iters, opts.seed, is_head, float_logits))
    loss_before = mse_before if objective.name == "mse" else objective.measure(unit)
    # what the unit was, to put back if the optimisation makes its output error worse (see below)
    before = {k: v.detach().clone() for k, v in unit.state_dict().items()}
    # data-parallel under torchrun: every rank draws the same step batches from `gen`; QDrop's masks come
    # from a stream of the rank's own, so `gen` stays in step on every rank
    parallel = distributed.is_distributed()
    masks = torch.Generator().manual_seed(hash((opts.seed, distributed.rank())) & (2**63 - 1)) if parallel else gen
    trainer = _UnitTrainer(unit, opts, masks, set(qmodel.structure.layers))
    done = 0
    try:
        groups = trainer.param_groups()
        if groups and opts.iters > 0:
            optimizer = torch.optim.Adam([{"params": g["params"], "lr": g["lr"]} for g in groups])
            cosine = lambda s: 0.5 * (1 + math.cos(math.pi * s / opts.iters))  # noqa: E731
            schedule = torch.optim.lr_scheduler.LambdaLR(
                optimizer, [cosine if g["cosine"] else (lambda s: 1.0) for g in groups])
            n, bs = len(x_in), min(opts.batch_size, len(x_in))
            bar.set_description(f"reconstructing {name}")
            plateau = _Plateau(opts.iters, opts.early_stop)
            trainer.set_dropping(True)
            with torch.enable_grad():
                for step in range(opts.iters):
                    idx = torch.randperm(n, generator=gen)[:bs]
                    objective.before_step(step)
                    if parallel:
                        rec, reg = _parallel_step(unit, x_in, f_out, idx, objective, trainer, step, optimizer, opts)
                    else:
                        with torch.autocast(f_out.device.type, dtype=torch.bfloat16, enabled=opts.bf16):
                            rec = objective.loss(run_unit(unit, x_in, idx), idx)
                        reg = trainer.regularizer(step)
                        loss = rec if reg is None else rec + reg
                        optimizer.zero_grad(set_to_none=True)
                        loss.backward()
                    optimizer.step()
                    schedule.step()
                    done += 1
                    if done % TRIM_EVERY == 0:
                        release_memory()
                    bar.update()
                    if step % 10 == 0 or step == opts.iters - 1:
                        bar.set_postfix(loss=f"{rec.item():.4g}")
                    if plateau.stop(rec.detach()):
                        break
            trainer.set_dropping(False)
            if parallel:  # the ranks took the same steps; rank 0's result is the one kept everywhere
                with torch.no_grad():
                    for g in groups:
                        for param in g["params"]:
                            param.copy_(distributed.broadcast_from_main(param))
    finally:
        trainer.finish()
    bar.update(opts.iters - done)  # steps not run (stopped early, nothing to learn) leave the total honest
    mse_after = _mse(unit, x_in, f_out, opts.batch_size)
    loss_after = mse_after if objective.name == "mse" else objective.measure(unit)
    if loss_after > loss_before:
        # Adam moves every weight by about the learning rate whatever the loss's scale: a unit whose weights
        # are small against it (random-init BEiT's head, init scale 1e-3) got worse (its MSE 6e-13 → 4e-9,
        # the model's logit cosine 0.9998 → 0.32). A unit is never left worse than it came in.
        unit.load_state_dict(before)
        mse_after, loss_after = mse_before, loss_before
    return UnitResult(mse_before, mse_after, time.perf_counter() - t0, done, objective.name, loss_before,
                      loss_after), x_in


def _parallel_step(unit: nn.Module, x_in: UnitInputs, f_out: torch.Tensor, idx: torch.Tensor, objective: Objective,
                   trainer: "_UnitTrainer", step: int, optimizer: torch.optim.Optimizer,
                   opts: ReconstructionOptions) -> tuple[torch.Tensor, torch.Tensor | None]:
    """One step's gradients, data-parallel: this rank's contiguous part of the step batch `idx`, its loss
    weighted by its share of the rows, the regulariser's by 1/ranks, then the gradients summed over ranks
    (one all-reduce): the gradient of the whole batch's loss, up to the order of float additions. Returns
    the whole batch's reconstruction loss (also reduced, so early stopping decides alike everywhere)."""
    part = distributed.shard(len(idx))
    local = idx[part.start:part.stop]
    params = [p for g in optimizer.param_groups for p in g["params"]]
    optimizer.zero_grad(set_to_none=True)
    rec = torch.zeros((), device=f_out.device)
    if len(local):
        with torch.autocast(f_out.device.type, dtype=torch.bfloat16, enabled=opts.bf16):
            rec = objective.loss(run_unit(unit, x_in, local), local) * (len(local) / len(idx))
    reg = trainer.regularizer(step)
    loss = rec if reg is None else rec + reg / distributed.world_size()
    if loss.requires_grad:
        loss.backward()
    flat = torch.cat([(p.grad if p.grad is not None else torch.zeros_like(p)).flatten() for p in params]
                     + [rec.detach().float().reshape(1)])
    flat = distributed.all_reduce(flat)
    offset = 0
    for p in params:
        p.grad = flat[offset:offset + p.numel()].view_as(p).to(p.dtype)
        offset += p.numel()
    return flat[-1], reg


def reconstruct_blocks(
    qmodel: QuantizedModel, calib: CalibrationSet | torch.Tensor, options: ReconstructionOptions | None = None,
    progress: bool = True, teacher: QuantizedModel | None = None,
) -> dict[str, UnitResult]:
    """Reconstruct every unit of a calibrated `qmodel` in place; returns each unit's output MSE
    before/after. `teacher`: the float reference (default: a float copy of `qmodel` as it is now —
    pass one taken earlier when `qmodel`'s float weights were already changed by a previous stage)."""
    opts = options or ReconstructionOptions()
    images = calib.images if isinstance(calib, CalibrationSet) else calib
    if not isinstance(images, torch.Tensor) or images.dim() != 4 or len(images) == 0:
        raise VitquantError("reconstruct_blocks needs a CalibrationSet or a non-empty image tensor [N, C, H, W]")
    device = next(qmodel.parameters()).device
    images = images.to(device)
    teacher = float_teacher(qmodel) if teacher is None else teacher
    gen = torch.Generator().manual_seed(opts.seed)
    was_training = qmodel.training
    qmodel.eval()
    results = {}
    try:
        with _weights_float(qmodel, opts.weights == "float"):
            units = reconstruction_units(qmodel)
            chained = {u.name: u.chained for u in qmodel.structure.units}
            # the float model's call and output of each unit, computed unit by unit (each float unit runs
            # once, memory holds one unit's tensors)
            stream = UnitStream(teacher, images, opts.batch_size)
            objectives = (make_objective(opts.objective), make_objective(opts.head_objective or opts.objective))
            logits = FloatLogits()  # computed once, if an objective asks for them
            float_logits = lambda: logits(teacher, images, opts.batch_size)  # noqa: E731
            nxt = None
            # one bar over every unit's steps: its ETA is the whole reconstruction's
            bar = tqdm(total=len(units) * opts.iters, desc="reconstructing", unit="it", leave=False,
                       disable=not progress)
            for name in units:
                f_in = stream.inputs(name, chained[name])
                f_out = stream.outputs()
                results[name], x_in = _reconstruct_unit(qmodel, f_in, f_out, name, images, opts, gen, bar,
                                                        nxt if chained[name] else None, teacher, objectives,
                                                        float_logits)
                release_memory()  # the unit's activations and gradients (see profiling.release_memory)
                # what the next unit receives from this one, now that it is reconstructed
                nxt = unit_outputs(qmodel.submodule(name), x_in, opts.batch_size) if opts.inputs == "quantized" else None
            bar.close()
    finally:
        qmodel.train(was_training)
    return results
