"""Running an exported model in ONNX Runtime's CPU provider, as a drop-in for the PyTorch model.

`OrtModel` is an nn.Module whose forward calls an InferenceSession, so `vitquant.evaluate(OrtModel(...))`
measures exactly what is deployed. Session settings are the fast ones for this workload:
ORT_ENABLE_ALL (the QDQ → integer-GEMM fusions and LayerNorm/GELU fusions need ≥ EXTENDED),
sequential execution, intra-op threads = physical cores (SMT siblings share the SIMD units that the
GEMMs saturate, so more threads only add contention).
"""
from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from vitquant.errors import VitquantError


def _ort():
    try:
        import onnxruntime as ort
    except ImportError:
        raise VitquantError("ONNX Runtime is not installed; `pip install vitquant[onnx]` "
                            "(onnx and onnxruntime)") from None
    return ort


def session_options(threads: int | None = None, profile_prefix: str | None = None,
                    optimized_path: str | None = None, spinning: bool = True):
    """spinning=False: idle worker threads sleep instead of busy-waiting for the next run — slightly
    slower for one session, but several sessions (or PyTorch) sharing the cores no longer steal each
    other's CPU (benchmarks that interleave paths need it)."""
    from vitquant.export.isa import detect_cpu

    ort = _ort()
    so = ort.SessionOptions()
    so.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    so.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
    so.intra_op_num_threads = threads or detect_cpu(probe=False).physical_cores
    so.inter_op_num_threads = 1
    if not spinning:
        so.add_session_config_entry("session.intra_op.allow_spinning", "0")
    if profile_prefix:
        so.enable_profiling = True
        so.profile_file_prefix = profile_prefix
    if optimized_path:
        so.optimized_model_filepath = optimized_path
    return so


def session(model: Any, threads: int | None = None, **kwargs):
    """An ORT CPU InferenceSession from a path, bytes or an onnx.ModelProto."""
    ort = _ort()
    if hasattr(model, "SerializeToString"):
        model = model.SerializeToString()
    elif isinstance(model, Path):
        model = str(model)
    if isinstance(model, str) and not Path(model).is_file():
        raise VitquantError(f"ONNX model file '{model}' does not exist")
    return ort.InferenceSession(model, session_options(threads, **kwargs), providers=["CPUExecutionProvider"])


class OrtModel(nn.Module):
    """An exported ONNX model behind the nn.Module interface (forward: float images → logits).

    It carries the preprocessing facts (`pretrained_cfg`) the export stored, so `evaluate` and the
    calibration loaders prepare images exactly as for the PyTorch model.
    """

    def __init__(self, model: Any, threads: int | None = None) -> None:
        super().__init__()
        self.session = session(model, threads)
        meta = self.session.get_modelmeta().custom_metadata_map
        self.pretrained_cfg = json.loads(meta.get("vitquant.pretrained_cfg", "{}")) or None
        if self.pretrained_cfg is not None and self.pretrained_cfg.get("input_size") is None \
                and meta.get("vitquant.input_size"):
            self.pretrained_cfg["input_size"] = tuple(json.loads(meta["vitquant.input_size"]))
        self.scheme = meta.get("vitquant.scheme")
        self.output_names = [o.name for o in self.session.get_outputs()]
        # evaluate()/run_batches() ask a model for its device through a parameter; ORT runs on the CPU
        self._device_anchor = nn.Parameter(torch.empty(0), requires_grad=False)

    def run(self, x: torch.Tensor | np.ndarray, outputs: list[str] | None = None) -> dict[str, np.ndarray]:
        arr = x.detach().cpu().float().numpy() if isinstance(x, torch.Tensor) else np.asarray(x, np.float32)
        names = outputs or self.output_names
        return dict(zip(names, self.session.run(names, {"input": np.ascontiguousarray(arr)})))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.from_numpy(self.run(x, ["logits"])["logits"])


def load_runtime(path: str | Path, threads: int | None = None) -> OrtModel:
    """Open an exported .onnx file for inference (`vitquant eval --backend onnxruntime`)."""
    return OrtModel(str(path), threads)


def op_profile(model: Any, x: np.ndarray, runs: int = 3, threads: int | None = None) -> dict[str, float]:
    """Milliseconds per run spent in each ONNX Runtime op type (after its graph optimizations), from
    ORT's own profiler: where the time of a deployed model goes."""
    import os
    import tempfile

    with tempfile.TemporaryDirectory() as tmp:
        sess = session(model, threads, profile_prefix=os.path.join(tmp, "ort"), spinning=False)
        for _ in range(runs + 1):
            sess.run(None, {"input": x})
        with open(sess.end_profiling(), encoding="utf-8") as fh:
            events = json.load(fh)
    per_op: dict[str, float] = {}
    runs_seen = [e for e in events if e.get("name") == "model_run"]
    for e in events:
        if e.get("cat") == "Node" and e.get("name", "").endswith("_kernel_time"):
            op = e.get("args", {}).get("op_name", "?")
            per_op[op] = per_op.get(op, 0.0) + e["dur"] / 1e3
    n = max(len(runs_seen), 1)
    return {k: v / n for k, v in sorted(per_op.items(), key=lambda kv: -kv[1])}
