"""vitquant: post-training quantization of Vision Transformers.

    qmodel = vitquant.quantize(model, vitquant.QuantConfig.preset("w4a4", method="repq-vit"), calib)

The names below are imported on first use (PEP 562), so `vitquant --help` and a mistyped command answer
without loading torch and timm (seconds).
"""
from __future__ import annotations

import importlib
import sys
import types
from typing import Any

from vitquant.errors import VitquantError

__version__ = "0.1.0"
_LAZY = {"quantize": "vitquant.api", "QuantConfig": "vitquant.config", "EvalResult": "vitquant.evaluate",
         "evaluate": "vitquant.evaluate", "QuantizedModel": "vitquant.models", "load_model": "vitquant.models.loading",
         "load": "vitquant.serialization", "save": "vitquant.serialization", "analyze": "vitquant.analysis.analyzer"}
__all__ = ["EvalResult", "QuantConfig", "QuantizedModel", "VitquantError", "analyze", "evaluate", "export", "load",
           "load_model", "quantize", "save"]


def __getattr__(name: str) -> Any:
    if name == "export":  # callable: vitquant.export(qmodel, "model.onnx"), and the subpackage
        return importlib.import_module("vitquant.export")
    if name in _LAZY:
        value = getattr(importlib.import_module(_LAZY[name]), name)
        globals()[name] = value  # later lookups skip __getattr__
        return value
    raise AttributeError(f"module 'vitquant' has no attribute {name!r}")


def __dir__() -> list[str]:
    return sorted({*globals(), *__all__})


class _Package(types.ModuleType):
    """Importing the submodule vitquant.evaluate makes Python set `vitquant.evaluate` to that module; the
    verb `vitquant.evaluate(...)` must stay the function, as it was when __init__ imported it eagerly."""

    def __setattr__(self, name: str, value: Any) -> None:
        if name == "evaluate" and isinstance(value, types.ModuleType):
            return
        super().__setattr__(name, value)


sys.modules[__name__].__class__ = _Package
