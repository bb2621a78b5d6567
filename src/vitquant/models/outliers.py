"""Outlier-stress variants of a float ViT: function-preserving LayerNorm outlier channels.

Small ViTs trained on small data lack the few huge post-LayerNorm channels that make ImageNet ViTs
hard to quantize (see shared research notes, reference-models.md). Multiplying γ and β of a few
LayerNorm channels by S and dividing the matching input columns of the Linears that read them by S
leaves the float function unchanged but recreates those outlier channels. Every accuracy table reports
such a variant beside each natural model, clearly labelled as a stress test.
"""
from __future__ import annotations

import copy

import torch
from torch import nn

from vitquant.errors import VitquantError
from vitquant.models.fold import fold_channel_affine


@torch.no_grad()
def inject_ln_outliers(model: nn.Module, n_channels: int = 6, factor: float = 30.0, seed: int = 0) -> nn.Module:
    """A copy of `model` whose post-norm activations have `n_channels` channels `factor`× larger in
    every verified norm → layers mapping of its traced structure (norm1→qkv, norm2→fc1, final norm→head
    on a ViT; every such mapping on any family)."""
    if factor <= 0 or n_channels < 1:
        raise VitquantError(f"outlier stress needs factor > 0 and n_channels ≥ 1, got {factor}, {n_channels}")
    from vitquant.models.prepare import prepare

    mappings = prepare(model).structure.mappings
    model = copy.deepcopy(model)
    gen = torch.Generator().manual_seed(seed)
    for pair in mappings:
        norm = model.get_submodule(pair.norm)
        dim = norm.weight.numel()
        if n_channels > dim:
            raise VitquantError(f"cannot make {n_channels} outlier channels in {pair.norm} of width {dim}")
        r = torch.ones(dim)
        r[torch.randperm(dim, generator=gen)[:n_channels]] = 1.0 / factor
        # fold_channel_affine divides the LayerNorm by r: r = 1/S multiplies the chosen channels by S
        fold_channel_affine(norm, [model.get_submodule(n) for n in pair.layers], r, torch.zeros(dim))
    model.vitquant_stress = {"n_channels": n_channels, "factor": factor, "seed": seed}
    return model
