"""`<method>+qwt`: QwT, Fu et al., "Quantization without Tears", CVPR 2025 (arXiv 2411.13918) — a closed-form
linear compensation of each block's quantization error, appended to any method.

Recipe (the official classification code as copied in XJ19023/QwT-LLM, llm-qwt/qwt_vit_and_deit.py):
1. Quantize with the base method (any registered one: `repq-vit+qwt`, `ias-vit+qwt`, …).
2. Unit by unit in forward order (the traced structure's units), sequentially: X = the unit's input as the
   already-compensated quantized model computes it on the calibration images, tokens flattened to rows;
   R = f(X) − f_q(X), with f the float unit (the model before the base method ran, quantizers off) and f_q
   the quantized one.
3. Least squares with bias, R ≈ X·W + b; R² = 1 − ‖R − X·W − b‖² / ‖R − mean(R)‖² (pooled over channels,
   column means). The unit's output becomes f_q(x) + x·W + b if R² > 0; otherwise it is left alone.
4. The next unit's input is computed with this compensation in place.
At inference W (C×C) and b run in float (a MatMul + Add per block in the ONNX export): +C² + C parameters
per block, ≈ +1/12 of a block's linear MACs.

Where it applies: units whose main input and output are token tensors ([B, N, C] or [B, H, W, C],
channels last) of the same shape — transformer blocks; the patch embedding, patch merging, conv stages and
the head are skipped, each with its reason in the record (`qmodel.qwt.record`, saved with the model).

Deviations from the official code:
- Ridge: the normal equations are solved in float64 with λ = RIDGE · mean(diag XᵀX) = 0.1 · mean(diag XᵀX) on
  W's rows (not on b); the official code inverts X̃ᵀX̃ (float32) with no ridge. It matters: with the default
  32 images (32 × 17 tokens = 544 rows for 193 unknowns per output channel on the bundled model) the plain
  fit over-fits — R² 0.18-0.68 on the calibration images but −0.0 … −0.8 on 256 held-out training images,
  whose block-output error it makes 1.1-1.7× *larger* (ratio ‖R − XW − b‖² / ‖R‖²: 0.92 1.55 1.65 1.66 1.54
  1.15 for blocks 0-5); λ = 0.1 gives 0.88 0.96 0.96 0.99 0.92 0.68 (held-out R² 0.03 mean). With 512 images
  the plain fit is fine (0.83 0.90 0.86 0.82 0.81 0.59) and λ = 0.1 costs ≤ 0.02 of each ratio
  (benchmarks/results/qwt/qwt_ridge.log; repq-vit W4A4 seed 0; the stress variant gives the same to ±0.04). Top-1
  (W3A3, 32 images, seeds 0/1/2, natural | stress): λ = 0: 95.3 95.5 95.0 | 95.0 95.4 95.0; λ = 1e-3: 95.5
  95.4 95.2 | 95.5 95.3 95.3; λ = 0.1: 96.0 95.8 95.9 | 96.0 96.0 95.9 (benchmarks/results/qwt/qwt_ridge_w3a3.log).
  Recommendation: the default is fine at 32 images; more images (128-512, `calib_size`) make the fit
  generalise better (held-out R² 0.03 → 0.11 → 0.13 for 32 → 128 → 512) at a cost about linear in the
  images (QwT step 0.4 → 1.3-2.7 → 5.5-13.6 s on the loaded 2-core machine).
- Calibration images: the base method's (`calib_size`, default 32); the paper draws 512 training images
  with training augmentation.
- The float target is the model as it was before the base method ran (for methods that change float
  weights — I&S-ViT's float stage, AdaRound's hardened weights — the official code's "FP block" is
  ambiguous; the original float model is what the paper's objective names).
- R² is pooled over all output channels (column means); the code's exact averaging was not verified.
- Under `deployable=True` the base method's quantizers are made deployable (make_deployable) before the
  compensation is fitted, so it compensates the quantizers that are exported; the stand-ins are listed in
  the compensation's record (quantize()'s own make_deployable then finds nothing left to replace).
- The compensation runs in float32 (the official code runs it in FP16 at inference).

Measured (benchmarks/qwt.py table → benchmarks/results/qwt/qwt_table.log; 2 CPU cores shared with two other
developers' jobs, load average ≈ 4): top-1 on the 1000 MNIST-5k test images, calibration 32 images, seeds
0/1/2, float 96.0 (both variants):
                        repq-vit            repq-vit+qwt
  natural  W4A4     96.2 96.0 96.3      96.2 96.2 96.2
  natural  W3A3     94.2 93.7 93.1      96.0 95.8 95.9
  stress   W4A4     96.2 96.2 96.4      96.2 96.3 96.3
  stress   W3A3     94.4 93.7 93.4      96.0 96.0 95.9
QwT step 0.32-0.50 s per run (whole calibration 0.5 → 0.9 s). W4A4 is at float accuracy already and QwT
changes nothing measurable there; its logit SQNR vs the float model moves −0.6 … +0.4 dB (W3A3: +2.4 … +3.1
dB; benchmarks/results/qwt/qwt_sqnr.log). One reason W4A4 does not gain: the fit weighs every token alike, while the
head reads only the class token (1 row in 17) — a class-token-weighted fit of the last block is untried.
"""
from __future__ import annotations

