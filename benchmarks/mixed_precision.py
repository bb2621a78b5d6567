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
from vitquant.mixed.budget import A_LEVELS, Budget, effective_bits  # noqa: E402
from vitquant.mixed.tables import build_table  # noqa: E402
from vitquant.models import prepare  # noqa: E402
from vitquant.models.loading import load_model  # noqa: E402
from vitquant.models.outliers import inject_ln_outliers  # noqa: E402
from vitquant.report.table import format_table  # noqa: E402
from vitquant.serialization import write_output_text  # noqa: E402

MODELS = {"bundled": "bundled", "d12": str(HERE / "work" / "vit_mnist_d12.safetensors")}
# the published recipes (reparam_head=false: the head input layer-wise, as the papers) and RepQ-ViT with the
# head reparameterized — what reparam_head="auto", the default since 0b8597f, does on the stress variants
METHODS = ["repq-vit:reparam_head=false", "repq-vit:reparam_head=true", "adalog:reparam_head=false"]
PROBES = {"adalog:reparam_head=false": "repq-vit:reparam_head=true"}
# budget → (average bits, activation levels, the uniform presets it is compared with: lower, higher)
BUDGETS = {"4.5": (4.5, A_LEVELS, "W4A4", "W6A6"), "3.5": (3.5, (3, 4, 6, 8, None), "W3A3", "W4A4")}


def key(r: dict) -> tuple:
    return (r["model"], r["variant"], r["method"], r["bits"], r["seed"], r.get("criterion"))


def config_of(method: str, bits: str, seed: int) -> QuantConfig:
    name, options = parse_method_spec(method)
    return QuantConfig.preset(bits, method=name, options=options, seed=seed)


def top1_of(model, data) -> float:
    return (predict_logits(model, data, progress=False).argmax(1) == data.labels).double().mean().item() * 100


def evaluate_run(model, config, calib, data, elems) -> dict:
    t0 = time.perf_counter()
    q = quantize(model, config, calib, progress=False)
    seconds = time.perf_counter() - t0
    w, a = effective_bits(q, elems)
    return {"top1": top1_of(q, data), "size_bytes": q.size_bytes(), "eff_w_bits": w, "eff_a_bits": a,
            "calib_seconds": round(seconds, 2)}


def run(args) -> None:
    store = ResultsStore(args.store, key=key)
    machine = f"{platform.machine()}, {os.cpu_count()} cpus, torch {torch.__version__}, 1 thread"
    budgets = [BUDGETS[b] for b in args.budgets.split(",")]
    for short in args.models.split(","):
        path = MODELS[short]
        if path != "bundled" and not Path(path).exists():
            print(f"note: {path} not found (train it: benchmarks/train_reference.py --depth 12), skipped")
            continue
        model = inject_ln_outliers(load_model(path), **STRESS)
        cfg = data_config_for(model)
        data = load_labeled("bundled", cfg)
        elems = elements(prepare(model), data.images[:1])
        variant = f"stress S={STRESS['factor']:g}"
        flt = {"model": short, "variant": variant, "method": "float", "bits": "FP32", "seed": 0, "criterion": None}
        with store.claim(flt) as mine:
            if mine:
                store.append({**flt, "top1": top1_of(model, data), "machine": machine, "finished": _now()})
        for method in args.methods.split(","):
            for seed in [int(s) for s in args.seeds.split(",")]:
                calib = load_calibration("bundled", cfg, n=32, seed=seed)
                base = {"model": short, "variant": variant, "method": method, "seed": seed}
                uniform = sorted({u for b in budgets for u in b[2:]})
                for bits in uniform:
                    rec = {**base, "bits": bits, "criterion": None}
                    if bits == max(uniform) and seed != 0:  # the larger preset is there for its size
                        continue
                    with store.claim(rec) as mine:
                        if mine:
                            rec.update(evaluate_run(model, config_of(method, bits, seed), calib, data, elems),
                                       machine=machine, finished=_now())
                            store.append(rec)
                            print(_line(rec), flush=True)
                for avg, a_levels, _, _ in budgets:
                    table = None
                    for crit in CRITERIA:
                        rec = {**base, "bits": f"avg{avg:g}", "criterion": crit}
                        with store.claim(rec) as mine:
                            if not mine:
                                continue
                            config = config_of(method, "w4a4", seed)
                            if table is None:
                                probe = config_of(PROBES[method], "w4a4", seed) if method in PROBES else None
                                table = build_table(model, config, calib, probe=probe, a_levels=a_levels)
                            alloc = allocate(table, Budget(avg_bits=avg), crit)
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


