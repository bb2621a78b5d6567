"""Float rewrites applied before quantization, each exact in float and verified on the model.

- Structural reparameterization (`fold.reparameterize_blocks`): MobileOne/RepMixer-style multi-branch
  blocks become the single conv they compute — the deployed form is what gets quantized.
- BatchNorm folding: an eval-mode BatchNorm that is the only reader of a Linear/Conv's output is folded
  into that layer's weight and bias and replaced by Identity (hybrid stems, LeViT's BN-Linear). The
  candidates come from the traced forward (the layer's output has exactly one use, the BatchNorm), and
  each fold is kept only if the layer's new output equals the BatchNorm's old one (relative error
  ≤ 1e-5 in float32 on the example input).
"""
from __future__ import annotations

import copy

import torch
from torch import nn

from vitquant.models.fold import fold_batchnorm

REL_TOL = 1e-5


def _batchnorm_candidates(model: nn.Module, rec, layers: dict[str, nn.Module]) -> list[tuple[str, str]]:
    pairs = []
    for bn_path, provs in rec.norm_in.items():
        bn = model.get_submodule(bn_path)
        if not isinstance(bn, nn.modules.batchnorm._BatchNorm) or len(provs) != 1:
            continue
        p = provs[0]
        layer = layers.get(p.src)
        if (layer is None or p.kind not in ("conv", "linear") or rec.layer_calls.get(p.src) != 1
                or rec.layer_uses.get(p.src) != [("batch_norm", bn_path)] or bn.running_mean is None
                or layer.weight.shape[0] != bn.num_features):
            continue
        pairs.append((p.src, bn_path))
    return pairs


@torch.no_grad()
def _outputs(model: nn.Module, names: list[str], x: torch.Tensor) -> dict[str, torch.Tensor]:
    outs: dict[str, torch.Tensor] = {}

    def keep(name):
        def hook(_m, _a, out) -> None:
            outs.setdefault(name, out.detach())
        return hook

    hooks = [model.get_submodule(n).register_forward_hook(keep(n)) for n in names]
    try:
        model(x)
    finally:
        for h in hooks:
            h.remove()
    return outs


def _replace(model: nn.Module, path: str, new: nn.Module) -> None:
    parent, _, child = path.rpartition(".")
    setattr(model.get_submodule(parent) if parent else model, child, new)


def _after_norm(bn: nn.Module) -> nn.Module:
    """What a folded BatchNorm leaves behind: nothing, or the dropout and activation a fused
    norm-activation module (timm's BatchNormAct2d) applies after normalizing."""
    rest = [m for m in (getattr(bn, "drop", None), getattr(bn, "act", None)) if isinstance(m, nn.Module)]
    return nn.Sequential(*rest) if rest else nn.Identity()


def fold_batchnorms(model: nn.Module, rec, layers: dict[str, nn.Module], example: torch.Tensor) -> list[str]:
    """Fold every verified (layer, BatchNorm) pair of `model` in place; returns 'bn → layer' for each."""
    pairs = _batchnorm_candidates(model, rec, layers)
    if not pairs:
        return []
    ref = _outputs(model, [bn for _, bn in pairs], example)
    probe = copy.deepcopy(model)
    for layer, bn in pairs:
        fold_batchnorm(probe.get_submodule(layer), probe.get_submodule(bn))
        _replace(probe, bn, _after_norm(probe.get_submodule(bn)))
    out = _outputs(probe, [bn for _, bn in pairs], example)  # the module now in the BatchNorm's place
    done = []
    for layer, bn in pairs:
        a, b = out.get(bn), ref.get(bn)
        if a is None or b is None or a.shape != b.shape:
            continue
        if float((a - b).norm() / b.norm().clamp_min(1e-30)) <= REL_TOL:
            old = model.get_submodule(bn)
            fold_batchnorm(model.get_submodule(layer), old)
            _replace(model, bn, _after_norm(old))
            done.append(f"{bn} → {layer}")
    return done