import time
from typing import Any

import torch
from torch import nn
from torch.utils._pytree import tree_flatten

from vitquant.calibration.engine import UnitInputs, unit_io, unit_outputs
from vitquant.errors import VitquantError
from vitquant.methods.base import Method
from vitquant.models.qmodules import ActSite, QuantConv2d, QuantLinear

# λ = RIDGE · mean(diag XᵀX): measured in the module docstring (0 = the official unregularised fit).
RIDGE = 0.1
ROWS_PER_CHUNK = 1 << 16  # rows of X held in float64 at once while summing the normal equations


# -- the compensation a quantized model carries -------------------------------------------------------
class CompensationTerm(nn.Module):
    def __init__(self, weight: torch.Tensor, bias: torch.Tensor) -> None:
        super().__init__()
        self.register_buffer("weight", weight.float().contiguous())  # [C_in, C_out]: out += x @ weight + bias
        self.register_buffer("bias", bias.float().contiguous())


class QwTCompensation(nn.Module):
    """Per-unit (W, b) registered on the QuantizedModel as `qmodel.qwt` (outside `qmodel.model`, so layer
    names and the model's state dict are unchanged), applied by a forward hook on each compensated unit.

    units: compensated unit names; leaves: for each, the index of the unit's main input among the flattened
    (args, kwargs) of its call; record: what the fit found for every unit (also the skipped ones)."""

    def __init__(self) -> None:
        super().__init__()
        self.units: list[str] = []
        self.leaves: list[int] = []
        self.terms = nn.ModuleList()
        self.record: dict[str, dict[str, Any]] = {}
        self.ridge = RIDGE
        self.seconds = 0.0  # the whole step's wall time
        self.stand_ins: list[str] = []  # deployable=True: quantizers replaced before the fit (make_deployable)

    def add(self, unit: str, leaf: int, weight: torch.Tensor, bias: torch.Tensor) -> None:
        self.units.append(unit)
        self.leaves.append(leaf)
        self.terms.append(CompensationTerm(weight, bias))

    def term(self, unit: str) -> CompensationTerm:
        return self.terms[self.units.index(unit)]

    def install(self, qmodel) -> None:
        """Attach the hooks (replacing any earlier ones) and register this as `qmodel.qwt`."""
        uninstall(qmodel)
        for unit, leaf, term in zip(self.units, self.leaves, self.terms):
            module = qmodel.submodule(unit)
            watched = [m for m in module.modules() if isinstance(m, (ActSite, QuantLinear, QuantConv2d))]
            module.register_forward_hook(_Compensate(term, leaf, watched), with_kwargs=True)
        qmodel.qwt = self

    def tensors(self) -> dict[str, torch.Tensor]:
        """What save() writes: `qwt/<unit>/weight`, `qwt/<unit>/bias` (CPU copies)."""
        return {f"qwt/{u}/{k}": getattr(t, k).detach().cpu().contiguous()
                for u, t in zip(self.units, self.terms) for k in ("weight", "bias")}

    def meta(self) -> dict[str, Any]:
        """What save() writes into quant_config.json (`from_meta` reads it back, with `tensors()`)."""
        return {"units": list(self.units), "input_leaves": list(self.leaves), "ridge": self.ridge,
                "seconds": self.seconds, "record": self.record,
                **({"deployable_stand_ins": self.stand_ins} if self.stand_ins else {})}


