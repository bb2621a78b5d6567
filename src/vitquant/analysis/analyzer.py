"""`vitquant.analyze`: where a quantized ViT loses accuracy, point by point.

For a float model and a QuantConfig, the method is calibrated as `vitquant.quantize` does (unfrozen, see
calibrated.py), then on the calibration images, for every activation site and every weight:
- float statistics: range, percentiles, histogram, inter-channel spread and the channels that set it;
- SQNR of the point in isolation (its own quantizer on float inputs) and in context (its output in the
  fully quantized model against the float model: what reaches it from upstream plus its own error);
- output sensitivity: KL(p_float ‖ p) and the pseudo-label cross-entropy change with only that point
  quantized, and the Fisher (diagonal Hessian) proxy of the loss change (sensitivity.py);
- LRP-0 relevance of the float model (the LRP-QViT score);
and the top offenders, ranked by the measured KL. Per layer, its input site and weight are summed.
The result is an `Analysis` (JSON, markdown; report/html.py renders the HTML report).
"""
from __future__ import annotations

import math
import os
import platform
from dataclasses import dataclass, field
from datetime import datetime, timezone
from typing import Any

import torch
from torch import nn

from vitquant.analysis.calibrated import WEIGHT_SUFFIX, Calibrated, calibrate_unfrozen, kl_to_reference, logits
from vitquant.analysis.probe import float_batches, quantized_batch
from vitquant.analysis.sensitivity import measure, relevance
from vitquant.analysis.stats import StreamStats, sqnr_db
from vitquant.calibration.data import CalibrationSet, data_config_for, load_calibration
from vitquant.config import QuantConfig
from vitquant.errors import VitquantError
from vitquant.models import prepare
from vitquant.models.sources import infer_source


def _finite(v: Any) -> Any:
    """JSON has no inf/NaN: an exact copy's SQNR (+inf) is written as null."""
    if isinstance(v, float) and not math.isfinite(v):
        return None
    if isinstance(v, dict):
        return {k: _finite(x) for k, x in v.items()}
    if isinstance(v, list):
        return [_finite(x) for x in v]
    return v


@dataclass
class Analysis:
    model: str
    config: dict[str, Any]
    images: int
    images_source: str
    points: dict[str, dict[str, Any]]  # every quantization point, forward order
    layers: dict[str, dict[str, Any]]  # per weight layer: its input site + its weight
    offenders: list[str]  # points, worst first
    overall: dict[str, Any]  # the fully quantized model on the analysis images
    histograms: dict[str, dict[str, list[float]]] = field(default_factory=dict)
    channel_profiles: dict[str, list[float]] = field(default_factory=dict)
    grids: dict[str, list[float]] = field(default_factory=dict)  # a per-tensor uniform grid's [lo, hi]
    notes: list[str] = field(default_factory=list)
    machine: str = ""
    seconds: float = 0.0
    created: str = ""

    def to_dict(self) -> dict[str, Any]:
        return _finite({k: getattr(self, k) for k in self.__dataclass_fields__})

    def ranked(self, key: str = "kl") -> list[str]:
        return sorted(self.points, key=lambda p: -(self.points[p].get(key) or 0.0))


def _grid(q) -> list[float] | None:
    """[lo, hi] a per-tensor uniform quantizer represents (for the histogram plots)."""
    s, z = getattr(q, "scale", None), getattr(q, "zero_point", None)
    if s is None or z is None or s.numel() != 1 or not hasattr(q, "qmin"):
        return None
    return [float((q.qmin - z) * s), float((q.qmax - z) * s)]


def _describe(q) -> str:
    if q is None:
        return "float"
    scale = getattr(q, "scale", None)
    per_channel = getattr(q, "channel_axis", None) is not None and scale is not None and scale.numel() > 1
    per = " per-channel" if per_channel else ""
    return f"{type(q).__name__}({q.bits}-bit{per})"


def _stats_and_context(cal: Calibrated, images: torch.Tensor, batch_size: int):
    """Float statistics of every site, and each point's SQNR in the fully quantized model."""
    qm = cal.qmodel
    acts, layers = qm.act_sites(), qm.weight_layers()
    # channels: a conv input's axis 1, else the last axis (for q/k/v the head dimension, not the heads)
    stats = {n: StreamStats(1 if s.channel_axis == 1 and qm.structure.sites[n].consumer == "layer" else -1, seed=i)
             for i, (n, s) in enumerate(acts.items())}
    sig: dict[str, float] = {}
    noi: dict[str, float] = {}
    ref_logits, q_logits = [], []

    def add(key: str, ref: torch.Tensor, out: torch.Tensor) -> None:
        sig[key] = sig.get(key, 0.0) + ref.double().pow(2).sum().item()
        noi[key] = noi.get(key, 0.0) + (out.double() - ref.double()).pow(2).sum().item()

    for taps in float_batches(qm, images, batch_size):
        for n, t in taps.site_out.items():
            stats[n].update(t)
        q = quantized_batch(qm, taps.x)
        for n, t in taps.site_out.items():
            add(n, t, q.site_out[n])
        for n, t in taps.layer_out.items():
            add(f"{n}{WEIGHT_SUFFIX}", t, q.layer_out[n])
        ref_logits.append(taps.logits)
        q_logits.append(q.logits)
    for name, layer in layers.items():
        st = StreamStats(channel_axis=0)
        st.update(layer.weight.detach().reshape(layer.weight.shape[0], -1))
        stats[f"{name}{WEIGHT_SUFFIX}"] = st
    context = {k: sqnr_db(sig[k], noi[k]) for k in sig}
    ref, out = torch.cat(ref_logits), torch.cat(q_logits)
    overall = {"kl": kl_to_reference(ref, out).mean().item(),
               "agreement": (ref.argmax(1) == out.argmax(1)).double().mean().item() * 100,
               "logit_sqnr_db": sqnr_db(ref.double().pow(2).sum().item(), (out - ref).double().pow(2).sum().item())}
    return stats, context, overall


