"""Which simulated quantizers a QDQ graph can express, and the explicit rule for the ones it cannot.

ONNX QuantizeLinear/DequantizeLinear express one thing: an affine integer grid x̂ = (q − z)·s with
per-tensor or per-axis (s, z). vitquant's UniformQuantizer at ≤ 8 bits is exactly that. Log2/log√2
(RepQ-ViT), twin-uniform (PTQ4ViT), adaptive-log and shift-log grids are not affine, so each one is
exported by a stated rule, never silently:

- "uniform8" (default): the 8-bit uniform grid over the *same range* the simulated grid covers. The
  range is read off the quantizer itself (its outputs for −∞-like and +∞-like inputs), so the rule works
  for any monotone quantizer a method registers. For post-softmax log grids this is [0, s]: 8-bit
  uniform is what the u8 kernel runs anyway, finer than a log grid near s, coarser for tiny values.
- "float": keep that tensor in float (no Q/DQ); the consuming matmul then runs in float.

`QuantConfig(deployable=True)` avoids the question: calibration then only fits quantizers for which
`exports_exactly` holds, so what is evaluated is what runs.
"""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import TYPE_CHECKING

import numpy as np
import torch

from vitquant.errors import VitquantError
from vitquant.methods.deployable import exports_exactly, input_offset, output_range
from vitquant.quantizers import Quantizer, UniformQuantizer

if TYPE_CHECKING:
    from vitquant.export.isa import Scheme

NON_UNIFORM_RULES = ("uniform8", "float")
__all__ = ["NON_UNIFORM_RULES", "ActQuant", "SiteExport", "activation_export", "describe", "exports_exactly"]


@dataclass(frozen=True)
class ActQuant:
    """How one activation tensor is quantized in the graph, on the uint8 grid ONNX Runtime's kernels want.

    codes = clip(round(x / scale) + zero_point, qmin, qmax); qmin/qmax are the simulated grid's bounds
    moved onto uint8 (a signed grid is shifted by 128, which changes nothing in x̂ = (q − z)·s).
    """

    scale: np.ndarray  # float32, shape () or (C,)
    zero_point: np.ndarray  # uint8, same shape
    axis: int | None  # channel axis of a per-channel quantizer, in the tensor's own layout
    qmin: int
    qmax: int
    rule: str  # "exact" or "uniform8"
    detail: str
    offset: float = 0.0  # added before quantizing: the stand-in of a quantizer computing Q(x + c)

    @property
    def per_tensor(self) -> bool:
        return self.axis is None or self.scale.size == 1

    @property
    def needs_clip(self) -> bool:
        return (self.qmin, self.qmax) != ((-128, 127) if self.zero_point.dtype == np.int8 else (0, 255))

    def as_int8(self) -> "ActQuant":
        """The same grid on int8 codes (q − 128, z − 128): x̂ = (q − z)·s is unchanged."""
        if self.zero_point.dtype == np.int8:
            return self
        zp = (self.zero_point.astype(np.int16) - 128).astype(np.int8)
        return dataclasses.replace(self, zero_point=zp, qmin=self.qmin - 128, qmax=self.qmax - 128)


@dataclass(frozen=True)
class SiteExport:
    """The export record of one activation site (shown in the export report)."""

    site: str
    role: str
    simulated: str  # e.g. "uniform 8b asym per-tensor", "log_sqrt2 8b"
    exported: str  # "exact", "uniform8 [lo, hi]", "float (...)", "disabled"


def describe(q: Quantizer | None) -> str:
    if q is None:
        return "none"
    if isinstance(q, UniformQuantizer):
        gran = "per-tensor" if q.channel_axis is None else f"per-channel(axis {q.channel_axis})"
        return f"uniform {q.bits}b {'sym' if q.symmetric else 'asym'} {gran}"
    return f"{q.kind or type(q).__name__} {q.bits}b"


