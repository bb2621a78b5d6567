"""Getting a float model by name: the bundled reference ViT, a vitquant model file (.safetensors with
its .json sidecar), a timm name (+ optional checkpoint), a Hugging Face id or directory ("hf:" prefix
optional for a directory with config.json), "torchvision:<name>", or "python:pkg.module:factory" (your
own nn.Module). Never unpickles: safetensors, or torch.load(weights_only=True) for .pth/.pt/.bin.

`check` (optional) is called on the randomly initialized architecture before any weight is read or
downloaded: the CLI passes the core's structure check, so an unsupported model fails in seconds.
"""
from __future__ import annotations

import json
import pickle
import re
import warnings
from pathlib import Path
from typing import Callable

import torch
from torch import nn

from vitquant.errors import VitquantError
from vitquant.models.sources import (HF_PREFIX, PY_PREFIX, TV_PREFIX, build_from_source, load_hf, load_python,
                                     load_torchvision)

ASSETS = Path(__file__).resolve().parent.parent / "assets"
BUNDLED = {"bundled": "vit_mnist_d6", "vit-mnist-d6": "vit_mnist_d6"}
MODEL_FORMAT = "vitquant-model/1"


def _first_line(e: BaseException) -> str:
    lines = [x.strip() for x in str(e).splitlines() if x.strip()]
    return lines[0].split(". ")[0][:200] if lines else type(e).__name__


def _refused_global(message: str) -> str | None:
    """The object a refused pickle wanted to create (torch words it 'GLOBAL posix.system'), if named."""
    m = re.search(r"GLOBAL ([\w.]+)", message)
    return m.group(1) if m else None


