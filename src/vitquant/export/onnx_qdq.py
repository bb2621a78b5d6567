"""`export`: a quantized (or float) ViT → a QDQ ONNX model carrying vitquant's own calibrated scales.

Steps (deployment.md, "a FP32 ONNX export that already differs from PyTorch — validate it first"):
1. write the *float* graph of the model (a QuantizedModel's frozen weights, quantizers off) and check it
   against PyTorch on a random batch — a mismatch is an exporter bug and stops the export;
2. choose the integer scheme for this CPU (isa.py) and write the QDQ graph: uint8 activations with the
   simulation's exact scales and zero points, per-channel int8 (or uint8) weights from the frozen codes,
   non-affine quantizers by the explicit rule of deployable.py.
Nothing is re-calibrated: every scale in the file is one the method fitted.
"""
from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import onnx
import torch
from torch import nn

from vitquant.errors import VitquantError
from vitquant.export.deployable import NON_UNIFORM_RULES, SiteExport
from vitquant.export.isa import CpuInfo, Scheme, choose_scheme, detect_cpu
from vitquant.export.vit_graph import ViTGraph
from vitquant.models import QuantizedModel

PRODUCER = "vitquant"
BIAS_MODES = ("float", "int32")
FLOAT_TOLERANCE = 1e-4  # max |ONNX − PyTorch| relative to max |PyTorch| for the float graph


@dataclass
class ExportReport:
    path: str | None
    quantized: bool
    scheme: Scheme | None
    cpu: str
    float_check: dict[str, float]
    sites: list[SiteExport] = field(default_factory=list)
    gemms: dict[str, str] = field(default_factory=dict)
    bias: str = "float"  # how GEMM biases are added: "int32" (in the integer GEMM) or "float"
    model: onnx.ModelProto | None = field(default=None, repr=False)

    @property
    def int8_gemms(self) -> int:
        return sum(v == "int8" for v in self.gemms.values())

    def approximations(self) -> list[SiteExport]:
        return [s for s in self.sites if s.exported != "exact"]

    def to_markdown(self) -> str:
        lines = [f"# ONNX export{'' if self.path is None else f': `{self.path}`'}", "",
                 f"- CPU: {self.cpu}",
                 f"- float graph vs PyTorch: max abs error {self.float_check['max_abs_err']:.3g} "
                 f"(outputs up to {self.float_check['max_abs_ref']:.3g})"]
        if self.quantized and self.scheme is not None:
            s = self.scheme
            lines += [f"- integer scheme: **{s.name}** (uint8 activations, {s.weight_bits}-bit {s.weight_dtype} "
                      f"weights) — {s.reason}", *[f"  - {n}" for n in s.notes],
                      f"- GEMMs as integer kernels: {self.int8_gemms} of {len(self.gemms)}; biases: {self.bias}"]
            floats = {k: v for k, v in self.gemms.items() if v != "int8"}
            lines += [f"  - float: {k} — {v}" for k, v in floats.items()]
            approx = self.approximations()
            lines += ["", f"Activation sites: {len(self.sites)}, exported exactly: {len(self.sites) - len(approx)}"]
            if approx:
                lines += ["", "| site | role | simulated | exported as |", "|---|---|---|---|"]
                lines += [f"| {a.site} | {a.role} | {a.simulated} | {a.exported} |" for a in approx]
        return "\n".join(lines) + "\n"


def _inner(model: nn.Module) -> nn.Module:
    return model.model if isinstance(model, QuantizedModel) else model


def check_exportable(model: nn.Module) -> None:
    """The ONNX walker (vit_graph.py) writes timm's VisionTransformer only: anything else is refused
    in one line before any work."""
    from timm.layers.attention import Attention
    from timm.models.vision_transformer import Block, VisionTransformer

    inner = _inner(model)
    what = f"{type(inner).__module__}.{type(inner).__name__}"
    if not isinstance(inner, VisionTransformer):
        raise VitquantError(f"ONNX export supports timm VisionTransformer models (ViT, DeiT, DeiT-III, DINOv2, CLIP "
                            f"ViT) so far; {what} cannot be exported yet (quantize and evaluate it in PyTorch)")
    for i, blk in enumerate(inner.blocks):
        if type(blk) is not Block or type(blk.attn) is not Attention:
            raise VitquantError(f"ONNX export: blocks.{i} of this {what} is a {type(blk).__name__} with "
                                f"{type(getattr(blk, 'attn', None)).__name__} attention; only timm's Block/Attention "
                                "can be exported so far")


def _input_shape(model: nn.Module) -> tuple[int, int, int]:
    pe = _inner(model).patch_embed
    return (pe.proj.weight.shape[1], *pe.img_size)


def _metadata(model: nn.Module, scheme: Scheme | None) -> dict[str, str]:
    inner = _inner(model)
    meta = {"vitquant.input_size": json.dumps(list(_input_shape(model))),
            "vitquant.pretrained_cfg": json.dumps(getattr(inner, "pretrained_cfg", None) or {}, default=str)}
    if isinstance(model, QuantizedModel) and model.config is not None:
        meta["vitquant.config"] = model.config.to_json()
    if scheme is not None:
        meta["vitquant.scheme"] = scheme.name
    return meta


