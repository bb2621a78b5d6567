"""Steps that methods compose: fit weight quantizers, fit activation quantizers from observers, capture
layer inputs unit by unit in memory-bounded passes."""
from __future__ import annotations

from typing import Callable, Iterator

import torch

from vitquant.calibration.engine import model_device
from vitquant.calibration.observer import ReservoirObserver
from vitquant.methods.deployable import deployable_plan
from vitquant.models.qmodules import ActSite
from vitquant.models.quantized import QuantizedModel
from vitquant.plan import SitePlan
from vitquant.profiling import release_memory
from vitquant.quantizers import Quantizer, RangeRule, UniformQuantizer


def fit_weights(qmodel: QuantizedModel, plan: SitePlan, rule: RangeRule, symmetric: bool = False,
                only: set[str] | None = None) -> None:
    """Per-output-channel weight quantizers for every Linear and Conv the plan quantizes (or the layers
    named in `only`)."""
    for name, layer in qmodel.weight_layers().items():
        if only is not None and name not in only:
            continue
        bits = plan.weight(name)
        if bits is None:
            layer.weight_enabled, layer.weight_quantizer = False, None
            continue
        q = UniformQuantizer(bits, symmetric=symmetric, channel_axis=0, name=f"{name}.weight")
        layer.weight_quantizer = q.fit(layer.weight, rule)


def fit_site(site: ActSite, quantizer: Quantizer, observer: ReservoirObserver, rule: RangeRule,
             device: torch.device | None = None) -> None:
    """Fit `quantizer` on the site's statistics and give it to the site. Observers keep their statistics
    on the CPU, so the fitted scales are CPU tensors: `device` (the model's) is where they must live for
    the site's forward (a per-channel CPU scale cannot multiply a CUDA activation)."""
    channel_wise = getattr(quantizer, "channel_axis", None) is not None
    lo, hi = (observer.lo, observer.hi) if channel_wise else observer.tensor_range()
    quantizer.name = site.name
    site.quantizer = quantizer.fit(observer.sample(), rule, lo, hi).to(device)


ActivationPlan = Callable[[ActSite, int], tuple[Quantizer, RangeRule]]


def fit_activations(
    qmodel: QuantizedModel, observers: dict[str, ReservoirObserver], choose: ActivationPlan, plan: SitePlan,
) -> None:
    """Give each site the plan quantizes the quantizer `choose` picks for it, fitted on its statistics."""
    if plan.deployable:  # QuantConfig(deployable=True): affine grids only
        choose = deployable_plan(choose)
    for name, site in qmodel.act_sites().items():
        bits = plan.act(name)
        if bits is None:
            site.enabled, site.quantizer = False, None
            continue
        quantizer, rule = choose(site, bits)
        fit_site(site, quantizer, observers[name], rule, model_device(qmodel))


def observe_and_fit(ctx, choose: ActivationPlan, sample: Callable[[ActSite], bool] | None = None) -> None:
    """`fit_activations(ctx.qmodel, ctx.observe(), choose, ctx.plan)` with each site fitted as soon as its
    statistics are final, its sample then dropped (Context.observe's on_complete): the same fits, while
    memory holds one unit's samples instead of every site's."""
    plan = ctx.plan
    if plan.deployable:  # QuantConfig(deployable=True): affine grids only
        choose = deployable_plan(choose)
    fitted: set[str] = set()

    def fit(site: ActSite, observer: ReservoirObserver) -> None:
        bits = plan.act(site.name)
        if bits is None:
            site.enabled, site.quantizer = False, None
        else:
            quantizer, rule = choose(site, bits)
            fit_site(site, quantizer, observer, rule, ctx.device)
        fitted.add(site.name)

    ctx.observe(sample=sample, on_complete=fit)
    for name, site in ctx.qmodel.act_sites().items():
        if name in fitted:
            continue
        if plan.act(name) is not None:
            raise RuntimeError(f"activation site {name!r} was not observed, so it cannot be fitted")
        site.enabled, site.quantizer = False, None