def float_relevance(model: nn.Module, images: torch.Tensor, config: QuantConfig, batch_size: int = 32):
    """LRP-0 relevance on the *original* float model (a method's reparameterization changes the tensors)."""
    from vitquant.methods import get_method

    qm = prepare(model, source=infer_source(model), extra_sites=get_method(config.method).requires_sites,
                 unknown=config.unknown_layers)
    return relevance(qm, images, batch_size)


def analyze(model: nn.Module, config: QuantConfig | str = "w4a4", calib: Any = "bundled", *,
            name: str = "model", eval_data: Any = None, batch_size: int = 32, progress: bool = False) -> Analysis:
    """Analyze `model` quantized with `config` (a QuantConfig or a preset such as "w4a4" for the default
    method) on the calibration images `calib`; eval_data (labeled) adds the top-1 of both models."""
    import time

    t0 = time.perf_counter()
    if isinstance(config, str):
        config = QuantConfig.preset(config)
    elif not isinstance(config, QuantConfig):
        raise VitquantError(f"config must be a QuantConfig or a bits preset like 'w4a4', not {type(config).__name__}")
    if not isinstance(calib, CalibrationSet):
        from vitquant.models.io import input_size_of

        calib = load_calibration(calib, data_config_for(model, input_size_of(model)), n=config.calib_size,
                                 seed=config.seed)
    cal = calibrate_unfrozen(model, config, calib, progress)
    images = calib.images
    sens = measure(cal, images, batch_size)
    stats, context, overall = _stats_and_context(cal, images, batch_size)
    rel = float_relevance(model, images, config, batch_size)
    acts, layers = cal.qmodel.act_sites(), cal.qmodel.weight_layers()
    points: dict[str, dict[str, Any]] = {}
    grids: dict[str, list[float]] = {}
    for p, bits in cal.points().items():
        q = acts[p].quantizer if p in acts else layers[p[: -len(WEIGHT_SUFFIX)]].weight_quantizer
        rec: dict[str, Any] = {"kind": "act" if p in acts else "weight", "bits": bits, "quantizer": _describe(q),
                               "relevance": rel.get(p, 0.0), "sqnr_context_db": context.get(p)}
        if p in acts:
            rec["role"] = acts[p].role
            if not acts[p].enabled and bits is not None:
                rec["quantizer"] = "float (left float by the method)"
        rec.update(stats[p].summary() if p in stats else {})
        if p in sens:
            s = sens[p].to_dict()
            rec.update({k: s[k] for k in ("role", "elements", "kl", "ce_delta", "agreement", "fisher", "rel_noise")})
            rec["sqnr_isolated_db"] = sens[p].sqnr_db
        points[p] = rec
        if p in acts and (g := _grid(q)) is not None:
            grids[p] = g
    per_layer = {}
    for layer in cal.qmodel.structure.layers:
        parts = [cal.qmodel.structure.layer_input(layer), f"{layer}{WEIGHT_SUFFIX}"]
        recs = [points[x] for x in parts if x in points]
        per_layer[layer] = {"input": parts[0] if parts[0] in points else None, "weight": parts[1],
                            "kl": sum(r.get("kl") or 0.0 for r in recs),
                            "fisher": sum(r.get("fisher") or 0.0 for r in recs),
                            "relevance": points[parts[1]]["relevance"]}
    notes = [f"{w}: frozen by {config.method} during calibration, so its error is in every measurement "
             "(not separable)" for w in cal.frozen_weights()]
    analysis = Analysis(
        model=name, config=config.to_dict(), images=int(images.shape[0]), images_source=calib.source,
        points=points, layers=per_layer, offenders=[], overall=overall,
        histograms={p: stats[p].histogram() for p in points if p in stats},
        channel_profiles={p: stats[p].channel_profile() for p in points if p in acts and p in stats},
        grids=grids, notes=notes,
        machine=f"{platform.machine()}, {os.cpu_count()} cpus, torch {torch.__version__}, "
                f"{torch.get_num_threads()} thread(s)",
        created=datetime.now(timezone.utc).isoformat(timespec="seconds"))
    analysis.offenders = [p for p in analysis.ranked("kl") if (points[p].get("kl") or 0.0) > 0.0]
    if eval_data is not None:
        analysis.overall.update(_accuracy(model, cal, eval_data, batch_size))
    analysis.seconds = round(time.perf_counter() - t0, 2)
    return analysis


def _accuracy(model: nn.Module, cal: Calibrated, data: Any, batch_size: int) -> dict[str, Any]:
    from vitquant.calibration.data import LabeledSet, load_labeled

    if not isinstance(data, LabeledSet):
        data = load_labeled(data, data_config_for(model, cal.qmodel.structure.input_shape))
    ref = logits(model, data.images, 100)
    out = logits(cal.qmodel, data.images, 100)
    top1 = lambda z: (z.argmax(1) == data.labels).double().mean().item() * 100  # noqa: E731
    return {"float_top1": top1(ref), "top1": top1(out), "eval_images": len(data), "eval_source": data.source}
