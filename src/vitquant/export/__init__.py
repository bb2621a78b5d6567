"""Deployment: a quantized ViT → a QDQ ONNX model → ONNX Runtime's CPU integer kernels.

    report = vitquant.export(qmodel, "model.onnx")        # ISA-aware scheme, vitquant's own scales
    ort_model = vitquant.export.load_runtime("model.onnx")  # an nn.Module: vitquant.evaluate(ort_model)
    vitquant.export.check_parity(qmodel)                    # top-1 and per-layer SQNR, simulation vs ORT

Modules: isa.py (CPU flags → integer scheme), deployable.py (which quantizers QDQ expresses, and the
rule for the others), vit_graph.py (the graph), onnx_qdq.py (export + float validation),
runtime.py (ORT sessions, OrtModel), parity.py (per-layer SQNR), cli.py (`python -m vitquant.export`).
onnx/onnxruntime are optional dependencies (`pip install vitquant[onnx]`), imported on first use.
"""
from __future__ import annotations

import importlib
import sys
import types
from typing import Any

from vitquant.errors import VitquantError
from vitquant.export.isa import CpuInfo, Scheme, choose_scheme, detect_cpu

_LAZY = {"ExportReport": "onnx_qdq", "export": "onnx_qdq", "OrtModel": "runtime", "load_runtime": "runtime",
         "ParityReport": "parity", "check_parity": "parity"}
__all__ = ["CpuInfo", "Scheme", "choose_scheme", "detect_cpu", *_LAZY]


def _load(module: str):
    try:
        return importlib.import_module(f"{__name__}.{module}")
    except ImportError as e:
        if e.name in ("onnx", "onnxruntime"):
            raise VitquantError(f"{e.name} is not installed; `pip install vitquant[onnx]` for ONNX export") from None
        raise


def __getattr__(name: str) -> Any:
    if name in _LAZY:
        return getattr(_load(_LAZY[name]), name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


class _CallableModule(types.ModuleType):
    """`vitquant.export(...)` is the verb and `vitquant.export.runtime` the package: a function of the
    same name would shadow the package attribute (and break `vitquant.export.x` lookups)."""

    def __call__(self, *args: Any, **kwargs: Any):
        return _load("onnx_qdq").export(*args, **kwargs)


sys.modules[__name__].__class__ = _CallableModule