def apply_plan(qmodel: QuantizedModel, plan: SitePlan) -> None:
    """After any method: what the plan keeps float is float (a method that sets every site itself may
    have given one a quantizer)."""
    for name, site in qmodel.act_sites().items():
        if plan.act(name) is None:
            site.enabled, site.quantizer = False, None
    for name, layer in qmodel.weight_layers().items():
        if plan.weight(name) is None:
            layer.weight_enabled, layer.weight_quantizer = False, None


def place_quantizers(qmodel: QuantizedModel) -> None:
    """Every quantizer on the model's device: a quantized model computes where its float model did, all of
    it, also with quantizers a method fitted from CPU statistics (observers keep theirs on the CPU)."""
    device = model_device(qmodel)
    for module in qmodel.modules():
        if isinstance(module, Quantizer):
            module.to(device)


def freeze(qmodel: QuantizedModel) -> None:
    """The end of every calibration: quantizers on the model's device, weights fake-quantized once."""
    place_quantizers(qmodel)
    with torch.no_grad():
        for layer in qmodel.weight_layers().values():
            layer.freeze_weight()


# -- layer-wise captures, unit by unit ---------------------------------------------------------------
GRAD_BYTES = 256 * 2**20  # unit-output gradients held at once (see capture_by_units)
# A unit output of at least this many floats per image makes a model real-size (DeiT-T/S at 224²: 37,824
# / 75,648; the reference models: 3,264 for the ViTs, 9,408 for the Swin's first stage). Methods whose
# reference schedule is sized for the reference models switch to a CPU schedule there (ias-vit, adalog).
REAL_SIZE_FLOATS = 2**15


def largest_unit_output(qmodel: QuantizedModel, units: list, image: torch.Tensor) -> int:
    """Floats per image of the largest unit output (one image probed)."""
    return max(_probe(qmodel, units, image[:1])[0].values(), default=0)


def schedule_name(requested: str, unit_floats: int, device: torch.device) -> str:
    """The schedule to run, "reference" or "cpu": as requested, or for "auto" "cpu" exactly on a
    real-size model (its largest unit output has ≥ REAL_SIZE_FLOATS floats per image) calibrated on a
    CPU; a GPU affords the reference schedule."""
    if requested != "auto":
        return requested
    return "cpu" if unit_floats >= REAL_SIZE_FLOATS and torch.device(device).type == "cpu" else "reference"


def _probe(qmodel: QuantizedModel, units: list, image: torch.Tensor) -> tuple[dict[str, int], int | None]:
    """From one image: each unit's output size, and the multiply-adds of the first core's Q·Kᵀ."""
    from vitquant.calibration.capture import capture  # late: capture imports the model modules
    from vitquant.calibration.engine import first_tensor

    out_floats: dict[str, int] = {}

    def hook(name):
        def record(_m, _args, out):
            out_floats[name] = first_tensor(out).numel()
        return record

    handles = [qmodel.submodule(u.name).register_forward_hook(hook(u.name)) for u in units]
    try:
        with qmodel.bypassed(), torch.no_grad():
            qmodel(image)
    finally:
        for h in handles:
            h.remove()
    core = next((qmodel.structure.core(c) for u in units for c in u.cores), None)
    if core is None:
        return out_floats, None
    _, caps = capture(qmodel, [], [core], [image], with_grad=False)
    return out_floats, caps[core.name].q.numel() * caps[core.name].kt.shape[-1]


