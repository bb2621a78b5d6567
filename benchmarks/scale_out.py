"""Scale-out: wall time of evaluation and of repq-vit calibration with 1 process vs 2 torchrun ranks.

The model is timm DeiT-S 224² (random init, seed 0: cost does not depend on the weights); the data a
generated ImageFolder of noise PNGs (decoding and preprocessing included, as for real images). Each
configuration runs in fresh processes, in an interleaved order, `--rounds` times:

- `1×2`: one process, 2 threads (what a plain run uses here);
- `1×1`: one process, 1 thread;
- `2×1`: `torchrun --nproc_per_node 2`, 1 thread per rank (torchrun's default, OMP_NUM_THREADS=1).

Each process reports, per phase, wall and its own CPU time: start-up (interpreter, torch, timm; measured
from the launch), model build, calibration (the float observe pass, which is what is split among the
ranks, and the rest: tracing, weight fitting, reduction, freezing), evaluation. The table gives the
launch-to-exit wall time of each configuration and where it went; the speed-up model for N devices
is fitted from the phases (see `render`).

    PYTHONPATH=src python benchmarks/scale_out.py                 # measure (≈10 min) and render
    PYTHONPATH=src python benchmarks/scale_out.py --render        # render the stored runs only
Rows go to benchmarks/results/scale_out.jsonl; the table to benchmarks/results/scale_out.md.
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import socket
import statistics
import subprocess
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
RESULTS = HERE / "results"
STORE = RESULTS / "scale_out.jsonl"
WORK = HERE / "work" / "scale_out"
CONFIGS = {"1x2": (1, 2), "1x1": (1, 1), "2x1": (2, 1)}  # processes × threads each


def _images(root: Path, n: int, classes: int = 4) -> Path:
    """n noise images 256² in `classes` class folders (made once)."""
    import numpy as np
    from PIL import Image

    folder = root / f"noise_{n}"
    if folder.is_dir() and sum(1 for _ in folder.rglob("*.png")) == n:
        return folder
    rng = np.random.default_rng(0)
    for i in range(n):
        d = folder / f"class{i % classes}"
        d.mkdir(parents=True, exist_ok=True)
        Image.fromarray(rng.integers(0, 256, (256, 256, 3), dtype=np.uint8)).save(d / f"{i:05d}.png")
    return folder


def worker(args) -> None:
    """One rank (or the single process): build, calibrate, evaluate; rank 0 prints one JSON line."""
    import torch
    import timm

    import vitquant
    from vitquant import distributed
    from vitquant.calibration.engine import Context
    from vitquant.config import QuantConfig

    torch.set_num_threads(args.threads)
    distributed.init()
    cpu = time.process_time
    phases: dict[str, list[float]] = {"startup": [time.time() - args.launched, cpu()]}

    def phase(name: str, t0: float, c0: float) -> None:
        phases[name] = [time.time() - t0, cpu() - c0]

    t0, c0 = time.time(), cpu()
    torch.manual_seed(0)
    model = timm.create_model("deit_small_patch16_224", pretrained=False).eval()
    phase("build", t0, c0)
    observe = [0.0, 0.0]
    original = Context.observe

    def timed(self, *a, **k):
        s, c = time.time(), cpu()
        try:
            return original(self, *a, **k)
        finally:
            observe[0] += time.time() - s
            observe[1] += cpu() - c

    Context.observe = timed
    from vitquant.calibration.observer import ReservoirObserver

    reduce = [0.0]
    reduce_original = ReservoirObserver.reduce_across_ranks

    def timed_reduce(self):
        s = time.time()
        try:
            return reduce_original(self)
        finally:
            reduce[0] += time.time() - s

    ReservoirObserver.reduce_across_ranks = timed_reduce
    distributed.barrier()
    t0, c0 = time.time(), cpu()
    q = vitquant.quantize(model, QuantConfig(method="repq-vit", w_bits=4, a_bits=4, calib_size=args.calib),
                          args.calib_data, progress=False)
    phase("calibrate", t0, c0)
    phases["observe"] = observe
    phases["reduce"] = [reduce[0], 0.0]  # wall inside the observers' collectives (min/max, sample gather)
    distributed.barrier()
    t0, c0 = time.time(), cpu()
    res = vitquant.evaluate(q, args.eval_data, progress=False)
    phase("evaluate", t0, c0)
    cpus = distributed.all_gather_rows(torch.tensor([[v[1] for v in phases.values()]], dtype=torch.float64))
    if distributed.is_main():
        print(json.dumps({"phases": phases, "rank_cpu": cpus.tolist(), "names": list(phases), "eval_n": res.n,
                          "top1": res.top1, "calib_images": q.stats["calibration_images"]}), flush=True)
    distributed.finish()


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def measure(config: str, calib_data: Path, eval_data: Path, calib: int) -> dict:
    procs, threads = CONFIGS[config]
    env = {**os.environ, "OMP_NUM_THREADS": str(threads), "OMP_WAIT_POLICY": "PASSIVE"}
    for k in ("WORLD_SIZE", "RANK", "LOCAL_RANK"):
        env.pop(k, None)
    launched = time.time()
    tail = [str(Path(__file__).resolve()), "--worker", "--threads", str(threads), "--calib", str(calib),
            "--calib-data", str(calib_data), "--eval-data", str(eval_data), "--launched", repr(launched)]
    cmd = ([sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", str(procs), "--master_addr",
            "127.0.0.1", "--master_port", str(_free_port()), *tail] if procs > 1 else [sys.executable, *tail])
    load0 = os.getloadavg()[0]
    done = subprocess.run(cmd, capture_output=True, text=True, env=env)
    wall = time.time() - launched
    if done.returncode != 0:
        raise SystemExit(f"{config} failed:\n{done.stderr[-3000:]}")
    row = json.loads([line for line in done.stdout.splitlines() if line.startswith("{")][-1])
    row.update(config=config, processes=procs, threads=threads, wall=round(wall, 2), calib=calib,
               load_before=round(load0, 2), load_after=round(os.getloadavg()[0], 2),
               time=time.strftime("%Y-%m-%d %H:%M"),
               machine=f"{platform.machine()}, {os.cpu_count()} cpus, {platform.python_version()}")
    return row


def _median(rows: list[dict], key) -> float:
    return statistics.median(key(r) for r in rows)


def render(rows: list[dict]) -> str:
    """The table: per configuration, medians over rounds of launch-to-exit wall and of each phase."""
    last = max(r["time"] for r in rows)
    day = last[:10]
    rows = [r for r in rows if r["time"][:10] == day]
    by = {c: [r for r in rows if r["config"] == c] for c in CONFIGS if any(r["config"] == c for r in rows)}
    r0 = rows[0]
    lines = ["<!-- written by benchmarks/scale_out.py; the next run replaces this file -->",
             "# Scale-out: 1 process vs 2 torchrun ranks",
             "",
             f"Measured on {day} by `benchmarks/scale_out.py` ({len(rows)} runs, interleaved; {r0['machine']}); "
             f"timm DeiT-S 224² random init, repq-vit W4A4 on {r0['calib']} calibration images (batches of 32), "
             f"evaluation of {r0['eval_n']} images (batches of 100) from a folder of generated 256² PNGs "
             "(decoded and preprocessed in the timed work). Medians over rounds; wall seconds, and in brackets the "
             "CPU seconds of rank 0 (of the process for one process). Load average (1 min) before/after each run: "
             + ", ".join(f"{r['load_before']:.1f}/{r['load_after']:.1f}" for r in rows) + ".",
             "",
             "| processes × threads | runs | total wall | start-up | build | calibrate | of which observe | evaluate | "
             "eval speed-up vs 1×2 | calibrate speed-up vs 1×2 |",
             "|---|---|---|---|---|---|---|---|---|---|"]
    base = by.get("1x2")

    def cell(rs, name):
        return f"{_median(rs, lambda r: r['phases'][name][0]):.1f} ({_median(rs, lambda r: r['phases'][name][1]):.1f})"

    for c, rs in by.items():
        sp_e = sp_c = "–"
        if base and c != "1x2":
            sp_e = f"{_median(base, lambda r: r['phases']['evaluate'][0]) / _median(rs, lambda r: r['phases']['evaluate'][0]):.2f}×"
            sp_c = f"{_median(base, lambda r: r['phases']['calibrate'][0]) / _median(rs, lambda r: r['phases']['calibrate'][0]):.2f}×"
        lines.append(f"| {c.replace('x', ' × ')} | {len(rs)} | {_median(rs, lambda r: r['wall']):.1f} | "
                     f"{cell(rs, 'startup')} | {cell(rs, 'build')} | {cell(rs, 'calibrate')} | {cell(rs, 'observe')} | "
                     f"{cell(rs, 'evaluate')} | {sp_e} | {sp_c} |")
    if "1x1" in by and "2x1" in by:
        one, two = by["1x1"], by["2x1"]
        # Amdahl fit from the 1-thread runs: per phase, the part split among ranks (p) and the rest (s)
        ev1, ev2 = (_median(rs, lambda r: r["phases"]["evaluate"][0]) for rs in (one, two))
        ca1, ca2 = (_median(rs, lambda r: r["phases"]["calibrate"][0]) for rs in (one, two))
        ob1 = _median(one, lambda r: r["phases"]["observe"][0])
        ob2 = _median(two, lambda r: r["phases"]["observe"][0])
        serial_c = ca1 - ob1  # tracing, fitting, freezing: every rank does it whole
        with_reduce = [r for r in two if "reduce" in r["phases"]]
        red = _median(with_reduce, lambda r: r["phases"]["reduce"][0]) if with_reduce else None
        red_text = (f"{red:.2f} s of rank 0's wall inside the observers' collectives on 2 ranks, waiting for the other rank included" if red is not None
                    else "not measured in these runs")
        lines += ["", "## Where the time goes, and the model for N devices", "",
                  f"- Evaluation, 1 thread per process: {ev1:.1f} s alone, {ev2:.1f} s on each of 2 ranks "
                  f"({ev1 / ev2:.2f}×). Each rank decodes and scores its own contiguous half of the batches; the "
                  "only communication is one all-reduce of 5 integers at the end.",
                  f"- Calibration: the observe pass (float forwards over the calibration batches, split between "
                  f"ranks, then the observers reduced: {red_text}) {ob1:.1f} s → {ob2:.1f} s; the rest "
                  f"({serial_c:.1f} s: tracing the model, fitting every quantizer from the reduced statistics, "
                  "reparameterization, freezing) is done whole by every rank, so it does not shrink.",
                  f"- 2 ranks lose {max(0.0, ev2 - ev1 / 2):.1f} s (evaluation) and "
                  f"{max(0.0, ca2 - serial_c - ob1 / 2):.1f} s (calibration) against a perfect halving. That is "
                  "not communication (above) but the 2 cores shared by the two ranks and their DataLoader "
                  "decode workers, and the ranks' uneven finish; ranks with cores or a GPU of their own do not pay it.",
                  "- Start-up (Python, torch, timm imports; torchrun's agent for 2 ranks) and the model build are "
                  "paid by every rank, in parallel.",
                  "- 2 ranks × 1 thread vs 1 process × 2 threads on these 2 cores: the same CPUs, yet 2 ranks win, "
                  "because one process does not spread its observers' bookkeeping, decoding and small ops over 2 "
                  "threads (1 × 2 is barely faster than 1 × 1 for calibration).",
                  "",
                  "Model for N devices (one rank each, as under `torchrun --nproc_per_node N` on N GPUs): "
                  "T(N) = S + P / N + C, with P the part split among ranks (evaluation: all of it, "
                  f"{ev1:.1f} s here at 1 thread; calibration: the observe pass, {ob1:.1f} s), S what every rank "
                  f"repeats (calibration: {serial_c:.1f} s) and C the collectives (~{red if red is not None else 0:.2f} s "
                  "for the observers at 2 ranks; the all-gather grows with N, the samples being cut back to the "
                  "same 2 MiB per site afterwards). Speed-up of the phase (start-up and model build excluded):",
                  ""]
        lines += ["| N | evaluation | calibration (128 images; 4 batches of 32, so at most 4 ranks share it) |",
                  "|---|---|---|"]
        c_red = red or 0.0
        for n in (1, 2, 4, 8):
            t_ev = ev1 / n
            t_ca = serial_c + ob1 / min(n, 4) + (c_red if n > 1 else 0.0)
            lines.append(f"| {n} | {ev1 / t_ev:.2f}× | {ca1 / t_ca:.2f}× |")
        lines += ["", f"Measured at N = 2 here: evaluation {ev1 / ev2:.2f}×, calibration {ca1 / ca2:.2f}× (1-thread "
                  "runs). With 32 calibration images (the papers' default) there is one batch of 32: nothing to "
                  "split, every rank observes it, and calibration takes as long as in one process. Data parallelism "
                  "pays for evaluation (50,000 ImageNet images) and for calibration on hundreds to thousands of "
                  "images; block reconstruction (ias-vit, adalog/dopq-vit with reconstruction) splits each step's "
                  "batch between ranks (gradients all-reduced), which pays once a step's compute dwarfs one "
                  "all-reduce of the unit's parameters (not measured here)."]
    return "\n".join(lines) + "\n"


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    p.add_argument("--threads", type=int, default=1, help=argparse.SUPPRESS)
    p.add_argument("--launched", type=float, default=0.0, help=argparse.SUPPRESS)
    p.add_argument("--calib-data", help=argparse.SUPPRESS)
    p.add_argument("--eval-data", help=argparse.SUPPRESS)
    p.add_argument("--calib", type=int, default=256, help="calibration images (default 256: 8 batches)")
    p.add_argument("--eval", type=int, default=512, help="evaluation images (default 512)")
    p.add_argument("--rounds", type=int, default=2)
    p.add_argument("--configs", default=",".join(CONFIGS))
    p.add_argument("--render", action="store_true", help="only render the stored runs")
    args = p.parse_args()
    if args.worker:
        return worker(args)
    if not args.render:
        calib_data, eval_data = _images(WORK, args.calib), _images(WORK, args.eval)
        for r in range(args.rounds):
            for config in args.configs.split(","):
                row = measure(config, calib_data, eval_data, args.calib)
                print(f"round {r}: {config}: wall {row['wall']:.1f} s, calibrate {row['phases']['calibrate'][0]:.1f} s, "
                      f"evaluate {row['phases']['evaluate'][0]:.1f} s", flush=True)
                RESULTS.mkdir(exist_ok=True)
                with STORE.open("a") as f:
                    f.write(json.dumps(row) + "\n")
    rows = [json.loads(line) for line in STORE.read_text().splitlines() if line.strip()]
    (RESULTS / "scale_out.md").write_text(render(rows))
    print(f"wrote {RESULTS / 'scale_out.md'}")


if __name__ == "__main__":
    main()
