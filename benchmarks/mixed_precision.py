"""Mixed precision under a budget vs uniform bits, on the reference ViTs' outlier-stress variants.

For each model × method × seed: uniform W4A4 (3 seeds) and W6A6 (seed 0: its size is what matters, and
its accuracy is shown for reference), and mixed precision at an average of 4.5 bits for weights and for
activations (vitquant.mixed; weights 3/4/6/8/float, activations 4/6/8/float, float counted as 32 bits)
chosen by each criterion — fisher (knapsack), mptq (greedy), lrp (relevance × noise) — from one
sensitivity table per seed, measured on that seed's 32 calibration images. Top-1 on the 1000-image
MNIST-5k test split (the images accuracy.md uses; the allocation sees only calibration images).
AdaLog's sensitivity tables are measured with RepQ-ViT (reparam_head=true) as a probe: AdaLog would need
four calibrations of minutes each per seed; the allocation is then calibrated with AdaLog itself.

Runs are appended to benchmarks/results/mixed_precision_runs.jsonl (resumable; several processes may
share it). PyTorch uses one thread: the machine is shared, and two threads on two loaded cores run
~10× slower than one.

    PYTHONPATH=src python benchmarks/mixed_precision.py [--models bundled,d12] [--methods ...]
"""
from __future__ import annotations

import argparse
import os
import platform
import statistics
import sys
import time
from datetime import datetime, timezone
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent / "src"))

import torch  # noqa: E402

from vitquant.analysis.sensitivity import elements  # noqa: E402
from vitquant.api import quantize  # noqa: E402
from vitquant.bench import STRESS, ResultsStore  # noqa: E402
from vitquant.calibration.data import data_config_for, load_calibration, load_labeled  # noqa: E402
from vitquant.config import QuantConfig, parse_method_spec  # noqa: E402
from vitquant.evaluate import predict_logits  # noqa: E402
from vitquant.mixed.allocate import CRITERIA, allocate  # noqa: E402
from vitquant.mixed.budget import Budget, effective_bits  # noqa: E402
from vitquant.mixed.tables import build_table  # noqa: E402
from vitquant.models import prepare  # noqa: E402
from vitquant.models.loading import load_model  # noqa: E402
from vitquant.models.outliers import inject_ln_outliers  # noqa: E402
from vitquant.report.table import format_table  # noqa: E402
from vitquant.serialization import write_output_text  # noqa: E402

MODELS = {"bundled": "bundled", "d12": str(HERE / "work" / "vit_mnist_d12.safetensors")}
METHODS = ["repq-vit", "repq-vit:reparam_head=true", "adalog"]
PROBES = {"adalog": "repq-vit:reparam_head=true"}
AVG_BITS = 4.5


def key(r: dict) -> tuple:
    return (r["model"], r["variant"], r["method"], r["bits"], r["seed"], r.get("criterion"))


def config_of(method: str, bits: str, seed: int) -> QuantConfig:
    name, options = parse_method_spec(method)
    return QuantConfig.preset(bits, method=name, options=options, seed=seed)


def evaluate_run(model, config, calib, data, elems) -> dict:
    t0 = time.perf_counter()
    q = quantize(model, config, calib, progress=False)
    seconds = time.perf_counter() - t0
    top1 = (predict_logits(q, data, progress=False).argmax(1) == data.labels).double().mean().item() * 100
    w, a = effective_bits(q, elems)
    return {"top1": top1, "size_bytes": q.size_bytes(), "eff_w_bits": w, "eff_a_bits": a,
            "calib_seconds": round(seconds, 2)}


def run(args) -> None:
    store = ResultsStore(args.store, key=key)
    machine = f"{platform.machine()}, {os.cpu_count()} cpus, torch {torch.__version__}, 1 thread"
    for short in args.models.split(","):
        path = MODELS[short]
        if path != "bundled" and not Path(path).exists():
            print(f"note: {path} not found (train it: benchmarks/train_reference.py --depth 12), skipped")
            continue
        model = inject_ln_outliers(load_model(path), **STRESS)
        cfg = data_config_for(model)
        data = load_labeled("bundled", cfg)
        elems = elements(prepare(model), data.images[:1])
        for method in args.methods.split(","):
            for seed in [int(s) for s in args.seeds.split(",")]:
                calib = load_calibration("bundled", cfg, n=32, seed=seed)
                base = {"model": short, "variant": f"stress S={STRESS['factor']:g}", "method": method, "seed": seed}
                for bits in ("W4A4", "W6A6"):
                    rec = {**base, "bits": bits, "criterion": None}
                    if bits == "W6A6" and seed != 0:
                        continue
                    with store.claim(rec) as mine:
                        if mine:
                            rec.update(evaluate_run(model, config_of(method, bits, seed), calib, data, elems),
                                       machine=machine, finished=_now())
                            store.append(rec)
                            print(_line(rec), flush=True)
                table = None
                for crit in CRITERIA:
                    rec = {**base, "bits": f"avg{AVG_BITS:g}", "criterion": crit}
                    with store.claim(rec) as mine:
                        if not mine:
                            continue
                        config = config_of(method, "w4a4", seed)
                        if table is None:
                            probe = config_of(PROBES[method], "w4a4", seed) if method in PROBES else None
                            table = build_table(model, config, calib, probe=probe)
                        alloc = allocate(table, Budget(avg_bits=AVG_BITS), crit)
                        rec.update(evaluate_run(model, alloc.config(config), calib, data, elems),
                                   planned_w_bits=alloc.avg_weight_bits, planned_a_bits=alloc.avg_act_bits,
                                   counts=alloc.counts(), probe=table.probe, table_seconds=table.seconds,
                                   machine=machine, finished=_now())
                        store.append(rec)
                        print(_line(rec), flush=True)


