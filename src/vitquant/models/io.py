"""What goes into a model and what comes out, for any family: its input size, its logits.

The input size comes from the model itself (a timm ViT built with img_size=384, an HF config's
image_size, torchvision's image_size), not from a pretrained config that may describe another size.
"""
from __future__ import annotations

from typing import Any

import torch
from torch import nn


def _pair(v: Any) -> tuple[int, int] | None:
    if isinstance(v, int):
        return (v, v)
    if isinstance(v, (tuple, list)) and len(v) == 2 and all(isinstance(i, int) for i in v):
        return (int(v[0]), int(v[1]))
    return None


def _channels(model: nn.Module) -> int | None:
    for m in model.modules():  # the first 2-D convolution (a float Conv2d or its twin)
        w = getattr(m, "weight", None)
        if isinstance(w, torch.Tensor) and w.dim() == 4 and "conv" in type(m).__name__.lower():
            return int(w.shape[1] * getattr(m, "groups", 1))
    return None


def input_size_of(model: nn.Module) -> tuple[int, int, int] | None:
    """(C, H, W) the model is built for, read from the model; None when it does not say."""
    cfg = getattr(model, "config", None)  # Hugging Face
    if cfg is not None and _pair(getattr(cfg, "image_size", None)):
        h, w = _pair(cfg.image_size)
        return (int(getattr(cfg, "num_channels", None) or _channels(model) or 3), h, w)
    for holder in (getattr(model, "patch_embed", None), model):  # timm ViT family / torchvision ViT
        size = _pair(getattr(holder, "img_size", None)) or _pair(getattr(holder, "image_size", None))
        if size is not None:
            return (_channels(model) or 3, *size)
    for m in model.modules():  # the first embedding that states it (TNT's pixel embedding, Twins, …)
        size = _pair(getattr(m, "img_size", None))
        if size is not None:
            return (_channels(model) or 3, *size)
    pcfg = getattr(model, "pretrained_cfg", None) or {}
    if pcfg.get("input_size"):
        return tuple(int(v) for v in pcfg["input_size"])  # type: ignore[return-value]
    return None


def logits_of(out: Any) -> torch.Tensor:
    """The tensor a classifier's forward returns: itself, `.logits` of a Hugging Face output, or the first
    tensor of a tuple/dict (a backbone's features)."""
    if isinstance(out, torch.Tensor):
        return out
    logits = getattr(out, "logits", None)
    if isinstance(logits, torch.Tensor):
        return logits
    if isinstance(out, dict):
        for v in out.values():
            if isinstance(v, torch.Tensor):
                return v
    if isinstance(out, (tuple, list)):
        for v in out:
            if isinstance(v, torch.Tensor):
                return v
    if hasattr(out, "to_tuple"):
        return logits_of(out.to_tuple())
    raise TypeError(f"the model returned {type(out).__name__}, which holds no tensor")


def nonfinite_weights(model: nn.Module) -> dict[str, int]:
    """Name → count of NaN/Inf values, for every floating-point tensor of the model's state."""
    bad = {}
    for name, t in model.state_dict().items():
        if t.is_floating_point():
            n = int((~torch.isfinite(t)).sum())
            if n:
                bad[name] = n
    return bad


def refuse_nonfinite(model: nn.Module, what: str, opt_out: str = "allow_nonfinite=True") -> None:
    """NaN/Inf weights quantize "successfully" into garbage (0% agreement): refuse them, naming where."""
    from vitquant.errors import VitquantError

    bad = nonfinite_weights(model)
    if bad:
        shown = ", ".join(f"{k} ({n})" for k, n in list(bad.items())[:4]) + (" …" if len(bad) > 4 else "")
        raise VitquantError(f"{what} has {sum(bad.values())} non-finite (NaN/Inf) weight values in {len(bad)} "
                            f"tensor(s): {shown}; fix the checkpoint, or pass {opt_out} to go on anyway")
