"""What calibrating costs: CPU time and peak memory of `vitquant.quantize` for every registered method on
a real-size ViT (timm DeiT-S 224², random init: cost does not depend on the weights), against the cost
of one float forward over the same images.

Every measurement runs in its own process (one at a time), so peak RSS is the process's own and no
method inherits another's allocator state. CPU time is the process's user + system time over the
measured block (unaffected by other jobs on a shared machine, unlike wall time); the 1-minute load
average is recorded before and after each run.

- the unit: `float` = one no_grad forward of the float model over the N images (batch 32), the median
  of 3 processes (measured 4.3-5.3 CPU-s on DeiT-S at 2 threads from one process to the next);
- a method: `quantize(model, QuantConfig(method, bits, calib_size=N), images)`, everything included
  (tracing, calibration, freezing); the ratio to the unit is the method's cost class.
- peak RSS: the process's peak (ru_maxrss), model construction included in both, so the ratio is the
  memory a method needs beyond what running the model needs.
- OMP_WAIT_POLICY=PASSIVE (default here): on a machine shared with other jobs, OpenMP's default
  spin-waiting burns CPU while a thread waits for one that was descheduled, and that spin counts as the
  process's CPU time. Measured on this 2-core machine at load ≈ 7: a loop of small search ops took
  8.6-11.1 CPU s spinning vs 0.7-0.8 s passive, the DeiT-S float forward 5.4-5.6 vs 4.3-4.4 s. Passive
  waiting measures the work; `--omp-wait-policy ACTIVE` measures the default.

    PYTHONPATH=src python benchmarks/calibration_cost.py                      # every method, DeiT-S, 32 images
    PYTHONPATH=src python benchmarks/calibration_cost.py --methods minmax,ptq4vit --images 128
    PYTHONPATH=src python benchmarks/calibration_cost.py --profile ptq4vit    # cProfile summary → results/profiles/
Rows are appended to benchmarks/results/calibration_cost.jsonl; `--render` writes calibration_cost.md.
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import subprocess
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
RESULTS = HERE / "results"
STORE = RESULTS / "calibration_cost.jsonl"
MODELS = {"deit_s": "deit_small_patch16_224", "deit_b": "deit_base_patch16_224", "deit_t": "deit_tiny_patch16_224"}
# the budgets, in units of the float forward's CPU time
BUDGET = {"minmax": 5, "percentile": 5, "repq-vit": 5, "fq-vit": 5, "ptq4vit": 30, "adalog": 30, "noisyquant": 30,
          "erq": 30, "dopq-vit": 30, "ias-vit": 300}
MEMORY_BUDGET = 1.5
FLOAT_REPEATS = 3
# options a method is measured with when --options does not say otherwise: none since I&S-ViT's default
# schedule ("auto") is its CPU schedule on a real-size model (100 steps at batch 8; the reference
# schedule, 200 at batch 32, costs ~1.5 CPU-s per DeiT-S step, ~6× more)
CPU_SCHEDULE: dict[str, str] = {}


def _cpu_seconds() -> float:
    r = resource.getrusage(resource.RUSAGE_SELF)
    return r.ru_utime + r.ru_stime


def child(args) -> None:
    """One measurement, in this process; prints one JSON line."""
    import torch

    torch.set_num_threads(args.threads)
    import timm

    import vitquant
    from vitquant.config import QuantConfig

    torch.manual_seed(0)
    model = timm.create_model(MODELS[args.model], pretrained=False).eval()
    gen = torch.Generator().manual_seed(1)
    images = torch.randn(args.images, 3, 224, 224, generator=gen)  # preprocessed inputs: ~N(0, 1) per channel
    load0 = os.getloadavg()[0]
    if args.method == "float":
        cpu0, t0 = _cpu_seconds(), time.perf_counter()
        with torch.no_grad():
            for x in images.split(32):
                model(x)
        cpu, wall, stats = _cpu_seconds() - cpu0, time.perf_counter() - t0, {}
    else:
        config = QuantConfig.preset(args.bits, method=args.method, calib_size=args.images,
                                    options=json.loads(args.options) if args.options else {})
        profiler = None
        if args.profile:
            import cProfile

            profiler = cProfile.Profile()
            profiler.enable()
        cpu0, t0 = _cpu_seconds(), time.perf_counter()
        q = vitquant.quantize(model, config, images, progress=False)
        cpu, wall = _cpu_seconds() - cpu0, time.perf_counter() - t0
        stats = q.stats
        if profiler is not None:
            profiler.disable()
            _write_profile(profiler, args)
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # KiB on Linux
    print(json.dumps({"model": args.model, "images": args.images, "threads": args.threads, "method": args.method,
                      "bits": args.bits if args.method != "float" else None, "options": args.options or None,
                      "cpu_s": round(cpu, 2), "wall_s": round(wall, 2), "peak_rss_mb": round(peak, 1),
                      "calibration_peak_rss_mb": stats.get("calibration_peak_rss_mb"),
                      "load_before": round(load0, 2), "load_after": round(os.getloadavg()[0], 2),
                      "torch": torch.__version__, "time": time.strftime("%Y-%m-%d %H:%M"),
                      "omp_wait_policy": os.environ.get("OMP_WAIT_POLICY"),
                      "label": args.label or None}))


def _write_profile(profiler, args) -> None:
    import io
    import pstats

    out = RESULTS / "profiles"
    out.mkdir(parents=True, exist_ok=True)
    buf = io.StringIO()
    st = pstats.Stats(profiler, stream=buf)
    st.sort_stats("cumulative").print_stats(45)
    st.sort_stats("tottime").print_stats(30)
    text = "\n".join(line.rstrip() for line in buf.getvalue().splitlines() if line.strip())
    home = str(HERE.parent)
    text = text.replace(home + "/", "").replace(sys.prefix + "/", "")
    name = f"{args.method}_{args.model}_{args.images}{('_' + args.label) if args.label else ''}.txt"
    (out / name).write_text(f"# cProfile of quantize({args.method}, {args.bits}) on {args.model}, {args.images} images, "
                            f"{args.threads} threads\n\n{text}\n")


def run_one(method: str, args, profile: bool = False) -> dict:
    cmd = [sys.executable, __file__, "--child", "--method", method, "--model", args.model, "--images", str(args.images),
           "--threads", str(args.threads), "--bits", args.bits]
    options = args.options or CPU_SCHEDULE.get(method, "")
    if options and method != "float":
        cmd += ["--options", options]
    if args.label:
        cmd += ["--label", args.label]
    if profile:
        cmd.append("--profile")
    env = dict(os.environ, PYTHONPATH=args.src or str(HERE.parent / "src"), OMP_NUM_THREADS=str(args.threads),
               OMP_WAIT_POLICY=args.omp_wait_policy)
    before = resource.getrusage(resource.RUSAGE_CHILDREN)
    load0 = os.getloadavg()[0]
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env)
    try:
        out, err = proc.communicate(timeout=args.timeout or None)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.communicate()
        after = resource.getrusage(resource.RUSAGE_CHILDREN)
        # a lower bound: the whole process (model construction included) until it was stopped
        cpu = after.ru_utime + after.ru_stime - before.ru_utime - before.ru_stime
        return {"model": args.model, "images": args.images, "threads": args.threads, "method": method,
                "bits": args.bits, "options": options or None, "stopped_after_cpu_s": round(cpu, 1),
                "stopped_after_wall_s": args.timeout, "load_before": round(load0, 2),
                "load_after": round(os.getloadavg()[0], 2), "time": time.strftime("%Y-%m-%d %H:%M"),
                "label": args.label or None}
    if proc.returncode != 0:
        return {"model": args.model, "images": args.images, "method": method, "error": err.strip()[-2000:],
                "time": time.strftime("%Y-%m-%d %H:%M"), "label": args.label or None}
    return json.loads(out.strip().splitlines()[-1])


def _latest(rows: list[dict], **match) -> dict | None:
    found = [r for r in rows if all(r.get(k) == v for k, v in match.items())]
    return found[-1] if found else None


def _cell(row: dict | None, budget: float | None = None) -> tuple[str, str, str]:
    """(CPU seconds, × float, peak RSS) of a row; a stopped run shows its lower bound."""
    if row is None:
        return "—", "—", "—"
    if "stopped_after_cpu_s" in row:
        return f"> {row['stopped_after_cpu_s']:.0f}", f"> {row['x_float_cpu_at_least']:.0f}", "—"
    if "error" in row:
        return "error", "—", "—"
    mark = "" if budget is None or row["x_float_cpu"] <= budget else " ✗"
    rss_mark = "" if budget is None or row["x_float_rss"] <= MEMORY_BUDGET else " ✗"
    return (f"{row['cpu_s']:.1f}", f"{row['x_float_cpu']:.1f}{mark}",
            f"{row['peak_rss_mb']:.0f} ({row['x_float_rss']:.2f}×{rss_mark})")


def render(store: Path) -> str:
    rows = [json.loads(line) for line in store.read_text().splitlines() if line.strip()]
    rows = [r for r in rows if r.get("omp_wait_policy", "PASSIVE") == "PASSIVE" or "error" in r
            or "stopped_after_cpu_s" in r]
    floats = [r for r in rows if r["method"] == "float" and r["model"] == "deit_s" and r["images"] == 32]
    unit = floats[-1] if floats else None
    out = ["# Calibration cost on a real-size ViT", "",
           "Generated by `benchmarks/calibration_cost.py` (every run its own process; CPU time = user + system "
           "of the measured block; OMP_WAIT_POLICY=PASSIVE, see the script's docstring). timm "
           "`deit_small_patch16_224` at 224², random init, 32 random images, W4A4, 2 threads, "
           f"{platform.processor() or platform.machine()} ({os.cpu_count()} CPUs, shared with other jobs), "
           f"torch {unit['torch'] if unit else '?'}.", "",
           f"Unit: the float model's no_grad forward over the same 32 images = "
           f"{unit['cpu_s'] if unit else '?'} CPU s"
           + (f" (the median of {', '.join(map(str, unit['repeats_cpu_s']))} in {len(unit['repeats_cpu_s'])} processes: "
              "one forward's CPU time varies that much, and every × below moves with it)"
              if unit and unit.get("repeats_cpu_s") else "")
           + f", peak RSS {unit['peak_rss_mb'] if unit else '?'} MB "
           "(process, model included). × = CPU time / that unit (each row against the float forward measured in "
           "its own sweep); ✗ = over the issue's budget (CPU: the budget column; peak RSS: 1.5× the float "
           "forward's). "
           "Before: the code at ef597a4 (before issue 16); a run stopped at the time limit shows its lower bound.", "",
           "| method | budget | before CPU s | before × | after CPU s | after × | after peak RSS MB | after wall s | load (1 min) |",
           "|---|---|---|---|---|---|---|---|---|"]
    for method, budget in BUDGET.items():
        before = _latest(rows, method=method, model="deit_s", images=32, label="before")
        after = _latest(rows, method=method, model="deit_s", images=32, label="after")
        b, a = _cell(before), _cell(after, budget)
        wall = f"{after['wall_s']:.0f}" if after and "wall_s" in after else "—"
        load = f"{after['load_before']:.1f}–{after['load_after']:.1f}" if after and "load_after" in after else "—"
        name = f"{method} `{after['options']}`" if after and after.get("options") else method
        out.append(f"| {name} | ≤ {budget}× | {b[0]} | {b[1]} | {a[0]} | {a[1]} | {a[2]} | {wall} | {load} |")
    growth = [r for r in rows if r.get("label") == "growth" and r["method"] != "float"]
    latest = {(r["method"], r["model"], r["images"]): r for r in growth}  # the last run of each
    if latest:
        out += ["", "## Growth: 32 → 128 images, DeiT-S → DeiT-B", "",
                "Each row's × is against the float forward of the same model over the same images, measured in "
                "the same sweep (its CPU s is shown). Only the last run of each cell is shown; the budgets above "
                "are for DeiT-S at 32 images.", "",
                "| method | model | images | float CPU s | CPU s | × | peak RSS MB | measured |",
                "|---|---|---|---|---|---|---|---|"]
        for (method, model, images), r in sorted(latest.items(), key=lambda kv: (kv[0][1], kv[0][2], kv[0][0])):
            c = _cell(r)
            unit_cpu = f"{r['cpu_s'] / r['x_float_cpu']:.2f}" if r.get("x_float_cpu") else "—"
            out.append(f"| {method} | {model} | {images} | {unit_cpu} | {c[0]} | {c[1]} | {c[2]} | {r['time'][:10]} |")
    return "\n".join(out) + "\n"


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    p.add_argument("--method", help=argparse.SUPPRESS)
    p.add_argument("--methods", default="all")
    p.add_argument("--model", default="deit_s", choices=sorted(MODELS))
    p.add_argument("--images", type=int, default=32)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--bits", default="w4a4")
    p.add_argument("--options", default="", help="method options as JSON (one method)")
    p.add_argument("--label", default="", help="tag stored with the rows (e.g. 'before')")
    p.add_argument("--src", default="", help="the vitquant sources to measure (default: this checkout's src/)")
    p.add_argument("--omp-wait-policy", default="PASSIVE", choices=["PASSIVE", "ACTIVE"],
                   help="OpenMP threads that wait sleep (PASSIVE) or spin (ACTIVE); see the module docstring")
    p.add_argument("--timeout", type=float, default=0, help="stop a method after this many wall seconds (0: never)")
    p.add_argument("--profile", action="store_true", help="also write a cProfile summary per method")
    p.add_argument("--no-store", action="store_true")
    p.add_argument("--render", action="store_true", help="only write calibration_cost.md from the store")
    args = p.parse_args()
    if args.child:
        child(args)
        return 0
    if args.render:
        (RESULTS / "calibration_cost.md").write_text(render(STORE))
        return 0
    sys.path.insert(0, str(HERE.parent / "src"))
    from vitquant.methods import available_methods

    methods = list(available_methods()) if args.methods == "all" else args.methods.split(",")
    # the unit is the median of FLOAT_REPEATS processes: one forward's CPU time varies by ~±10% run to run
    units = [run_one("float", args) for _ in range(FLOAT_REPEATS)]
    unit = sorted(units, key=lambda r: r["cpu_s"])[len(units) // 2]
    unit["repeats_cpu_s"] = [r["cpu_s"] for r in units]
    print(json.dumps(unit), flush=True)
    rows = [unit]
    for method in methods:
        row = run_one(method, args, profile=args.profile)
        if "stopped_after_cpu_s" in row:
            row["x_float_cpu_at_least"] = round(row["stopped_after_cpu_s"] / unit["cpu_s"], 1)
        if "cpu_s" in row:
            row["x_float_cpu"] = round(row["cpu_s"] / unit["cpu_s"], 2)
            row["x_float_rss"] = round(row["peak_rss_mb"] / unit["peak_rss_mb"], 2)
        print(json.dumps(row), flush=True)
        rows.append(row)
    if not args.no_store:
        with STORE.open("a") as f:
            for row in rows:
                row.setdefault("machine", f"{platform.processor() or platform.machine()}, {os.cpu_count()} cpus")
                f.write(json.dumps(row) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