class _Compensate:
    """The forward hook: output + x·W + b, unless every quantizer of the unit is bypassed (the model then runs
    as the float model, e.g. QuantizedModel.bypassed(), and is not compensated). A plain object, so a deep
    copy of the model copies it with the copy's term and modules."""

    def __init__(self, term: CompensationTerm, leaf: int, watched: list[nn.Module]) -> None:
        self.term, self.leaf, self.watched = term, leaf, watched

    def __call__(self, _module, args, kwargs, output):
        if self.watched and all(m.bypass for m in self.watched):
            return None
        x = tree_flatten((args, kwargs))[0][self.leaf]
        extra = torch.addmm(self.term.bias.to(x.dtype), x.reshape(-1, x.shape[-1]),
                            self.term.weight.to(x.dtype)).view_as(x)
        if isinstance(output, torch.Tensor):
            return output + extra
        return (output[0] + extra, *output[1:])


def uninstall(qmodel) -> None:
    """Remove every QwT hook and `qmodel.qwt`."""
    for module in qmodel.modules():
        for key in [k for k, h in module._forward_hooks.items() if isinstance(h, _Compensate)]:
            del module._forward_hooks[key]
            module._forward_hooks_with_kwargs.pop(key, None)
    if "qwt" in qmodel._modules:
        del qmodel._modules["qwt"]


def compensation_of(qmodel) -> QwTCompensation | None:
    comp = getattr(qmodel, "qwt", None)
    return comp if isinstance(comp, QwTCompensation) else None


# -- the fit ------------------------------------------------------------------------------------------
def skip_reason(qmodel, unit_name: str, x: torch.Tensor, out: torch.Tensor) -> str | None:
    """Why the unit gets no compensation, or None: it must map token tensors to token tensors of the same
    shape, channels last."""
    if x.dim() < 3 or out.shape != x.shape:
        return (f"input {tuple(x.shape[1:])} and output {tuple(out.shape[1:])} are not token tensors of the same "
                "shape")
    if out.dim() == 4 and any(isinstance(m, QuantConv2d) for m in qmodel.submodule(unit_name).modules()):
        return "a convolutional feature map (channels not last)"
    return None


@torch.no_grad()
def least_squares(x: torch.Tensor, r: torch.Tensor, ridge: float = RIDGE) -> tuple[torch.Tensor, torch.Tensor, dict]:
    """W [C_in, C_out], b [C_out] minimising ‖r − x·W − b‖² + λ‖W‖² (λ = ridge · mean diag xᵀx), in float64,
    and the fit's facts: r2 (pooled over channels), rows, mse_before (mean r²), mse_after (mean residual²)."""
    x, r = x.reshape(-1, x.shape[-1]), r.reshape(-1, r.shape[-1])
    n, c = x.shape
    dev = x.device
    gram = torch.zeros(c + 1, c + 1, dtype=torch.float64, device=dev)
    xtr = torch.zeros(c + 1, r.shape[1], dtype=torch.float64, device=dev)
    r_sum = torch.zeros(r.shape[1], dtype=torch.float64, device=dev)
    r_sq = torch.zeros((), dtype=torch.float64, device=dev)
    for s in range(0, n, ROWS_PER_CHUNK):
        xs = torch.cat([x[s:s + ROWS_PER_CHUNK].double(),
                        torch.ones(min(ROWS_PER_CHUNK, n - s), 1, dtype=torch.float64, device=dev)], 1)
        rs = r[s:s + ROWS_PER_CHUNK].double()
        gram += xs.T @ xs
        xtr += xs.T @ rs
        r_sum += rs.sum(0)
        r_sq += rs.pow(2).sum()
    lam = ridge * float(gram.diagonal()[:c].mean())
    reg = gram.clone()
    reg.diagonal()[:c] += lam
    beta = torch.linalg.lstsq(reg.cpu(), xtr.cpu()).solution.to(dev) if lam == 0 else torch.linalg.solve(reg, xtr)
    residual = torch.zeros((), dtype=torch.float64, device=dev)
    for s in range(0, n, ROWS_PER_CHUNK):
        xs = x[s:s + ROWS_PER_CHUNK].double()
        residual += (r[s:s + ROWS_PER_CHUNK].double() - xs @ beta[:c] - beta[c]).pow(2).sum()
    total = float(r_sq - r_sum.pow(2).sum() / n)
    facts = {"rows": n, "r2": 1.0 - float(residual) / total if total > 0 else float("-inf"),
             "mse_before": float(r_sq) / r.numel(), "mse_after": float(residual) / r.numel()}
    return beta[:c].float(), beta[c].float(), facts