def read_state_dict(path: Path) -> dict[str, torch.Tensor]:
    """A checkpoint's tensors, never unpickling anything but tensors and plain containers."""
    if not path.is_file():
        raise VitquantError(f"checkpoint file '{path}' does not exist; check the path")
    if path.suffix == ".safetensors":
        from safetensors import SafetensorError
        from safetensors.torch import load_file

        try:
            return load_file(str(path))
        except (SafetensorError, OSError, ValueError, RuntimeError) as e:
            raise VitquantError(f"checkpoint '{path}' is not a readable safetensors file ({_first_line(e)}): it is "
                                "truncated or damaged; download or export it again") from None
    try:
        with warnings.catch_warnings():  # its protocol note is two lines about the file, not advice
            warnings.filterwarnings("ignore", message="Detected pickle protocol")
            sd = torch.load(str(path), map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as e:
        # torch's own message advises retrying with weights_only=False, i.e. running the file's code:
        # never repeat that advice
        what = _refused_global(str(e))
        raise VitquantError(f"checkpoint '{path}' holds pickled Python objects{f' ({what})' if what else ''}, not "
                            "just tensors; vitquant refuses to run code from a checkpoint: convert it to "
                            ".safetensors where you trust its origin, or use the original weights") from None
    except Exception as e:  # noqa: BLE001 - a truncated zip, a foreign format: torch raises many types
        raise VitquantError(f"could not read checkpoint '{path}' ({_first_line(e)}): it is truncated, damaged or "
                            "not a PyTorch checkpoint; pass a .safetensors or .pth state dict") from None
    for key in ("state_dict", "model", "model_state_dict"):
        if isinstance(sd, dict) and isinstance(sd.get(key), dict):
            sd = sd[key]
    if not isinstance(sd, dict) or not all(isinstance(k, str) and isinstance(v, torch.Tensor) for k, v in sd.items()):
        raise VitquantError(f"checkpoint '{path}' does not hold a state dict (names → tensors); pass the model's "
                            "weights saved with torch.save(model.state_dict(), ...) or safetensors")
    return sd


def _load_weights(model: nn.Module, sd: dict[str, torch.Tensor], path: Path) -> None:
    own = model.state_dict()
    missing = [k for k in own if k not in sd]
    unexpected = [k for k in sd if k not in own]
    # torch reports a shape mismatch as a long traceback even with strict=False; name them instead
    wrong = [f"{k} {tuple(sd[k].shape)} vs {tuple(own[k].shape)}" for k in sd
             if k in own and tuple(sd[k].shape) != tuple(own[k].shape)]
    if missing or unexpected or wrong:
        parts = [f"{what} {items[:5]}{' …' if len(items) > 5 else ''}" for what, items in
                 (("missing", missing), ("unexpected", unexpected), ("wrong shape (checkpoint vs model)", wrong))
                 if items]
        raise VitquantError(f"checkpoint '{path}' does not fit the model: {'; '.join(parts)}; pass the checkpoint "
                            "of this architecture (or the architecture this checkpoint was trained as)")
    try:
        model.load_state_dict(sd, strict=True)
    except RuntimeError as e:
        raise VitquantError(f"checkpoint '{path}' does not fit the model ({_first_line(e)})") from None


def load_vitquant_model(path: Path) -> nn.Module:
    meta_path = path.with_suffix(".json")
    if not meta_path.is_file():
        raise VitquantError(f"'{path}' has no '{meta_path.name}' beside it describing its architecture; keep the "
                            "JSON file written with the model next to it (a plain checkpoint goes with a model name: "
                            "--model NAME --checkpoint FILE)")
    try:
        meta = json.loads(meta_path.read_text(encoding="utf-8"),
                          parse_constant=lambda token: (_ for _ in ()).throw(ValueError(f"{token} is not JSON")))
    except (OSError, UnicodeDecodeError, ValueError) as e:
        raise VitquantError(f"'{meta_path}' is not valid JSON ({_first_line(e)}); restore the file") from None
    if not isinstance(meta, dict) or meta.get("format") != MODEL_FORMAT:
        raise VitquantError(f"'{meta_path}' is not a {MODEL_FORMAT} description")
    fields = {"architecture": str, "model_kwargs": dict, "pretrained_cfg": dict}
    bad = [k for k, t in fields.items() if not isinstance(meta.get(k), t)]
    if bad:
        raise VitquantError(f"'{meta_path}' lacks valid {', '.join(bad)}; restore the file")
    source = {"type": meta["architecture"], "kwargs": meta["model_kwargs"], "pretrained_cfg": meta["pretrained_cfg"],
              "weights": str(path)}
    try:
        model = build_from_source(source)
    except VitquantError:
        raise
    except Exception as e:  # noqa: BLE001 - the sidecar's kwargs reach the model's constructor
        raise VitquantError(f"'{meta_path}' describes a model that cannot be built ({_first_line(e)})") from None
    _load_weights(model, read_state_dict(path), path)
    model.vitquant_meta = meta
    return model


def load_model(name: str, checkpoint: str | Path | None = None,
               check: Callable[[nn.Module], None] | None = None) -> nn.Module:
    """'bundled' | a vitquant .safetensors model file | 'hf:<id or dir>' or a Hugging Face directory |
    'torchvision:<name>' | 'python:pkg.module:factory' | a timm model name (pretrained unless checkpoint)."""
    if name in BUNDLED:
        model = load_vitquant_model(ASSETS / f"{BUNDLED[name]}.safetensors")
        model.vitquant_source = {**model.vitquant_source, "name": name}  # survives a moved install
        return model
    if name.startswith(HF_PREFIX) or (Path(name).is_dir() and (Path(name) / "config.json").is_file()):
        _no_checkpoint(checkpoint, "a Hugging Face model (its directory holds the weights)")
        return load_hf(name[len(HF_PREFIX):] if name.startswith(HF_PREFIX) else name, check)
    if name.startswith(TV_PREFIX):
        return load_torchvision(name[len(TV_PREFIX):], None if checkpoint is None else Path(checkpoint),
                                read_state_dict, _load_weights, check)
    if name.startswith(PY_PREFIX):
        _no_checkpoint(checkpoint, "a python factory (it builds and loads its own weights)")
        return load_python(name[len(PY_PREFIX):], check)
    path = Path(name)
    if path.is_dir():
        raise VitquantError(f"'{path}' is a directory but not a Hugging Face model directory (no config.json); "
                            "pass a model file, a Hugging Face directory, or a timm name")
    if path.suffix == ".safetensors" or path.exists():
        if not path.is_file():
            raise VitquantError(f"model file '{path}' does not exist")
        return load_vitquant_model(path)
    import timm

    if not timm.is_model(name):
        raise VitquantError(
            f"unknown model {name!r}: not 'bundled', not a model file, and not a timm model name (see "
            "timm.list_models()); Hugging Face models are 'hf:<id>', torchvision ones 'torchvision:<name>', "
            "your own 'python:package.module:factory'"
        )
    source = {"type": "timm", "name": name, "kwargs": {}}
    sd = None
    if checkpoint is not None:
        sd = read_state_dict(Path(checkpoint))
        head = sd.get("head.weight")
        if head is not None:
            source["kwargs"]["num_classes"] = int(head.shape[0])
    model = timm.create_model(name, pretrained=False, **source["kwargs"])
    if check is not None:
        check(model.eval())  # before any download
    if sd is not None:
        _load_weights(model, sd, Path(checkpoint))
        source["weights"] = str(checkpoint)
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


def _no_checkpoint(checkpoint, what: str) -> None:
    if checkpoint is not None:
        raise VitquantError(f"--checkpoint does not apply to {what}")