def _now() -> str:
    return datetime.now(timezone.utc).isoformat(timespec="seconds")


def _line(r: dict) -> str:
    what = r["bits"] + (f" {r['criterion']}" if r.get("criterion") else "")
    return (f"{r['model']} {r['method']} {what} seed {r['seed']}: top-1 {r['top1']:.2f}, "
            f"{r['size_bytes'] / 1e6:.3f} MB, W{r['eff_w_bits']:.2f}A{r['eff_a_bits']:.2f}")


def _stat(values: list[float]) -> str:
    if len(values) == 1:
        return f"{values[0]:.2f}"
    return f"{statistics.mean(values):.2f} ± {statistics.stdev(values):.2f} ({min(values):.1f}–{max(values):.1f})"


def render(store: ResultsStore, load: str) -> str:
    recs = store.records
    groups: dict[tuple, list[dict]] = {}
    for r in recs:
        groups.setdefault((r["model"], r["method"], r["bits"], r.get("criterion")), []).append(r)
    lines = ["# Mixed precision under a budget (average 4.5 bits) vs uniform W4A4 / W6A6", "",
             f"Generated by `benchmarks/mixed_precision.py` on {datetime.now(timezone.utc):%Y-%m-%d} from "
             f"`mixed_precision_runs.jsonl` ({len(recs)} runs); {recs[0]['machine'] if recs else ''}; "
             f"load average when rendered: {load}.", "",
             "Models: the outlier-stress variants (S=30, 6 channels of every norm → layers mapping) of the "
             "bundled 6-block ViT (`bundled`) and the 12-block one (`d12`). Top-1 % on the 1000-image MNIST-5k "
             "test split (one standard error ≈ 0.5 points); mean ± sample std over calibration seeds (min–max). "
             "Mixed: weights 3/4/6/8/float and activations 4/6/8/float chosen per point under an average of "
             "4.5 bits each (element-weighted, float = 32 bits, the image input at 8 bits outside the budget); "
             "`eff. bits` are measured on the quantized model as it runs. Size: deployed bytes "
             "(`QuantizedModel.size_bytes`: weight codes + per-channel fp32 scale/zero point + fp32 rest).", ""]
    models = sorted({k[0] for k in groups})
    for model in models:
        lines += [f"## {model} (stress S=30)", ""]
        rows = []
        for method in [m for m in METHODS if any(k[0] == model and k[1] == m for k in groups)]:
            u4 = groups.get((model, method, "W4A4", None), [])
            u6 = groups.get((model, method, "W6A6", None), [])
            for label, rs in [("uniform W4A4", u4), ("uniform W6A6", u6)] + [
                    (f"mixed {AVG_BITS:g} — {c}", groups.get((model, method, f"avg{AVG_BITS:g}", c), []))
                    for c in CRITERIA]:
                if not rs:
                    continue
                top = [r["top1"] for r in rs]
                beats = ""
                if label.startswith("mixed") and u4 and u6:
                    delta = statistics.mean(top) - statistics.mean(r["top1"] for r in u4)
                    smaller = max(r["size_bytes"] for r in rs) < min(r["size_bytes"] for r in u6)
                    beats = f"{delta:+.2f} / {'yes' if smaller else 'no'}"
                rows.append([method, label, _stat(top), len(rs),
                             f"{statistics.mean(r['size_bytes'] for r in rs) / 1e6:.3f}",
                             f"W{statistics.mean(r['eff_w_bits'] for r in rs):.2f} "
                             f"A{statistics.mean(r['eff_a_bits'] for r in rs):.2f}", beats,
                             rs[0].get("probe", "–")])
        lines += [format_table(["method", "precision", "top-1 %", "seeds", "size MB", "eff. bits",
                                "Δ top-1 vs W4A4 / smaller than W6A6", "sensitivity measured with"], rows), ""]
    return "\n".join(lines)


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--models", default="bundled,d12")
    p.add_argument("--methods", default=",".join(METHODS))
    p.add_argument("--seeds", default="0,1,2")
    p.add_argument("--store", default=str(HERE / "results" / "mixed_precision_runs.jsonl"))
    p.add_argument("--out", default=str(HERE / "results" / "mixed_precision.md"))
    p.add_argument("--render-only", action="store_true")
    args = p.parse_args()
    torch.set_num_threads(1)
    if not args.render_only:
        run(args)
    store = ResultsStore(args.store, key=key)
    load = ", ".join(f"{x:.1f}" for x in os.getloadavg())
    write_output_text(args.out, render(store, load) + "\n")
    print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