@torch.no_grad()
def compensate(qmodel, images: torch.Tensor, teacher, batch_size: int = 32, ridge: float = RIDGE,
               progress: bool = False) -> QwTCompensation:
    """Fit and install QwT on a calibrated `qmodel` (in place; returns `qmodel.qwt`). teacher: the float
    model the error is measured against (a bypassed QuantizedModel of the same structure, e.g.
    reconstruction.float_teacher taken before the base method ran)."""
    if not qmodel.structure.units:
        raise VitquantError("QwT compensates units (blocks), but this model's structure has none")
    uninstall(qmodel)
    comp = QwTCompensation()
    comp.ridge = ridge
    t_start = time.perf_counter()
    comp.install(qmodel)  # empty now; each unit's term is installed as soon as it is fitted
    images = images.to(next(qmodel.parameters()).device)
    was_training = qmodel.training
    qmodel.eval()
    calls: UnitInputs | None = None
    nxt: torch.Tensor | None = None
    try:
        for unit in qmodel.structure.units:
            t0 = time.perf_counter()
            if unit.chained and calls is not None and nxt is not None:
                calls = calls.with_x(nxt)  # the previous (compensated) unit's output
            else:  # a forward of the quantized model with every earlier unit's compensation in place
                calls = unit_io(qmodel, unit.name, images, batch_size, with_output=False)[0]
            module = qmodel.submodule(unit.name)
            yq = unit_outputs(module, calls, batch_size)
            why = skip_reason(qmodel, unit.name, calls.x, yq)
            rec: dict[str, Any] = {"compensated": False}
            if why is None:
                yf = unit_outputs(teacher.submodule(unit.name), calls, batch_size)
                w, b, facts = least_squares(calls.x, yf - yq, ridge)
                del yf
                rec.update(facts)
                if facts["r2"] > 0:
                    comp.add(unit.name, calls.main, w, b)
                    comp.install(qmodel)
                    yq = yq + (calls.x.reshape(-1, w.shape[0]) @ w.to(yq.dtype) + b.to(yq.dtype)).view_as(yq)
                    rec["compensated"] = True
                else:
                    rec["skipped"] = f"R² = {facts['r2']:.3g} ≤ 0: the linear fit explains none of the error"
            else:
                rec["skipped"] = why
            rec["seconds"] = round(time.perf_counter() - t0, 3)
            comp.record[unit.name] = rec
            nxt = yq
            if progress:
                print(f"qwt {unit.name}: {rec}", flush=True)
    except BaseException:
        uninstall(qmodel)
        raise
    finally:
        qmodel.train(was_training)
    comp.seconds = round(time.perf_counter() - t_start, 3)
    return comp


# -- `<method>+qwt` -----------------------------------------------------------------------------------
def with_qwt(base: type[Method]) -> type[Method]:
    """The method `base` followed by the QwT step: same options, same sites, name `<base>+qwt`."""
    from vitquant.methods.deployable import make_deployable
    from vitquant.methods.reconstruction import float_teacher
    from vitquant.methods.steps import apply_plan

    class WithQwT(base):  # type: ignore[misc, valid-type]
        name = f"{base.name}+qwt"
        summary = f"{base.name} + QwT (CVPR'25): closed-form linear compensation of each block's error"

        def calibrate(self, ctx) -> None:
            # the float target: the model before the base method changes any float weight
            teacher = float_teacher(ctx.qmodel, ctx.float_model)
            super().calibrate(ctx)
            apply_plan(ctx.qmodel, ctx.plan)  # what quantize() does next anyway: compensate the final model
            stand_ins = make_deployable(ctx.qmodel) if ctx.config.deployable else []
            comp = compensate(ctx.qmodel, ctx.images(), teacher)
            comp.stand_ins = stand_ins

    WithQwT.__name__ = WithQwT.__qualname__ = f"{base.__name__}WithQwT"
    return WithQwT