def _budget_table(groups: dict, model: str, budget: str) -> list[list]:
    avg, _, low, high = BUDGETS[budget]
    rows = []
    for method in [m for m in METHODS if any(k[0] == model and k[1] == m for k in groups)]:
        lo, hi = groups.get((model, method, low, None), []), groups.get((model, method, high, None), [])
        for label, rs in [(f"uniform {low}", lo), (f"uniform {high}", hi)] + [
                (f"mixed {avg:g} — {c}", groups.get((model, method, f"avg{avg:g}", c), [])) for c in CRITERIA]:
            if not rs:
                continue
            top = [r["top1"] for r in rs]
            versus = ""
            if label.startswith("mixed") and lo and hi:
                delta = statistics.mean(top) - statistics.mean(r["top1"] for r in lo)
                smaller = max(r["size_bytes"] for r in rs) < min(r["size_bytes"] for r in hi)
                versus = f"{delta:+.2f} / {'yes' if smaller else 'no'}"
            size = statistics.mean(r["size_bytes"] for r in rs) / 1e6
            w, a = (statistics.mean(r[k] for r in rs) for k in ("eff_w_bits", "eff_a_bits"))
            rows.append([method, label, _stat(top), len(rs), f"{size:.3f}", f"W{w:.2f} A{a:.2f}", versus,
                         rs[0].get("probe", "–")])
    return rows


def render(store: ResultsStore, load: str) -> str:
    recs = store.records
    groups: dict[tuple, list[dict]] = {}
    for r in recs:
        groups.setdefault((r["model"], r["method"], r["bits"], r.get("criterion")), []).append(r)
    machine = next((r["machine"] for r in recs if "machine" in r), "")
    lines = ["# Mixed precision under a budget vs uniform bits", "",
             f"Generated by `benchmarks/mixed_precision.py` on {datetime.now(timezone.utc):%Y-%m-%d} from "
             f"`mixed_precision_runs.jsonl` ({len(recs)} runs); {machine}; load average when rendered: {load}.", "",
             "Models: the outlier-stress variants (S=30, 6 channels of every norm → layers mapping) of the "
             "bundled 6-block ViT (`bundled`) and the 12-block one (`d12`). Top-1 % on the 1000-image MNIST-5k "
             "test split (one standard error ≈ 0.6 points at 96%); mean ± sample std over calibration seeds "
             "(min–max). Mixed: bits chosen per point — weights 3/4/6/8/float, activations 4/6/8/float (3/4/6/8/"
             "float for the 3.5 budget) — under that average for weights and for activations each "
             "(element-weighted, float = 32 bits; the image input stays at 8 bits, outside the budget), from "
             "a sensitivity table measured on the seed's 32 calibration images. `eff. bits`: measured on the "
             "quantized model as it runs. Size: deployed bytes (`QuantizedModel.size_bytes`: weight codes + "
             "per-channel fp32 scale/zero point + fp32 rest). The larger uniform preset is run for seed 0 only "
             "(it is there for its size).", ""]
    for model in sorted({k[0] for k in groups}, key=lambda m: (m != "bundled", m)):
        flt = groups.get((model, "float", "FP32", None))
        lines += [f"## {model} (stress S=30)" + (f" — float top-1 {flt[0]['top1']:.2f}" if flt else ""), ""]
        for budget, (avg, _, low, high) in BUDGETS.items():
            rows = _budget_table(groups, model, budget)
            if any(r[1].startswith("mixed") for r in rows):
                lines += [f"### Average {avg:g} bits vs uniform {low} and {high}", "",
                          format_table(["method", "precision", "top-1 %", "seeds", "size MB", "eff. bits",
                                        f"Δ top-1 vs {low} / smaller than {high}", "sensitivity measured with"],
                                       rows), ""]
    return "\n".join(lines)


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--models", default="bundled,d12")
    p.add_argument("--methods", default=",".join(METHODS))
    p.add_argument("--seeds", default="0,1,2")
    p.add_argument("--budgets", default="4.5,3.5", help="average-bit budgets (see BUDGETS)")
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
