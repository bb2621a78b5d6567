"""Checking scale-transfer mappings on the model itself: a mapping is kept only if folding a random
per-channel affine map through it leaves the model's output unchanged (in float64, to 1e-7 relative).

Structural checks (derive.py) find candidates; this catches what structure cannot see — zero padding
after the norm (Swin windows of a non-multiple size), a constant added on the way, a reshape that
mixes channels. All candidates are checked at once; only if that fails is each checked alone.
"""
from __future__ import annotations

import copy

import torch
from torch import nn

from vitquant.models.fold import fold_channel_affine
from vitquant.models.io import logits_of
from vitquant.models.qmodules import ActSite, QuantConv2d, QuantLinear
from vitquant.models.structure import ScaleMapping, Structure

REL_TOL = 1e-7


def bypass_all(model: nn.Module, on: bool = True) -> None:
    for m in model.modules():
        if isinstance(m, (ActSite, QuantLinear, QuantConv2d)):
            m.bypass = on


@torch.no_grad()
def _fold_random(model: nn.Module, mappings: list[ScaleMapping], gen: torch.Generator) -> None:
    for m in mappings:
        norm = model.get_submodule(m.norm)
        c = norm.weight.numel()
        r = torch.exp((torch.rand(c, generator=gen, dtype=torch.float64) - 0.5) * 1.4)
        b = torch.randn(c, generator=gen, dtype=torch.float64) * 0.5
        fold_channel_affine(norm, [model.get_submodule(n) for n in m.layers], r, b)


def _error(model: nn.Module, mappings: list[ScaleMapping], x: torch.Tensor, ref: torch.Tensor) -> float:
    trial = copy.deepcopy(model)
    _fold_random(trial, mappings, torch.Generator().manual_seed(len(mappings)))
    out = logits_of(trial(x)).double()
    return float((out - ref).norm() / ref.norm().clamp_min(1e-30))


def verify_mappings(model: nn.Module, structure: Structure, example: torch.Tensor) -> None:
    """Drop every candidate of `structure.mappings` that does not preserve the function (with a reason
    in `structure.rejected_mappings`)."""
    if not structure.mappings:
        return
    probe = copy.deepcopy(model).double()
    bypass_all(probe)
    x = example[:1].double()
    with torch.no_grad():
        ref = logits_of(probe(x)).double()
        if _error(probe, structure.mappings, x, ref) <= REL_TOL:
            return
        kept = []
        for m in structure.mappings:
            err = _error(probe, [m], x, ref)
            if err <= REL_TOL:
                kept.append(m)
            else:
                structure.rejected_mappings[m.norm] = f"folding a scale into {', '.join(m.layers)} changes the output " \
                                                      f"(relative error {err:.1e}: padding or a constant on the way)"
    structure.mappings = kept
