"""Where float models come from, and how to rebuild one from the `source` facts it carries.

A source is plain JSON saved with every quantized model, so `vitquant.load` can rebuild the float
architecture without pickle:
- {"type": "timm", "name", "kwargs"}                       timm.create_model(name, **kwargs)
- {"type": "timm.<ModelClass>", "kwargs"}                  the reference models (VisionTransformer, SwinTransformer)
- {"type": "hf", "class", "config"}                        transformers <class>(<Config>.from_dict(config))
- {"type": "torchvision", "name", "kwargs"}                torchvision.models.get_model(name, **kwargs)
- {"type": "python", "factory": "pkg.mod:fn", "kwargs"}    a user's own nn.Module from an importable factory
Each may carry "pretrained_cfg" (the preprocessing: input size, mean/std, crop, interpolation).
Hugging Face (`pip install 'vitquant[hf]'`) and torchvision are imported only when used.
"""
from __future__ import annotations

import importlib
import json
from pathlib import Path
from typing import Any, Callable

from torch import nn

from vitquant.errors import VitquantError

IMAGENET = {"mean": (0.485, 0.456, 0.406), "std": (0.229, 0.224, 0.225)}
HF_PREFIX, TV_PREFIX, PY_PREFIX = "hf:", "torchvision:", "python:"


def _transformers():
    try:
        import transformers
    except ImportError:
        raise VitquantError("Hugging Face models need transformers: pip install 'vitquant[hf]'") from None
    return transformers


def _torchvision():
    try:
        import torchvision
    except ImportError:
        raise VitquantError("torchvision models need torchvision: pip install torchvision") from None
    return torchvision


# -- rebuilding ------------------------------------------------------------------------------------
def build_from_source(source: dict[str, Any]) -> nn.Module:
    """Rebuild a float architecture (random weights) from the `source` facts a model carries."""
    kind = source.get("type")
    kwargs = dict(source.get("kwargs") or {})
    if kind == "timm":
        import timm

        model = timm.create_model(source["name"], pretrained=False, **kwargs)
    elif isinstance(kind, str) and kind.startswith("timm.") and kind[5:].isidentifier():
        import timm.models

        cls = getattr(timm.models, kind[5:], None)  # a timm model class built from kwargs (the references)
        if not (isinstance(cls, type) and issubclass(cls, nn.Module)):
            raise VitquantError(f"timm has no model class {kind[5:]!r}")
        model = cls(**kwargs)
    elif kind == "hf":
        tf = _transformers()
        cls = getattr(tf, source["class"], None)
        if cls is None:
            raise VitquantError(f"transformers has no model class {source['class']!r} (version {tf.__version__})")
        model = cls(cls.config_class.from_dict(source["config"]))
    elif kind == "torchvision":
        model = _torchvision().models.get_model(source["name"], weights=None, **kwargs)
    elif kind == "python":
        model = import_factory(source["factory"])(**kwargs)
        if not isinstance(model, nn.Module):
            raise VitquantError(f"{source['factory']} returned a {type(model).__name__}, not an nn.Module")
    else:
        raise VitquantError(f"cannot rebuild a model of source type {kind!r}; pass the float model explicitly")
    if source.get("pretrained_cfg"):
        model.pretrained_cfg = dict(source["pretrained_cfg"])
    model.vitquant_source = source
    return model.eval()


def import_factory(spec: str) -> Callable[..., nn.Module]:
    """'pkg.module:function' → the function (the user's own model factory)."""
    module, sep, attr = spec.partition(":")
    if not sep or not module or not attr:
        raise VitquantError(f"a model factory is written 'package.module:function', not {spec!r}")
    try:
        fn = getattr(importlib.import_module(module), attr)
    except (ImportError, AttributeError) as e:
        raise VitquantError(f"cannot import model factory {spec!r}: {e}") from None
    if not callable(fn):
        raise VitquantError(f"model factory {spec!r} is not callable")
    return fn


def infer_source(model: nn.Module) -> dict[str, Any] | None:
    """The source of a model a user built themselves, when it can be known without guessing: a Hugging
    Face model carries its full config; a timm model its architecture name (kwargs from its head)."""
    known = getattr(model, "vitquant_source", None)
    if known:
        return known
    config = getattr(model, "config", None)
    if config is not None and hasattr(config, "to_dict") and type(model).__module__.startswith("transformers"):
        return {"type": "hf", "class": type(model).__name__, "config": config.to_dict(),
                "pretrained_cfg": dict(getattr(model, "pretrained_cfg", None) or {})}
    pcfg = getattr(model, "pretrained_cfg", None) or {}
    arch = pcfg.get("architecture")
    if arch and type(model).__module__.startswith("timm"):
        kwargs = {}
        n = getattr(model, "num_classes", None)
        if isinstance(n, int):
            kwargs["num_classes"] = n
        return {"type": "timm", "name": arch, "kwargs": kwargs, "pretrained_cfg": dict(pcfg)}
    return None


