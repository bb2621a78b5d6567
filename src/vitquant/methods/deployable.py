"""`QuantConfig(deployable=True)`: calibrate only quantizers that an integer runtime executes exactly.

An ONNX QDQ graph (vitquant.export) expresses one kind of grid: affine, x̂ = (q − z)·s, at most 8 bits,
with a zero point that fits the 8-bit type. Log2/log√2, twin-uniform, adaptive-log and other non-affine
grids are simulated faithfully but deployed only approximately (the exporter's "uniform8" rule). With
`deployable=True` what is evaluated is what runs:

1. plan-based methods (`fit_activations`) get a uniform quantizer wherever their plan picks another
   kind, fitted by the same range rule on the same statistics (`deployable_plan`);
2. after any method, a quantizer that still has no exact QDQ form is replaced by its uniform stand-in
   over the range it covers (`make_deployable`, no data needed) — the same rule the exporter applies,
   so the simulation then computes exactly what ONNX Runtime computes.
"""
from __future__ import annotations

from typing import TYPE_CHECKING

import torch

from vitquant.quantizers import Quantizer, RangeRule, UniformQuantizer

if TYPE_CHECKING:
    from vitquant.methods.steps import ActivationPlan
    from vitquant.models.quantized import QuantizedModel

_HUGE = 1e30


def uint8_zero_point_fits(q: UniformQuantizer) -> bool:
    """A signed grid moves to uint8 by +128; the zero point must then lie in [0, 255]."""
    z = torch.round(q.zero_point.detach().double()) + (128 if q.qmin < 0 else 0)
    return bool(z.min() >= 0 and z.max() <= 255)


def exports_exactly(q: Quantizer | None) -> bool:
    """True when Q/DQ reproduce this quantizer bit for bit: an affine grid of at most 8 bits whose zero
    point fits uint8 (a min-max grid of all-positive softmax rows, which does not hold 0, does not)."""
    return isinstance(q, UniformQuantizer) and q.bits <= 8 and q.calibrated and uint8_zero_point_fits(q)


def _device_of(q: Quantizer) -> torch.device:
    """Where q's parameters are (probes must be there: a GPU scale cannot quantize a CPU probe)."""
    return next((b.device for b in q.buffers()), torch.device("cpu"))


def output_range(q: Quantizer) -> tuple[float, float] | None:
    """The extremes a per-tensor monotone quantizer outputs (for −∞-like and +∞-like inputs), widened
    to hold 0; None when it cannot be probed (per-channel parameters, non-finite outputs)."""
    probe = torch.tensor([-_HUGE, 0.0, _HUGE], dtype=torch.float32, device=_device_of(q))
    try:
        with torch.no_grad():
            out = q(probe).double()
    except Exception:  # noqa: BLE001 - per-channel parameters do not broadcast to a [3] probe
        return None
    if out.shape != probe.shape or not torch.isfinite(out).all():
        return None
    return min(float(out.min()), 0.0), max(float(out.max()), 0.0)


def input_offset(q: Quantizer, lo: float, hi: float) -> float:
    """c such that q(x) ≈ x + c on the unclamped part of [lo, hi]; 0 for quantizers that approximate
    their input. Non-zero when a method folded a shift into the next layer (AdaLog's post-GELU
    quantizer computes Q(x + 0.17) and fc2's bias subtracts W·0.17): a stand-in must shift too."""
    ramp = torch.linspace(lo, hi, 4097, device=_device_of(q))
    with torch.no_grad():
        out = q(ramp).double()
    inside = (out > out.min()) & (out < out.max())  # where q is not clamped
    if int(inside.sum()) < 64:
        return 0.0
    c = float((out[inside] - ramp[inside].double()).median())
    return c if abs(c) > 0.02 * (hi - lo) else 0.0


def uniform_stand_in(q: Quantizer, bits: int = 8) -> UniformQuantizer | None:
    """The affine grid of `bits` bits over the range `q` covers (asymmetric, per-tensor), or None when
    there is none: per-channel non-affine grids, or a quantizer that shifts its input (input_offset)."""
    rng = output_range(q)
    if rng is None or rng[1] <= rng[0] or input_offset(q, *rng) != 0.0:
        return None
    u = UniformQuantizer(min(bits, 8), name=q.name)
    u.set_range(torch.tensor(rng[0]), torch.tensor(rng[1]))
    return u


def deployable_plan(plan: "ActivationPlan") -> "ActivationPlan":
    """Wrap a method's activation plan so it only hands out uniform (affine) quantizers."""

    def wrapped(site, bits: int) -> tuple[Quantizer, RangeRule]:
        quantizer, rule = plan(site, bits)
        if isinstance(quantizer, UniformQuantizer) and quantizer.bits <= 8:
            return quantizer, rule
        return UniformQuantizer(min(bits, 8), channel_axis=getattr(quantizer, "channel_axis", None)), rule

    return wrapped


@torch.no_grad()
def make_deployable(qmodel: "QuantizedModel") -> list[str]:
    """Replace every remaining quantizer without an exact QDQ form by its uniform stand-in (before the
    weights are frozen). Returns 'name: old → new' for the report; raises if one has no stand-in."""
    from vitquant.errors import VitquantError
    from vitquant.quantizers import RangeRule as _Rule

    changed = []
    for name, site in qmodel.act_sites().items():
        q = site.quantizer
        if not site.enabled or q is None or exports_exactly(q):
            continue
        u = uniform_stand_in(q, q.bits)
        if u is None:
            raise VitquantError(f"deployable=True: site {name!r} uses a {type(q).__name__} with no uniform stand-in "
                                "(a per-channel non-affine grid, or a shift folded into the next layer); pick a "
                                "method whose quantizers are uniform there, or export without deployable=True")
        site.quantizer = u
        changed.append(f"{name}: {getattr(q, 'kind', type(q).__name__)} {q.bits}b → uniform {u.bits}b")
    for name, layer in qmodel.weight_layers().items():
        q = layer.weight_quantizer
        if q is None or exports_exactly(q) or layer.weight_frozen:
            continue
        u = UniformQuantizer(min(q.bits, 8), channel_axis=0, name=f"{name}.weight").fit(layer.weight, _Rule("minmax"))
        layer.weight_quantizer = u
        changed.append(f"{name}.weight: {getattr(q, 'kind', type(q).__name__)} → uniform per-channel min-max")
    return changed
