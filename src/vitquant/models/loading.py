"""Getting a float model: the bundled reference ViT, a timm name (+ optional checkpoint), or a vitquant
model file (.safetensors with its .json sidecar). Never unpickles: safetensors, or
torch.load(weights_only=True) for .pth/.pt/.bin checkpoints.
"""
from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import torch
from torch import nn

from vitquant.errors import VitquantError

ASSETS = Path(__file__).resolve().parent.parent / "assets"
BUNDLED = {"bundled": "vit_mnist_d6", "vit-mnist-d6": "vit_mnist_d6"}
MODEL_FORMAT = "vitquant-model/1"


def build_from_source(source: dict[str, Any]) -> nn.Module:
    """Rebuild a float architecture (random weights) from the `source` facts a model carries."""
    import timm
    from timm.models.vision_transformer import VisionTransformer

    kind = source.get("type")
    if kind == "timm":
        model = timm.create_model(source["name"], pretrained=False, **source.get("kwargs", {}))
    elif kind == "timm.VisionTransformer":
        model = VisionTransformer(**source["kwargs"])
    else:
        raise VitquantError(f"cannot rebuild a model of source type {kind!r}; pass the float model explicitly")
    if source.get("pretrained_cfg"):
        model.pretrained_cfg = dict(source["pretrained_cfg"])
    model.vitquant_source = source
    return model.eval()


def read_state_dict(path: Path) -> dict[str, torch.Tensor]:
    if not path.is_file():
        raise VitquantError(f"checkpoint file '{path}' does not exist")
    if path.suffix == ".safetensors":
        from safetensors.torch import load_file

        return load_file(str(path))
    try:
        sd = torch.load(str(path), map_location="cpu", weights_only=True)
    except Exception as e:  # noqa: BLE001 - any unpickling refusal or corrupt file
        raise VitquantError(f"could not read checkpoint '{path}' safely (weights_only=True): {e}") from None
    for key in ("state_dict", "model", "model_state_dict"):
        if isinstance(sd, dict) and isinstance(sd.get(key), dict):
            sd = sd[key]
    if not isinstance(sd, dict):
        raise VitquantError(f"checkpoint '{path}' does not hold a state dict")
    return sd


def _load_weights(model: nn.Module, sd: dict[str, torch.Tensor], path: Path) -> None:
    missing, unexpected = model.load_state_dict(sd, strict=False)
    if missing or unexpected:  # strict=False only to name the problem better than torch does
        raise VitquantError(
            f"checkpoint '{path}' does not fit the model: missing {missing[:5]}, unexpected {unexpected[:5]}"
        )


def load_vitquant_model(path: Path) -> nn.Module:
    meta_path = path.with_suffix(".json")
    if not meta_path.is_file():
        raise VitquantError(f"'{path}' has no '{meta_path.name}' beside it describing its architecture")
    meta = json.loads(meta_path.read_text())
    if meta.get("format") != MODEL_FORMAT:
        raise VitquantError(f"'{meta_path}' is not a {MODEL_FORMAT} description")
    source = {"type": meta["architecture"], "kwargs": meta["model_kwargs"], "pretrained_cfg": meta["pretrained_cfg"],
              "weights": str(path)}
    model = build_from_source(source)
    _load_weights(model, read_state_dict(path), path)
    model.vitquant_meta = meta
    return model


def load_model(name: str, checkpoint: str | Path | None = None) -> nn.Module:
    """'bundled' | a vitquant .safetensors model file | a timm model name (pretrained unless checkpoint)."""
    if name in BUNDLED:
        model = load_vitquant_model(ASSETS / f"{BUNDLED[name]}.safetensors")
        model.vitquant_source = {**model.vitquant_source, "name": name}  # survives a moved install
        return model
    path = Path(name)
    if path.suffix == ".safetensors" or path.exists():
        if not path.is_file():
            raise VitquantError(f"model file '{path}' does not exist")
        return load_vitquant_model(path)
    import timm

    if not timm.is_model(name):
        raise VitquantError(
            f"unknown model {name!r}: not 'bundled', not a model file, and not a timm model name "
            "(see timm.list_models())"
        )
    source = {"type": "timm", "name": name, "kwargs": {}}
    if checkpoint is not None:
        ckpt = Path(checkpoint)
        sd = read_state_dict(ckpt)
        head = sd.get("head.weight")
        if head is not None:
            source["kwargs"]["num_classes"] = int(head.shape[0])
        model = timm.create_model(name, pretrained=False, **source["kwargs"])
        _load_weights(model, sd, ckpt)
        source["weights"] = str(ckpt)
    else:
        try:
            model = timm.create_model(name, pretrained=True)
        except Exception as e:  # noqa: BLE001 - hub/network errors come in many types
            raise VitquantError(
                f"could not get pretrained weights for timm model {name!r} ({type(e).__name__}); "
                "without network access pass --checkpoint FILE"
            ) from None
    source["pretrained_cfg"] = dict(getattr(model, "pretrained_cfg", {}) or {})
    model.vitquant_source = source
    return model.eval()