# -- loading by name --------------------------------------------------------------------------------
def hf_preprocessing(processor: dict[str, Any], config) -> dict[str, Any]:
    """timm-style preprocessing facts from a Hugging Face image processor config."""
    size = processor.get("crop_size") or processor.get("size") or {}
    if isinstance(size, int):
        size = {"height": size, "width": size}
    h = size.get("height") or size.get("shortest_edge") or getattr(config, "image_size", 224)
    w = size.get("width") or size.get("shortest_edge") or h
    resize = processor.get("size") or {}
    short = resize.get("shortest_edge") if isinstance(resize, dict) else None
    crop_pct = float(min(h, w)) / short if processor.get("do_center_crop") and short else 1.0
    interpolation = {0: "nearest", 1: "lanczos", 2: "bilinear", 3: "bicubic"}.get(processor.get("resample", 2), "bilinear")
    return {"input_size": (int(getattr(config, "num_channels", 3)), int(h), int(w)),
            "mean": tuple(processor.get("image_mean") or IMAGENET["mean"]),
            "std": tuple(processor.get("image_std") or IMAGENET["std"]),
            "crop_pct": crop_pct, "interpolation": interpolation}


def load_hf(name: str, check: Callable[[nn.Module], None] | None = None) -> nn.Module:
    """A Hugging Face model id or local directory (config.json + safetensors). The architecture is
    built from its config and checked before any weight is read or downloaded."""
    tf = _transformers()
    local = Path(name)
    try:
        config = tf.AutoConfig.from_pretrained(name)
    except Exception as e:  # noqa: BLE001 - hub/network/file errors come in many types
        where = "directory" if local.exists() else "model id"
        raise VitquantError(f"could not read the Hugging Face config of {where} {name!r} ({type(e).__name__}); "
                            "without network access pass a local directory with config.json") from None
    archs = getattr(config, "architectures", None) or []
    cls = getattr(tf, archs[0], None) if archs else None
    if cls is None:
        cls = tf.AutoModelForImageClassification if getattr(config, "num_labels", 0) else tf.AutoModel
    model = cls.from_config(config) if hasattr(cls, "from_config") else cls(config)
    processor = {}
    pp = local / "preprocessor_config.json"
    if pp.is_file():
        processor = json.loads(pp.read_text())
    else:
        try:
            from huggingface_hub import hf_hub_download

            processor = json.loads(Path(hf_hub_download(name, "preprocessor_config.json")).read_text())
        except Exception:  # noqa: BLE001 - no processor config: ImageNet defaults, as the warning says
            processor = {}
    model.pretrained_cfg = hf_preprocessing(processor, config)
    if check is not None:
        check(model.eval())
    try:
        model = type(model).from_pretrained(name, use_safetensors=True)
    except Exception as e:  # noqa: BLE001
        raise VitquantError(f"could not load the safetensors weights of {name!r} ({type(e).__name__}: "
                            f"{str(e).splitlines()[0][:160]}); vitquant reads safetensors only (no pickle)") from None
    model.pretrained_cfg = hf_preprocessing(processor, config)
    model.vitquant_source = {"type": "hf", "class": type(model).__name__, "config": model.config.to_dict(),
                             "pretrained_cfg": model.pretrained_cfg, "weights": name}
    return model.eval()


def torchvision_preprocessing(name: str) -> dict[str, Any]:
    tv = _torchvision()
    try:
        weights = tv.models.get_model_weights(name).DEFAULT
        t = weights.transforms()
        crop, resize = t.crop_size[0], t.resize_size[0]
        return {"input_size": (3, crop, crop), "mean": tuple(t.mean), "std": tuple(t.std),
                "crop_pct": crop / resize, "interpolation": str(t.interpolation.value)}
    except Exception:  # noqa: BLE001 - a model without registered weights
        return {"input_size": (3, 224, 224), **IMAGENET, "crop_pct": 0.875, "interpolation": "bilinear"}


def load_torchvision(name: str, checkpoint: Path | None, read_state: Callable, load_weights: Callable,
                     check: Callable[[nn.Module], None] | None = None) -> nn.Module:
    """read_state(path) → state dict; load_weights(model, sd, path) checks names and shapes, then loads."""
    tv = _torchvision()
    if name not in tv.models.list_models():
        raise VitquantError(f"torchvision has no model {name!r} (see torchvision.models.list_models())")
    source = {"type": "torchvision", "name": name, "kwargs": {}, "pretrained_cfg": torchvision_preprocessing(name)}
    sd = read_state(checkpoint) if checkpoint is not None else None
    if sd is not None:
        heads = [v for k, v in sd.items() if k.endswith("weight") and v.dim() == 2]
        if heads and heads[-1].shape[0] != 1000:
            source["kwargs"]["num_classes"] = int(heads[-1].shape[0])
    model = build_from_source(source)
    if check is not None:
        check(model)
    if sd is not None:
        load_weights(model, sd, checkpoint)
        source["weights"] = str(checkpoint)
    else:
        try:
            model.load_state_dict(tv.models.get_model_weights(name).DEFAULT.get_state_dict(progress=False))
        except Exception as e:  # noqa: BLE001
            raise VitquantError(f"could not get pretrained weights for torchvision {name!r} ({type(e).__name__}); "
                                "without network access pass --checkpoint FILE") from None
    model.vitquant_source = source
    return model.eval()


def load_python(spec: str, check: Callable[[nn.Module], None] | None = None) -> nn.Module:
    source = {"type": "python", "factory": spec, "kwargs": {}}
    model = build_from_source(source)
    if check is not None:
        check(model)
    model.vitquant_source = {**source, "pretrained_cfg": dict(getattr(model, "pretrained_cfg", None) or {})}
    return model.eval()


__all__ = ["HF_PREFIX", "PY_PREFIX", "TV_PREFIX", "build_from_source", "import_factory", "infer_source",
           "load_hf", "load_python", "load_torchvision"]