def _unit_output_grads(qmodel: QuantizedModel, units: list, batches: list[torch.Tensor]) -> dict[str, torch.Tensor]:
    """∂L/∂(output) of each unit (L = capture.pseudo_label_loss of the float model), from one forward and
    backward of the whole float model per batch."""
    from vitquant.calibration.capture import pseudo_label_loss
    from vitquant.calibration.engine import first_tensor
    from vitquant.models.dispatch import quiet
    from vitquant.models.io import logits_of

    store: dict[str, list[torch.Tensor]] = {u.name: [] for u in units}

    def hook(name):
        def record(_m, _args, out):
            with quiet():
                t = first_tensor(out)
                if t.requires_grad:
                    t.register_hook(lambda g: store[name].append(g.detach()))
        return record

    handles = [qmodel.submodule(u.name).register_forward_hook(hook(u.name)) for u in units]
    params = [p for p in qmodel.parameters() if p.requires_grad]
    try:
        for p in params:
            p.requires_grad_(False)
        with qmodel.bypassed(), torch.enable_grad():
            for x in batches:
                pseudo_label_loss(logits_of(qmodel(x.clone().requires_grad_(True)))).backward()
    finally:
        for h in handles:
            h.remove()
        for p in params:
            p.requires_grad_(True)
    for name, grads in store.items():
        if len(grads) != len(batches):
            raise RuntimeError(f"unit {name!r} ran {len(grads)} times over {len(batches)} batches; unit-wise "
                               "capture needs each unit called once per forward")
    return {name: torch.cat(grads) for name, grads in store.items()}


def capture_by_units(qmodel: QuantizedModel, units: list, images: torch.Tensor, batch_size: int, with_grad: bool,
                     rows: Callable[[torch.nn.Module], int | None] | None = None, core_macs: int | None = None,
                     seed: int = 0, grad_bytes: int = GRAD_BYTES) -> Iterator[tuple]:
    """Yield (unit, layer captures, core captures) for each unit in forward order (calibration/capture.py),
    computing each unit once on its float inputs, carried from the previous unit (engine.UnitStream),
    instead of one forward of the whole model per unit. With gradients, ∂L/∂(unit output) comes from one
    forward and backward of the whole model (per group of units whose gradients fit `grad_bytes`), and
    each unit backpropagates it. Every tensor is the one a forward of the whole model gives (the tapped
    unit computes its attention explicitly, the others as the model does, as in a whole-model capture).

    rows(layer): the input rows a Linear keeps (None: all); core_macs: each core keeps the operands of as
    many images as make one Q·Kᵀ evaluation cost at most this many multiply-adds (None: all images)."""
    from vitquant.calibration.capture import Subsample, capture
    from vitquant.calibration.engine import UnitStream, first_tensor

    batches = list(images.split(batch_size))
    out_floats, qk_macs = _probe(qmodel, units, images[:1])
    keep_rows = {}
    for u in units:
        for name in u.layers:
            r = rows(qmodel.submodule(name)) if rows is not None else None
            if r is not None:
                keep_rows[name] = r
    core_images = max(1, core_macs // qk_macs) if core_macs and qk_macs else None
    subsample = Subsample(keep_rows, core_images, seed)
    groups = [[]]  # consecutive units whose output gradients fit grad_bytes together
    for u in units:
        if groups[-1] and 4 * len(images) * sum(out_floats.get(v.name, 0) for v in groups[-1] + [u]) > grad_bytes:
            groups.append([])
        groups[-1].append(u)
    stream = UnitStream(qmodel, images, batch_size)
    for group in groups:
        grads = _unit_output_grads(qmodel, group, batches) if with_grad else {}
        for u in group:
            with qmodel.bypassed():
                calls = stream.inputs(u.name, u.chained)
            module = qmodel.submodule(u.name)
            if with_grad:  # the unit's input requires grad, so every activation inside it does
                calls_g = calls.with_x(calls.x.detach().requires_grad_(True))
                grad_out = grads.pop(u.name)

            def run(i: int, _x: torch.Tensor) -> None:
                idx = slice(i * batch_size, (i + 1) * batch_size)
                if with_grad:
                    with torch.enable_grad():
                        args, kwargs = calls_g.call(idx)
                        first_tensor(module(*args, **kwargs)).backward(grad_out[idx])
                else:
                    with torch.no_grad():
                        args, kwargs = calls.call(idx)
                        module(*args, **kwargs)

            layer_caps, core_caps = capture(qmodel, [qmodel.submodule(n) for n in u.layers],
                                            [qmodel.structure.core(c) for c in u.cores], batches, with_grad,
                                            subsample, run=run)
            yield u, layer_caps, core_caps
            del layer_caps, core_caps
            release_memory()  # this unit's tensors (see profiling.release_memory)
