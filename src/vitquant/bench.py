"""Resumable accuracy sweeps: models × variants × methods × bit widths × seeds.

Each finished run is appended to a JSON-lines store (one line, flushed and fsynced), so an interrupted
sweep resumes where it stopped and a finished run is never repeated. Tables are rendered from the store.
"""
from __future__ import annotations

import json
import os
import platform
import statistics
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from typing import Any, Callable, Iterator

import torch

from vitquant.api import quantize
from vitquant.calibration.data import data_config_for, load_calibration, load_labeled
from vitquant.config import QuantConfig, parse_bits, parse_method_spec
from vitquant.errors import VitquantError
from vitquant.evaluate import predict_logits
from vitquant.methods import available_methods
from vitquant.models.loading import load_model
from vitquant.models.outliers import inject_ln_outliers
from vitquant.profiling import measure

STRESS = {"n_channels": 6, "factor": 30.0, "seed": 0}


@dataclass
class SweepSpec:
    """methods: names, or name:key=value[:key=value] for a method with options (its own row)."""

    models: list[str]
    methods: list[str]
    bits: list[str] = field(default_factory=lambda: ["w8a8", "w6a6", "w4a4", "w3a3"])
    seeds: list[int] = field(default_factory=lambda: [0, 1, 2])
    stress: bool = True
    calib: str = "bundled"
    eval_data: str = "bundled"
    calib_size: int = 32

    def __post_init__(self) -> None:
        if self.methods == ["all"]:
            self.methods = list(available_methods())
        for m in self.methods:
            name, options = parse_method_spec(m)
            QuantConfig(method=name, options=options)  # validates the name and the options
        for b in self.bits:
            parse_bits(b)
        if not self.models:
            raise VitquantError("a sweep needs at least one model")


def _key(rec: dict[str, Any]) -> tuple:
    return (rec["model"], rec["variant"], rec["method"], rec["bits"], rec["seed"], rec.get("calib_size"))


class ResultsStore:
    """key: what makes two records the same run (default: model, variant, method, bits, seed, calib size)."""

    def __init__(self, path: str | Path, key: Callable[[dict[str, Any]], tuple] | None = None) -> None:
        self.path = Path(path)
        self.key = key or _key
        self.records: list[dict[str, Any]] = []
        if self.path.exists():
            text = self.path.read_text()
            if text and not text.endswith("\n"):  # a write cut by a crash: drop the partial last line
                text = text[: text.rfind("\n") + 1]
                self.path.write_text(text)
            for i, line in enumerate(text.splitlines()):
                if not line.strip():
                    continue
                try:
                    self.records.append(json.loads(line))
                except json.JSONDecodeError:
                    print(f"warning: ignoring unreadable line {i + 1} of {self.path}")
        self._done = {self.key(r) for r in self.records}

    def done(self, rec: dict[str, Any]) -> bool:
        return self.key(rec) in self._done

    def append(self, rec: dict[str, Any]) -> None:
        self.path.parent.mkdir(parents=True, exist_ok=True)
        with open(self.path, "a") as f:
            f.write(json.dumps(rec, sort_keys=True) + "\n")
            f.flush()
            os.fsync(f.fileno())
        self.records.append(rec)
        self._done.add(self.key(rec))


def _variants(model_name: str, stress: bool) -> Iterator[tuple[str, torch.nn.Module]]:
    model = load_model(model_name)
    yield "natural", model
    if stress:
        yield f"stress S={STRESS['factor']:g}", inject_ln_outliers(model, **STRESS)


def _top1(logits: torch.Tensor, labels: torch.Tensor) -> float:
    return (logits.argmax(1) == labels).float().mean().item() * 100


def run_sweep(spec: SweepSpec, store: ResultsStore, progress: bool = True) -> None:
    machine = f"{platform.machine()}, {os.cpu_count()} cpus, torch {torch.__version__}"
    for model_name in spec.models:
        for variant, model in _variants(model_name, spec.stress):
            cfg = data_config_for(model)
            data = load_labeled(spec.eval_data, cfg)
            float_logits = None
            base = {"model": model_name, "variant": variant, "calib_size": spec.calib_size}
            flt = {**base, "method": "float", "bits": "FP32", "seed": 0}
            if not store.done(flt):
                float_logits = predict_logits(model, data, progress=False)
                store.append({**flt, "top1": _top1(float_logits, data.labels), "eval": data.source})
            for method in spec.methods:
                for bits in spec.bits:
                    for seed in spec.seeds:
                        rec = {**base, "method": method, "bits": bits.upper(), "seed": seed}
                        if store.done(rec):
                            continue
                        if float_logits is None:
                            float_logits = predict_logits(model, data, progress=False)
                        name, options = parse_method_spec(method)
                        config = QuantConfig.preset(bits, method=name, options=options, seed=seed,
                                                    calib_size=spec.calib_size)
                        calib = load_calibration(spec.calib, cfg, n=spec.calib_size, seed=seed)
                        with measure() as m:
                            q = quantize(model, config, calib, progress=False)
                        logits = predict_logits(q, data, progress=False)
                        rec.update(top1=_top1(logits, data.labels),
                                   agreement=(logits.argmax(1) == float_logits.argmax(1)).float().mean().item() * 100,
                                   calib_seconds=round(m.seconds, 3), peak_rss_mb=round(m.peak_rss_mb, 1),
                                   delta_rss_mb=round(m.delta_rss_mb, 1), size_bytes=q.size_bytes(),
                                   eval=data.source, machine=machine,
                                   finished=datetime.now(timezone.utc).isoformat(timespec="seconds"))
                        store.append(rec)
                        if progress:
                            print(f"{model_name} [{variant}] {method} {bits} seed {seed}: top-1 {rec['top1']:.2f} "
                                  f"(agree {rec['agreement']:.1f}%), calib {rec['calib_seconds']:.1f} s", flush=True)


def summarize(records: list[dict[str, Any]]) -> dict[tuple, dict[str, Any]]:
    """(model, variant, method, bits) -> mean/spread of top-1 over seeds, mean calib time, max peak RSS."""
    groups: dict[tuple, list[dict[str, Any]]] = {}
    for r in records:
        groups.setdefault((r["model"], r["variant"], r["method"], r["bits"]), []).append(r)
    out = {}
    for k, rs in groups.items():
        top1 = [r["top1"] for r in rs]
        out[k] = {
            "top1": statistics.mean(top1), "min": min(top1), "max": max(top1), "n": len(rs),
            "calib_seconds": statistics.mean(r.get("calib_seconds", 0.0) for r in rs),
            "peak_rss_mb": max(r.get("peak_rss_mb", 0.0) for r in rs),
            "agreement": statistics.mean(r["agreement"] for r in rs) if "agreement" in rs[0] else None,
        }
    return out
