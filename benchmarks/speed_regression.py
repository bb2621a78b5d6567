"""Did the calibration-speed work (issue 16) change any result on the reference models?

For each method: seed 0, W8A8/W6A6/W4A4/W3A3, natural and outlier-stress variants, on `bundled` (and
the 12-block model when benchmarks/work/vit_mnist_d12.safetensors exists). Each run's top-1 is compared
with the committed store (benchmarks/results/accuracy_runs.jsonl, produced before the core redesign) and,
when given, with a run of the code before the change (`--baseline-src`, e.g. an export of the previous
commit's src/), which separates this change from the core redesign. A logits digest tells bit-identical
results from equal top-1s.

    PYTHONPATH=src python benchmarks/speed_regression.py --methods ptq4vit,adalog --out-jsonl /tmp/new.jsonl
    PYTHONPATH=/tmp/base/src python benchmarks/speed_regression.py --methods ptq4vit --out-jsonl /tmp/old.jsonl
    python benchmarks/speed_regression.py --render /tmp/new.jsonl --baseline /tmp/old.jsonl
"""
from __future__ import annotations

import argparse
import hashlib
import json
import os
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
STORE = HERE / "results" / "accuracy_runs.jsonl"
D12 = "benchmarks/work/vit_mnist_d12.safetensors"
BITS = ("W8A8", "W6A6", "W4A4", "W3A3")
TOLERANCE = 0.3


def run(methods: list[str], models: list[str], out: Path, bits: list[str]) -> None:
    import torch

    torch.set_num_threads(2)
    from vitquant.api import quantize
    from vitquant.bench import _top1, _variants
    from vitquant.calibration.data import data_config_for, load_calibration, load_labeled
    from vitquant.config import QuantConfig, parse_method_spec
    from vitquant.evaluate import predict_logits

    done = set()
    if out.exists():
        for line in out.read_text().splitlines():
            r = json.loads(line)
            done.add((r["model"], r["variant"], r["method"], r["bits"]))
    os.chdir(HERE.parent)
    for model_name in models:
        for variant, model in _variants(model_name, True):
            cfg = data_config_for(model)
            data = load_labeled("bundled", cfg)
            float_logits = predict_logits(model, data, progress=False)
            calib = load_calibration("bundled", cfg, n=32, seed=0)
            for method in methods:
                for b in bits:
                    if (model_name, variant, method, b) in done:
                        continue
                    name, options = parse_method_spec(method)
                    config = QuantConfig.preset(b.lower(), method=name, options=options, seed=0, calib_size=32)
                    r0 = os.times()
                    q = quantize(model, config, calib, progress=False)
                    r1 = os.times()
                    logits = predict_logits(q, data, progress=False)
                    rec = {"model": model_name, "variant": variant, "method": method, "bits": b,
                           "top1": _top1(logits, data.labels),
                           "agreement": (logits.argmax(1) == float_logits.argmax(1)).float().mean().item() * 100,
                           "digest": hashlib.sha1(logits.numpy().tobytes()).hexdigest()[:12],
                           "cpu_s": round(r1.user + r1.system - r0.user - r0.system, 2),
                           "load": round(os.getloadavg()[0], 2), "time": time.strftime("%Y-%m-%d %H:%M")}
                    with out.open("a") as f:
                        f.write(json.dumps(rec) + "\n")
                    print(json.dumps(rec), flush=True)


def _load(path: Path) -> dict[tuple, dict]:
    recs = {}
    for line in path.read_text().splitlines():
        if line.strip():
            r = json.loads(line)
            recs[(r["model"], r["variant"], r["method"], r["bits"])] = r
    return recs


def render(new: Path, baseline: Path | None) -> str:
    store = {k: v for k, v in ((lambda r: ((r["model"], r["variant"], r["method"], r["bits"]), r))(json.loads(l))
                               for l in STORE.read_text().splitlines() if l.strip()) if v.get("seed") == 0
             and v.get("calib_size", 32) == 32}
    runs = _load(new)
    base = _load(baseline) if baseline else {}
    header = ["model", "variant", "method", "bits", "store", "before", "after", "Δ store", "Δ before", "same logits",
              "cpu s before → after"]
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    worst = {}
    for key, r in sorted(runs.items(), key=lambda kv: (kv[0][0], kv[0][2], kv[0][1], BITS.index(kv[0][3]))):
        s, b = store.get(key), base.get(key)
        d_store = r["top1"] - s["top1"] if s else None
        d_base = r["top1"] - b["top1"] if b else None
        for d in (d_store, d_base):
            if d is not None:
                worst[key[2]] = max(worst.get(key[2], 0.0), abs(d))
        fmt = lambda v: "—" if v is None else f"{v:.1f}"  # noqa: E731
        sign = lambda v: "—" if v is None else f"{v:+.1f}"  # noqa: E731
        same = "—" if b is None else ("yes" if b["digest"] == r["digest"] else "no")
        cpu = f"{b['cpu_s']:.1f} → {r['cpu_s']:.1f}" if b else f"{r['cpu_s']:.1f}"
        model = "d12" if key[0] == D12 else key[0]
        lines.append("| " + " | ".join([model, key[1], key[2], key[3], fmt(s and s["top1"]), fmt(b and b["top1"]),
                                        fmt(r["top1"]), sign(d_store), sign(d_base), same, cpu]) + " |")
    summary = ["| method | largest |Δ| | within ±0.3 |", "|---|---|---|"]
    for m, w in sorted(worst.items()):
        summary.append(f"| {m} | {w:.1f} | {'yes' if w <= TOLERANCE + 1e-9 else 'no'} |")
    return "\n".join(summary) + "\n\n" + "\n".join(lines) + "\n"


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--methods", default="")
    p.add_argument("--models", default="bundled" + ("," + D12 if (HERE.parent / D12).exists() else ""))
    p.add_argument("--bits", default=",".join(BITS))
    p.add_argument("--out-jsonl", type=Path)
    p.add_argument("--render", type=Path, help="a jsonl written by a run: print the comparison table")
    p.add_argument("--baseline", type=Path, help="with --render: the jsonl of a run of the code before the change")
    args = p.parse_args()
    if args.render:
        print(render(args.render, args.baseline))
        return 0
    run(args.methods.split(","), args.models.split(","), args.out_jsonl, args.bits.split(","))
    return 0


if __name__ == "__main__":
    sys.exit(main())