def _uniform_grid(q: UniformQuantizer) -> ActQuant | None:
    """The uint8 form of an affine grid, or None when its zero point cannot be a uint8."""
    scale = q.scale.detach().double().cpu().numpy()
    zp = q.zero_point.detach().double().cpu().numpy()
    # a signed (symmetric) grid [−(2^(b−1)−1), 2^(b−1)−1] moves to uint8 by +128
    shift = 128 if q.qmin < 0 else 0
    zp_u8 = np.round(zp) + shift
    lo, hi = q.qmin + shift, q.qmax + shift
    if zp_u8.min() < 0 or zp_u8.max() > 255 or lo < 0 or hi > 255:
        return None
    axis = None if q.channel_axis is None or scale.size == 1 else q.channel_axis
    shape = (-1,) if axis is not None else ()
    return ActQuant(scale.astype(np.float32).reshape(shape), zp_u8.astype(np.uint8).reshape(shape), axis,
                    lo, hi, "exact", "exact")


def _shifts(q: Quantizer) -> bool:
    rng = output_range(q)
    return rng is not None and rng[1] > rng[0] and input_offset(q, *rng) != 0.0


def activation_export(q: Quantizer, rule: str) -> tuple[ActQuant | None, str]:
    """(grid, description) for a fitted activation quantizer; grid None means "keep in float"."""
    if rule not in NON_UNIFORM_RULES:
        raise VitquantError(f"non-uniform export rule must be one of {NON_UNIFORM_RULES}, not {rule!r}")
    if isinstance(q, UniformQuantizer) and q.bits <= 8:
        grid = _uniform_grid(q)
        if grid is not None:
            return grid, "exact"
        why = "zero point outside uint8"
    elif isinstance(q, UniformQuantizer):
        why = f"{q.bits}-bit grid"
    else:
        why = "no affine form"
    if rule == "float" and not _shifts(q):
        return None, f"float ({why}; rule non_uniform='float')"
    rng = output_range(q)
    if rng is None or rng[1] <= rng[0]:
        return None, f"float ({why}; per-channel grid cannot be probed)"
    u = UniformQuantizer(8, name=q.name)
    u.set_range(torch.tensor(rng[0]), torch.tensor(rng[1]))
    grid, c = _uniform_grid(u), input_offset(q, *rng)
    z = float(grid.zero_point)
    lo, hi = float((grid.qmin - z) * grid.scale), float((grid.qmax - z) * grid.scale)
    shifted = f" of x {'+' if c >= 0 else '−'} {abs(c):.4g}" if c else ""
    detail = f"uniform8 [{lo:.4g}, {hi:.4g}]{shifted} ({why})"
    return dataclasses.replace(grid, rule="uniform8", detail=detail, offset=c), detail


def weight_codes(layer, scheme: "Scheme") -> tuple[np.ndarray, np.ndarray, np.ndarray] | None:
    """(codes [N, K] in the scheme's dtype, scale [N], zero point [N]) of a layer's frozen weight,
    or None when a zero point does not fit the scheme's weight type."""
    wq, w = layer.weight_quantizer, layer.weight.detach().reshape(layer.weight.shape[0], -1)
    n = w.shape[0]
    if scheme.weight_bits < wq.bits:  # re-quantize to the narrower symmetric grid (u8s8-w7)
        qmax = 2 ** (scheme.weight_bits - 1) - 1
        scale = (w.abs().amax(dim=1).double() / qmax).clamp_min(1e-12)
        codes = torch.clamp(torch.round(w.double() / scale[:, None]), -qmax, qmax)
        zp = torch.zeros(n, dtype=torch.float64)
    else:
        codes = wq.quantize(layer.weight.detach()).reshape(n, -1).double()
        scale = torch.broadcast_to(wq.scale.detach().double().reshape(-1), (n,))
        zp = torch.broadcast_to(wq.zero_point.detach().double().reshape(-1), (n,))
        signed = wq.qmin < 0
        if scheme.weight_dtype == "int8" and not signed:  # unsigned grid → centred int8 (same x̂)
            half = 2 ** (wq.bits - 1)  # centring keeps |codes| ≤ 2^(b−1), which is what saturation needs
            codes, zp = codes - half, zp - half
        elif scheme.weight_dtype == "uint8" and signed:
            codes, zp = codes + 128, zp + 128
    dtype = np.int8 if scheme.weight_dtype == "int8" else np.uint8
    info = np.iinfo(dtype)
    if zp.min() < info.min or zp.max() > info.max:  # a channel whose grid does not hold 0
        return None
    return _np64(codes).astype(dtype), _np64(scale).astype(np.float32), _np64(zp).astype(dtype)


def _np64(t: torch.Tensor) -> np.ndarray:
    return t.detach().double().cpu().numpy()
