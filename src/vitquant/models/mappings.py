"""Checking scale-transfer mappings on the model itself: a mapping is kept only if folding a random
per-channel affine map through it leaves the outputs of the layers it feeds unchanged.

Structural checks (derive.py) find candidates; this catches what structure cannot see — zero padding
after the norm (Swin windows of a non-multiple size), a constant added on the way, a reshape that
mixes channels. The comparison is local (each consumer layer's output, relative error ≤ 1e-3 in
float32, where a correct fold differs by ~1e-6 and a wrong one by ~5e-2 on the affected positions), so
a branch that a tiny LayerScale hides from the model output is still checked. All candidates are
folded at once; only those that then fail are checked alone (a wrong one perturbs those after it).
"""
from __future__ import annotations

import copy

import torch
from torch import nn

from vitquant.models.fold import fold_channel_affine
from vitquant.models.qmodules import ActSite, QuantConv2d, QuantLinear
from vitquant.models.structure import ScaleMapping, Structure

REL_TOL = 1e-3


def bypass_all(model: nn.Module, on: bool = True) -> None:
    for m in model.modules():
        if isinstance(m, (ActSite, QuantLinear, QuantConv2d)):
            m.bypass = on


@torch.no_grad()
def _fold_random(model: nn.Module, mappings: list[ScaleMapping], gen: torch.Generator) -> None:
    for m in mappings:
        norm = model.get_submodule(m.norm)
        c = norm.weight.numel()
        r = torch.exp((torch.rand(c, generator=gen) - 0.5) * 1.4)
        b = torch.randn(c, generator=gen) * 0.05  # small: W'b must not swamp Wx in float32 (cancellation)
        fold_channel_affine(norm, [model.get_submodule(n) for n in m.layers], r, b)


@torch.no_grad()
def _outputs(model: nn.Module, layers: set[str], x: torch.Tensor) -> dict[str, torch.Tensor]:
    outs: dict[str, torch.Tensor] = {}

    def keep(name: str):
        def hook(_m, _a, out) -> None:  # returns None: a forward hook's return value replaces the output
            outs.setdefault(name, out.detach())
        return hook

    hooks = [model.get_submodule(n).register_forward_hook(keep(n)) for n in layers]
    try:
        model(x)
    finally:
        for h in hooks:
            h.remove()
    return outs


def _failing(model: nn.Module, mappings: list[ScaleMapping], x: torch.Tensor,
             ref: dict[str, torch.Tensor]) -> dict[str, float]:
    """norm → worst relative error of its consumers after folding `mappings` (only those above tolerance)."""
    trial = copy.deepcopy(model)
    _fold_random(trial, mappings, torch.Generator().manual_seed(len(mappings)))
    out = _outputs(trial, {n for m in mappings for n in m.layers}, x)
    bad = {}
    for m in mappings:
        err = max(float((out[n] - ref[n]).norm() / ref[n].norm().clamp_min(1e-30)) for n in m.layers)
        if err > REL_TOL:
            bad[m.norm] = err
    return bad


def verify_mappings(model: nn.Module, structure: Structure, example: torch.Tensor) -> None:
    """Drop every candidate of `structure.mappings` that does not preserve the function (with a reason
    in `structure.rejected_mappings`)."""
    if not structure.mappings:
        return
    probe = copy.deepcopy(model).float()
    bypass_all(probe)
    x = example[:1].float()
    ref = _outputs(probe, {n for m in structure.mappings for n in m.layers}, x)
    suspects = _failing(probe, structure.mappings, x, ref)
    kept = []
    for m in structure.mappings:
        if m.norm in suspects:
            err = _failing(probe, [m], x, ref).get(m.norm)
            if err is not None:
                structure.rejected_mappings[m.norm] = (
                    f"folding a scale into {', '.join(m.layers)} changes their output (relative error {err:.1e}: "
                    "padding, a constant or a channel mix on the way)")
                continue
        kept.append(m)
    structure.mappings = kept
