"""What a mixed per-site plan costs at run time: ONNX Runtime CPU latency of DeiT-T 224² exported with
several plans, in one interleaved run.

Speed depends on the plan's *shape* — which GEMMs run on integer kernels and which fall back to float —
not on the weights, so DeiT-T has random weights (as in speed.py) and minmax `deployable=True` grids,
calibrated on 8 random images; the float-fallback choices are structural (random weights have no real
sensitivity), sized like real plans:
- W8A8: every GEMM on the integer kernels (QGemm);
- W4A4: the same kernels, sub-8-bit grids in 8-bit containers (a Clip on the codes);
- W8A8, 2 fc2 float: the issue's ViT-B fallback (two Linear layers float; blocks 10 and 11's fc2 here);
- W8A8, attention float: q, k, v and softmax sites float (the attention matmuls in float);
- W8A8, 6 MLPs float: fc1 and fc2 of blocks 0–5 float (a quarter of the GEMMs, half the MLP FLOPs).
Every path runs in every round, rotated; a round's ratio is path latency / W8A8 latency in that round,
and the table shows medians (other processes' load hits all paths alike). One thread for ORT and PyTorch.

    PYTHONPATH=src python benchmarks/mixed_speed.py   # → benchmarks/results/mixed_speed.md
"""
from __future__ import annotations

import argparse
import os
import platform
import statistics
import sys
import tempfile
import time
from datetime import datetime, timezone
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent / "src"))

import numpy as np  # noqa: E402
import timm  # noqa: E402
import torch  # noqa: E402

import vitquant  # noqa: E402
from vitquant.export.isa import detect_cpu  # noqa: E402
from vitquant.export.runtime import session  # noqa: E402
from vitquant.report.table import format_table  # noqa: E402
from vitquant.serialization import write_output_text  # noqa: E402

MLP = [f"blocks.{b}.mlp.{fc}" for b in range(6) for fc in ("fc1", "fc2")]
PLANS = {
    "W8A8": ("w8a8", []),
    "W4A4 (sub-8-bit grids, int8 kernels)": ("w4a4", []),
    "W8A8, 2 fc2 layers float": ("w8a8", ["blocks.10.mlp.fc2*", "blocks.11.mlp.fc2*"]),
    "W8A8, attention operands float": ("w8a8", ["role:qk", "role:v", "role:post_softmax"]),
    "W8A8, 6 MLPs float (12 of 50 GEMMs)": ("w8a8", [f"{m}*" for m in MLP]),
}


def build(tmp: Path) -> tuple[torch.nn.Module, dict, dict]:
    torch.manual_seed(0)
    model = timm.create_model("deit_tiny_patch16_224", pretrained=False).eval()
    images = torch.randn(8, 3, 224, 224, generator=torch.Generator().manual_seed(1))
    vitquant.export(model, tmp / "float.onnx")
    sessions = {"ONNX Runtime fp32": session(str(tmp / "float.onnx"), 1, spinning=False)}
    facts = {"ONNX Runtime fp32": "float graph"}
    for label, (bits, keep) in PLANS.items():
        config = vitquant.QuantConfig.preset(bits, method="minmax", calib_size=8, deployable=True, keep_float=keep)
        q = vitquant.quantize(model, config, images, progress=False)
        path = tmp / f"{len(sessions)}.onnx"
        report = vitquant.export(q, path)
        clips = sum(n.op_type == "Clip" for n in report.model.graph.node)
        facts[label] = f"{report.int8_gemms} of {len(report.gemms)} GEMMs int8, {clips} Clip ops"
        sessions[label] = session(str(path), 1, spinning=False)
    return model, sessions, facts


def bench(model, sessions: dict, batch: int, rounds: int, reps: int) -> dict:
    x = torch.randn(batch, 3, 224, 224, generator=torch.Generator().manual_seed(2))
    xn = x.numpy()

    def torch_fp32():
        with torch.inference_mode():
            return model(x)

    fns = {"PyTorch fp32 (eager)": torch_fp32,
           **{k: (lambda s=s: s.run(None, {"input": xn})[0]) for k, s in sessions.items()}}
    ref = np.asarray(torch_fp32())
    cos = {}
    for k, f in fns.items():  # warm-up: first runs allocate and prepack
        out = np.asarray(f())
        cos[k] = float(np.sum(ref * out) / (np.linalg.norm(ref) * np.linalg.norm(out)))
    names = list(fns)
    lat: dict[str, list[float]] = {k: [] for k in names}
    for r in range(rounds):
        for k in names[r % len(names):] + names[:r % len(names)]:
            ts = []
            for _ in range(reps):
                t = time.perf_counter()
                fns[k]()
                ts.append(time.perf_counter() - t)
            lat[k].append(statistics.median(ts))
    base = "W8A8"
    ratio = {k: [a / b for a, b in zip(lat[k], lat[base])] for k in names}
    return {k: {"ms": 1e3 * statistics.median(lat[k]), "ratio": statistics.median(ratio[k]),
                "lo": min(ratio[k]), "hi": max(ratio[k]), "cos": cos[k]} for k in names}


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--batch", type=int, default=8)
    p.add_argument("--rounds", type=int, default=6)
    p.add_argument("--reps", type=int, default=3)
    p.add_argument("--out", default=str(HERE / "results" / "mixed_speed.md"))
    args = p.parse_args()
    torch.set_num_threads(1)
    load_before = os.getloadavg()
    t0 = time.perf_counter()
    with tempfile.TemporaryDirectory() as tmp:
        model, sessions, facts = build(Path(tmp))
        res = bench(model, sessions, args.batch, args.rounds, args.reps)
    load_after = os.getloadavg()
    cpu = detect_cpu(probe=False)
    rows = [[k, facts.get(k, "PyTorch eager"), f"{v['ms']:.0f}", f"{v['ratio']:.2f} ({v['lo']:.2f}–{v['hi']:.2f})",
             f"{v['cos']:.4f}"] for k, v in res.items()]
    lines = ["# What a mixed-precision plan costs at run time (ONNX Runtime, CPU)", "",
             f"Generated by `benchmarks/mixed_speed.py` on {datetime.now(timezone.utc):%Y-%m-%d}: {cpu.summary()}; "
             f"{platform.machine()}, {os.cpu_count()} CPUs, 1 thread for ORT and PyTorch; load average "
             f"{load_before[0]:.1f} before, {load_after[0]:.1f} after (other jobs shared the 2 cores: absolute "
             f"times are inflated, the interleaved ratios much less); {time.perf_counter() - t0:.0f} s in all.", "",
             f"DeiT-T 224², random weights, batch {args.batch}, {args.rounds} rounds × {args.reps} runs per path, "
             "rotated order; minmax `deployable=True` grids (exported exactly). `× W8A8`: latency relative to the "
             "all-integer plan in the same round, median (min–max over rounds). `cos`: cosine of the logits to "
             "PyTorch fp32 (random weights: only a sanity check).", "",
             format_table(["path", "GEMMs", "ms / batch", "× W8A8", "cos"], rows), ""]
    write_output_text(args.out, "\n".join(lines))
    print("\n".join(lines))
    return 0


if __name__ == "__main__":
    sys.exit(main())
