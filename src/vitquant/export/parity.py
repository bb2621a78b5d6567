"""Parity between the PyTorch simulation and the deployed ONNX Runtime model.

Two numbers decide whether the deployed model is the evaluated one: top-1 of both on the same images
(and how often their predictions agree), and the SQNR of every GEMM's output, simulation as signal,
deployed − simulated as noise: SQNR = 10·log10(Σ sim² / Σ (ort − sim)²). Exact integer pipelines sit at
float32 rounding (> 100 dB); where a value lands within rounding noise of a grid boundary its code flips
by one step and later layers inherit it, so per-layer SQNR decays with depth — the table shows where.

"Identical" counts images whose logits agree to float rounding: no code flipped anywhere in them.
The per-layer numbers come from a second export with every GEMM output exposed ("probes"); top-1 and
agreement come from the plain export, so the probes cannot change what is measured.
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch

from vitquant.calibration.data import LabeledSet, data_config_for, load_labeled
from vitquant.errors import VitquantError
from vitquant.models import QuantizedModel


IDENTICAL_RTOL = 1e-5  # float32 rounding of the same integer pipeline stays far below this


@dataclass
class ParityReport:
    n: int
    sim_top1: float | None  # percent, None without labels
    deployed_top1: float | None
    agreement: float  # percent of images with the same top-1 prediction
    identical: float  # percent of images whose logits match to float rounding (no code flipped anywhere)
    logits_sqnr: float
    layers: dict[str, float] = field(default_factory=dict)  # GEMM name → SQNR dB
    export: Any = None  # the ExportReport of the plain model

    @property
    def top1_gap(self) -> float | None:
        return None if self.sim_top1 is None else self.deployed_top1 - self.sim_top1

    def to_markdown(self) -> str:
        lines = [f"# Parity: PyTorch simulation vs ONNX Runtime ({self.n} images)", ""]
        if self.sim_top1 is not None:
            lines.append(f"- top-1: simulated {self.sim_top1:.2f}%, deployed {self.deployed_top1:.2f}% "
                         f"(gap {self.top1_gap:+.2f} points)")
        lines += [f"- top-1 agreement: {self.agreement:.2f}%",
                  f"- images with identical logits (to float rounding): {self.identical:.1f}%",
                  f"- logits SQNR: {self.logits_sqnr:.1f} dB", "",
                  "| layer | SQNR (dB) |", "|---|---|"]
        lines += [f"| {k} | {v:.1f} |" for k, v in self.layers.items()]
        return "\n".join(lines) + "\n"


def sqnr_db(signal: float, noise: float) -> float:
    if noise == 0:
        return math.inf
    return 10 * math.log10(max(signal, 1e-30) / noise)


def _as_rows(sim: torch.Tensor) -> np.ndarray:
    """A layer's PyTorch output in the deployed graph's 2-D token layout."""
    a = sim.detach().float().numpy()
    if a.ndim == 4:  # patch-embedding conv [B, D, gh, gw] → [B·gh·gw, D]
        a = a.reshape(a.shape[0], a.shape[1], -1).transpose(0, 2, 1)
    return a.reshape(-1, a.shape[-1])


def _data(qmodel: QuantizedModel, data: Any, limit: int | None) -> tuple[torch.Tensor, torch.Tensor | None, str]:
    if isinstance(data, torch.Tensor):
        return data[:limit], None, "tensor"
    if not isinstance(data, LabeledSet):
        data = load_labeled(data, data_config_for(qmodel.model), limit=limit)
    return data.images, data.labels, data.source


@torch.no_grad()
def check_parity(qmodel: QuantizedModel, data: Any = "bundled", *, limit: int | None = 500, batch_size: int = 50,
           **export_kwargs: Any) -> ParityReport:
    """Export `qmodel` (export_kwargs as for `vitquant.export`), run both on `data` ("bundled", an
    ImageFolder path, a LabeledSet or an image tensor) and compare."""
    from vitquant.export.onnx_qdq import export
    from vitquant.export.runtime import OrtModel

    if not isinstance(qmodel, QuantizedModel):
        raise VitquantError("parity compares a QuantizedModel with its export; pass the result of vitquant.quantize")
    images, labels, _ = _data(qmodel, data, limit)
    plain = export(qmodel, **export_kwargs)
    probed = export(qmodel, probes=True, validate=False, **export_kwargs)
    deployed, probe_model = OrtModel(plain.model), OrtModel(probed.model)
    layers = qmodel.weight_layers()
    captured: dict[str, torch.Tensor] = {}
    hooks = [m.register_forward_hook(lambda _m, _i, out, n=n: captured.__setitem__(n, out)) for n, m in layers.items()]
    energy: dict[str, list[float]] = {}
    sim_logits, ort_logits = [], []
    try:
        qmodel.eval()
        for start in range(0, images.shape[0], batch_size):
            x = images[start:start + batch_size]
            captured.clear()
            sim_logits.append(qmodel(x).float())
            ort_logits.append(deployed(x))
            outs = probe_model.run(x)
            for name, sim in captured.items():
                key = f"probe:{name}"
                if key not in outs:
                    continue
                s = _as_rows(sim)
                d = outs[key].reshape(s.shape)
                e = energy.setdefault(name, [0.0, 0.0])
                e[0] += float((s.astype(np.float64) ** 2).sum())
                e[1] += float(((d.astype(np.float64) - s) ** 2).sum())
    finally:
        for h in hooks:
            h.remove()
    sim, ort = torch.cat(sim_logits), torch.cat(ort_logits)
    sim_pred, ort_pred = sim.argmax(1), ort.argmax(1)
    top1 = (lambda p: float((p == labels).float().mean() * 100)) if labels is not None else (lambda p: None)
    noise = float(((ort.double() - sim.double()) ** 2).sum())
    same = (ort - sim).abs().amax(1) <= IDENTICAL_RTOL * sim.abs().amax().clamp_min(1e-12)
    return ParityReport(
        n=int(images.shape[0]), sim_top1=top1(sim_pred), deployed_top1=top1(ort_pred),
        agreement=float((sim_pred == ort_pred).float().mean() * 100),
        identical=float(same.float().mean() * 100),
        logits_sqnr=sqnr_db(float((sim.double() ** 2).sum()), noise),
        layers={k: sqnr_db(*v) for k, v in energy.items()}, export=plain)