@torch.no_grad()
def check_float_graph(model: nn.Module, graph: onnx.ModelProto, batch: int = 2, seed: int = 0) -> dict[str, float]:
    """Run the float graph in ONNX Runtime and PyTorch on the same random batch; raise on mismatch."""
    from vitquant.export.runtime import session

    x = torch.randn((batch, *_input_shape(model)), generator=torch.Generator().manual_seed(seed))
    if isinstance(model, QuantizedModel):
        with model.bypassed():
            ref = model(x).float().numpy()
    else:
        ref = model.eval()(x).float().numpy()
    out = session(graph, threads=1).run(["logits"], {"input": x.numpy()})[0]
    if out.shape != ref.shape:
        raise VitquantError(f"the float ONNX graph outputs shape {out.shape}, PyTorch {ref.shape}: exporter bug")
    err, scale = float(np.abs(out - ref).max()), float(np.abs(ref).max())
    if not err <= FLOAT_TOLERANCE * max(scale, 1.0):
        raise VitquantError(f"the float ONNX graph differs from PyTorch by {err:.3g} (outputs up to {scale:.3g}); "
                            "the exporter does not reproduce this model — please report it with the model config")
    return {"max_abs_err": err, "max_abs_ref": scale}


def export(
    model: nn.Module, path: str | Path | None = None, *, format: str = "onnx", scheme: str = "auto",
    non_uniform: str = "uniform8", cpu: CpuInfo | None = None, validate: bool = True, probes: bool = False,
    bias: str = "float",
) -> ExportReport:
    """Write `model` (a QuantizedModel, or a float timm ViT) as ONNX and return what was written.

    scheme: "auto" (ISA-aware, see isa.py), "u8s8", "u8u8" or "u8s8-w7".
    non_uniform: "uniform8" or "float" — how quantizers without a QDQ form are exported (deployable.py).
    cpu: the target CPU (default: this machine). probes: also output every GEMM's result (parity).
    bias: "float" (added in float after the integer GEMM: bit-exact with the simulation wherever the
        grids are affine) or "int32" (quantized at s_x·s_w into the GEMM, as integer runtimes usually do:
        one op fewer per layer, but every output moves by up to half an accumulator step and some codes
        downstream flip — see benchmarks/results/export_parity.md; no measurable speed difference here).
    The ModelProto is in `report.model`; with `path` it is also saved there.
    """
    if format != "onnx":
        raise VitquantError(f"export format {format!r} is not supported; use format='onnx'")
    if bias not in BIAS_MODES:
        raise VitquantError(f"bias must be one of {BIAS_MODES}, not {bias!r}")
    if non_uniform not in NON_UNIFORM_RULES:
        raise VitquantError(f"non_uniform must be one of {NON_UNIFORM_RULES}, not {non_uniform!r}")
    check_exportable(model)
    quantized = isinstance(model, QuantizedModel)
    if quantized and model.config is None:
        raise VitquantError("this QuantizedModel was never calibrated; export the result of vitquant.quantize(...)")
    model.eval()
    float_graph = ViTGraph(_inner(model), quantized=False, probes=probes and not quantized)
    graph = float_graph.build(PRODUCER, _metadata(model, None))
    check = check_float_graph(model, graph) if validate else {"max_abs_err": float("nan"), "max_abs_ref": float("nan")}
    cpu = cpu or detect_cpu()
    chosen, walker, float_bias = None, float_graph, True
    if quantized:
        chosen, float_bias = choose_scheme(cpu, _weight_bits(model), scheme), bias == "float"
        walker = ViTGraph(_inner(model), quantized=True, scheme=chosen, non_uniform=non_uniform, probes=probes,
                          float_bias=float_bias, compensation=_compensation(model))
        graph = walker.build(PRODUCER, _metadata(model, chosen))
    if path is not None:
        Path(path).parent.mkdir(parents=True, exist_ok=True)
        onnx.save(graph, str(path))
    return ExportReport(None if path is None else str(path), quantized, chosen, cpu.summary(), check,
                        walker.sites, walker.gemms, "float" if float_bias else "int32", graph)


def _compensation(qmodel: QuantizedModel) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
    """A `<method>+qwt` model's per-block (W, b) (methods/qwt.py), exported as float MatMul + Add."""
    from vitquant.methods.qwt import compensation_of

    comp = compensation_of(qmodel)
    if comp is None:
        return {}
    return {u: (comp.term(u).weight, comp.term(u).bias) for u in comp.units}


def _weight_bits(qmodel: QuantizedModel) -> int:
    bits = [layer.weight_quantizer.bits for layer in qmodel.weight_layers().values()
            if layer.weight_quantizer is not None]
    return max(bits, default=8)


def describe_export(report: ExportReport) -> dict[str, Any]:
    """JSON-friendly summary (for the CLI and benchmark logs)."""
    return {"path": report.path, "scheme": None if report.scheme is None else report.scheme.name,
            "int8_gemms": report.int8_gemms, "gemms": len(report.gemms),
            "approximated_sites": [s.site for s in report.approximations()], "float_check": report.float_check}
