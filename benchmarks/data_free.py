"""Data-free calibration benchmark: real images vs PSAQ-ViT-generated vs Gaussian noise
→ benchmarks/results/data_free.md (+ PNG grids of what each model "dreamed").

For each reference model (and its outlier-stress variant), method, bit width and seed: quantize with
32 calibration images from each source and evaluate top-1 on the MNIST-5k test split. Generation
depends only on the float function and the seed, so it is done once per (model, seed) and reused for
every method and bit width; the stress variant computes the same float function (its outliers are
folded exactly), so it reuses the natural model's images too.

Runs are appended to benchmarks/results/data_free_runs.jsonl as they finish: re-running resumes.
Generated images are cached in benchmarks/work/data_free/ (safetensors).
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
ROOT = HERE.parent
sys.path.insert(0, str(ROOT / "src"))

import torch  # noqa: E402
from safetensors.torch import load_file, save_file  # noqa: E402

from vitquant.api import quantize  # noqa: E402
from vitquant.bench import STRESS, ResultsStore  # noqa: E402
from vitquant.calibration.data import CalibrationSet, data_config_for, load_calibration, load_labeled  # noqa: E402
from vitquant.calibration.datafree import (  # noqa: E402
    DataFreeConfig, PatchFeatureHooks, gaussian_calibration, generate_calibration, patch_similarity_entropy,
    pixel_bounds, save_image_grid, smoothness_rms,
)
from vitquant.config import QuantConfig  # noqa: E402
from vitquant.evaluate import predict_logits  # noqa: E402
from vitquant.methods import available_methods  # noqa: E402
from vitquant.models.loading import load_model  # noqa: E402
from vitquant.models.outliers import inject_ln_outliers  # noqa: E402
from vitquant.report.table import format_table  # noqa: E402

D12 = HERE / "work" / "vit_mnist_d12.safetensors"
CACHE = HERE / "work" / "data_free"
RESULTS = HERE / "results"
CALIBS = ("real", "psaq", "gaussian")
# "+range": the same calibration, then the input-image quantizer's range pinned to the valid pixel
# range from the model's mean/std (known without data) instead of what the calibration images reached
PINNED = ("psaq+range", "gaussian+range")
CALIB_TITLES = {"real": "real (MNIST train)", "psaq": "PSAQ-generated", "gaussian": "Gaussian noise",
                "psaq+range": "PSAQ + pixel-range input", "gaussian+range": "Gaussian + pixel-range input"}
DISCUSSION = "<!-- discussion: hand-written, kept when the tables are regenerated -->"
BITS_ORDER = ["W8A8", "W6A6", "W4A8", "W4A4", "W3A3"]


def _key(r: dict) -> tuple:
    return tuple(r.get(k) for k in ("kind", "model", "variant", "method", "bits", "calib", "seed", "steps"))


def Store(path: Path) -> ResultsStore:
    """Finished records, one JSON line each (flushed and fsynced): an interrupted sweep resumes."""
    return ResultsStore(path, key=_key)


def model_label(name: str) -> str:
    return "vit_mnist_d6" if name == "bundled" else Path(name).stem


def generated(model, name: str, seed: int, steps: int, store: Store) -> CalibrationSet:
    """PSAQ images for (model, seed), from the cache or generated now (and timed into the store)."""
    label = model_label(name)
    path = CACHE / f"{label}_seed{seed}_steps{steps}.safetensors"
    rec = {"kind": "generation", "model": name, "seed": seed, "steps": steps}
    config = DataFreeConfig(n_images=32, steps=steps, seed=seed)
    if path.exists() and store.done(rec):
        images = load_file(str(path))["images"]
    else:
        t0 = time.perf_counter()
        images = generate_calibration(model, data_config_for(model), config, progress=sys.stderr.isatty()).images
        seconds = time.perf_counter() - t0
        path.parent.mkdir(parents=True, exist_ok=True)
        save_file({"images": images.contiguous()}, str(path))
        store.append({**rec, "seconds": round(seconds, 2), "threads": torch.get_num_threads(),
                      "machine": f"{platform.machine()}, {os.cpu_count()} cpus, torch {torch.__version__}"})
        print(f"{label}: generated 32 images ({steps} steps, seed {seed}) in {seconds:.1f} s", flush=True)
    return CalibrationSet(images, f"PSAQ-ViT generated (32 images, {steps} steps, seed {seed})", [])


def calibration(source: str, model, name: str, seed: int, steps: int, store: Store) -> CalibrationSet:
    cfg = data_config_for(model)
    source = source.removesuffix("+range")
    if source == "real":
        return load_calibration("bundled", cfg, n=32, seed=seed)
    if source == "gaussian":
        return gaussian_calibration(cfg, 32, seed)
    return generated(model, name, seed, steps, store)


@torch.no_grad()
def diagnose(model, name: str, calib: CalibrationSet, source: str, seed: int, steps: int, store: Store) -> None:
    """What the float model sees in each source: patch-similarity entropy per block (PSAQ's objective),
    smoothness, and how confident the model is (mean max softmax)."""
    rec = {"kind": "diagnostic", "model": name, "calib": source, "seed": seed, "steps": steps}
    if store.done(rec):
        return
    hooks = PatchFeatureHooks(model)
    try:
        logits = model(calib.images)
        features = hooks.pop()
    finally:
        hooks.remove()
    entropy = statistics.mean(patch_similarity_entropy(f).item() for f in features)
    store.append({**rec, "entropy": round(entropy, 4), "smoothness": round(smoothness_rms(calib.images).item(), 4),
                  "confidence": round(logits.softmax(-1).max(-1).values.mean().item(), 4),
                  "classes": len(set(logits.argmax(-1).tolist()))})


def run(models: list[str], methods: list[str], bits: list[str], seeds: list[int], calibs: list[str],
        stress: bool, steps: int, store: Store) -> None:
    machine = f"{platform.machine()}, {os.cpu_count()} cpus, torch {torch.__version__}"
    for name in models:
        natural = load_model(name)
        cfg = data_config_for(natural)
        data = load_labeled("bundled", cfg)
        label = model_label(name)
        for seed in seeds:
            for source in [c for c in calibs if c in CALIBS]:
                calib = calibration(source, natural, name, seed, steps, store)
                diagnose(natural, name, calib, source, seed, steps, store)
                grid = RESULTS / f"data_free_{label}_{source}.png"
                if seed == 0 and (source != "psaq" or steps == DataFreeConfig().steps):
                    save_image_grid(calib.images, cfg, grid)
        variants = [("natural", natural)] + ([(f"stress S={STRESS['factor']:g}", inject_ln_outliers(natural, **STRESS))]
                                             if stress else [])
        for variant, model in variants:
            float_logits = predict_logits(model, data, progress=False)
            flt = {"kind": "float", "model": name, "variant": variant}
            if not store.done(flt):
                store.append({**flt, "top1": _top1(float_logits, data.labels)})
            for method in methods:
                for b in bits:
                    for seed in seeds:
                        for source in calibs:
                            rec = {"kind": "run", "model": name, "variant": variant, "method": method,
                                   "bits": b.upper(), "calib": source, "seed": seed,
                                   "steps": steps if source.startswith("psaq") else None}
                            if store.done(rec):
                                continue
                            calib = calibration(source, natural, name, seed, steps, store)
                            config = QuantConfig.preset(b, method=method, seed=seed, calib_size=32)
                            t0 = time.perf_counter()
                            q = quantize(model, config, calib, progress=False)
                            if source in PINNED:
                                pin_image_range(q, cfg)
                            seconds = time.perf_counter() - t0
                            logits = predict_logits(q, data, progress=False)
                            rec.update(top1=_top1(logits, data.labels), calib_seconds=round(seconds, 2),
                                       sqnr_db=round(_sqnr_db(float_logits, logits), 2),
                                       agreement=(logits.argmax(1) == float_logits.argmax(1)).float().mean().item() * 100,
                                       machine=machine, finished=datetime.now(timezone.utc).isoformat(timespec="seconds"))
                            store.append(rec)
                            print(f"{label} [{variant}] {method} {b} {source} seed {seed}: top-1 {rec['top1']:.2f}",
                                  flush=True)


def pin_image_range(qmodel, cfg: dict) -> None:
    """Set the input-image quantizer to the pixel range [0, 1] in normalized units."""
    low, high = pixel_bounds(cfg)
    for site in qmodel.act_sites().values():
        if site.role == "image" and site.enabled and hasattr(site.quantizer, "set_range"):
            site.quantizer.set_range(low.min(), high.max())


def _sqnr_db(ref: torch.Tensor, out: torch.Tensor) -> float:
    """Logit SQNR against the float model on the test set: paired, so it resolves differences between
    calibration sources that top-1 on 1000 images (± 0.5 points) cannot."""
    return 10 * torch.log10(ref.pow(2).sum() / (ref - out).pow(2).sum().clamp_min(1e-12)).item()


def _top1(logits: torch.Tensor, labels: torch.Tensor) -> float:
    return (logits.argmax(1) == labels).float().mean().item() * 100


# -- rendering ----------------------------------------------------------------------------------------
def _spread(rs: list[dict]) -> str:
    if not rs:
        return "–"
    top1, sqnr = [r["top1"] for r in rs], statistics.mean(r["sqnr_db"] for r in rs)
    if len(rs) == 1:
        return f"{top1[0]:.1f} · {sqnr:.1f} dB"
    return f"{statistics.mean(top1):.1f} ({min(top1):.1f}–{max(top1):.1f}) · {sqnr:.1f} dB"


def render(store: Store, steps: int) -> str:
    runs = [r for r in store.records if r["kind"] == "run" and r.get("steps") in (None, steps)]
    out = []
    gens = [r for r in store.records if r["kind"] == "generation" and r["steps"] == steps]
    if gens:
        out += ["## Generation cost", "",
                f"32 images, {steps} Adam steps (2 jitter rounds), {gens[0].get('machine')}, torch threads: "
                f"{gens[0].get('threads')}. During the sweep the machine was shared with other jobs (load average "
                "5–15 on 2 cores), so those times are upper bounds; the `--time` rows were measured separately, "
                "with the load average at the time.", ""]
        rows = []
        for name in dict.fromkeys(r["model"] for r in gens):
            secs = [r["seconds"] for r in gens if r["model"] == name]
            rows.append([model_label(name), f"sweep, {len(secs)} seeds", f"{statistics.mean(secs):.1f}",
                         f"{min(secs):.1f}–{max(secs):.1f}", "–"])
            for t in (r for r in store.records if r["kind"] == "timing" and r["model"] == name and r["steps"] == steps):
                rows.append([model_label(name), f"--time, {t['threads']} thread(s)", f"{t['seconds']:.1f}", "–",
                             f"{t['loadavg']:.1f}"])
        out += [format_table(["model", "when", "seconds (mean)", "range", "load avg (1 min)"], rows), ""]
    diags = [r for r in store.records if r["kind"] == "diagnostic" and r.get("steps") == steps]
    if diags:
        out += ["## What the float model sees in each source", "",
                "Mean over blocks of the patch-similarity differential entropy (PSAQ's objective; KDE h = 0.05, "
                "nats), RMS neighbour-pixel difference (normalized units), mean max-softmax confidence and "
                "number of distinct predicted classes among the 32 images; mean over seeds.", ""]
        rows = []
        for name in dict.fromkeys(r["model"] for r in diags):
            for source in CALIBS:
                rs = [r for r in diags if r["model"] == name and r["calib"] == source]
                if rs:
                    rows.append([model_label(name), CALIB_TITLES[source],
                                 *[f"{statistics.mean(r[k] for r in rs):.3f}" for k in ("entropy", "smoothness", "confidence")],
                                 f"{statistics.mean(r['classes'] for r in rs):.1f}"])
        out += [format_table(["model", "source", "patch-sim. entropy", "smoothness", "confidence", "classes"], rows), ""]
    grids = sorted(RESULTS.glob("data_free_*.png"))
    if grids:
        out += ["## What the models dreamed (seed 0)", ""]
        for name in dict.fromkeys(g.stem.removeprefix("data_free_").rsplit("_", 1)[0] for g in grids):
            out += [f"**{name}**: " + " · ".join(f"{CALIB_TITLES[c]}" for c in CALIBS), "",
                    " ".join(f"![{name} {c}]({g.name})" for c in CALIBS if (g := RESULTS / f"data_free_{name}_{c}.png").exists()), ""]
    floats = {(r["model"], r["variant"]): r["top1"] for r in store.records if r["kind"] == "float"}
    for model, variant in dict.fromkeys((r["model"], r["variant"]) for r in runs):
        mine = [r for r in runs if r["model"] == model and r["variant"] == variant]
        seeds = {m: len({r["seed"] for r in mine if r["method"] == m}) for m in dict.fromkeys(r["method"] for r in mine)}
        seeds_text = ", ".join(f"{n} for {', '.join(m for m in seeds if seeds[m] == n)}" for n in sorted(set(seeds.values()), reverse=True))
        flt = floats.get((model, variant))
        out += [f"## {model_label(model)} — {variant}" + (f" (float top-1 {flt:.2f})" if flt is not None else ""), "",
                f"Top-1 % on the MNIST-5k test split (1000 images), mean (min–max) over the seeds run for that cell (at most {seeds_text}; a cell without a range has one seed) "
                "· logit SQNR against the float model (dB, mean; higher = closer to float). Δ = PSAQ − real "
                "top-1, in points.", ""]
        rows = []
        present = [c for c in (*CALIBS, *PINNED) if any(r["calib"] == c for r in mine)]
        methods = list(dict.fromkeys(r["method"] for r in mine))
        for method in methods:
            for b in [b for b in BITS_ORDER if any(r["bits"] == b for r in mine)]:
                cell = {c: [r for r in mine if r["method"] == method and r["bits"] == b and r["calib"] == c]
                        for c in present}
                if not any(cell.values()):
                    continue
                delta = (f"{statistics.mean(r['top1'] for r in cell['psaq']) - statistics.mean(r['top1'] for r in cell['real']):+.1f}"
                         if cell.get("psaq") and cell.get("real") else "–")
                rows.append([method, b, *[_spread(cell[c]) for c in present], delta])
        out += [format_table(["method", "bits", *[CALIB_TITLES[c] for c in present], "Δ"], rows), ""]
    return "\n".join(out + render_steps(store))


def render_steps(store: Store) -> list[str]:
    """Ablation over generation length: the same seeds and model at several `steps`."""
    psaq = [r for r in store.records if r["kind"] == "run" and r["calib"] == "psaq" and r["variant"] == "natural"]
    out = []
    for model in dict.fromkeys(r["model"] for r in psaq):
        mine = [r for r in psaq if r["model"] == model]
        steps = sorted({r["steps"] for r in mine})
        if len(steps) < 2:
            continue
        seeds = sorted(set.intersection(*({r["seed"] for r in mine if r["steps"] == n} for n in steps)))
        pairs = [p for p in dict.fromkeys((r["method"], r["bits"]) for r in mine)
                 if all(any((r["method"], r["bits"], r["steps"]) == (*p, n) for r in mine) for n in steps)]
        rows = []
        for n in steps:
            def pick(kind: str, n: int = n) -> list[dict]:
                return [r for r in store.records if r["kind"] == kind and r["model"] == model and r.get("steps") == n
                        and r["seed"] in seeds and r.get("calib", "psaq") == "psaq"]
            diag, gens = pick("diagnostic"), pick("generation")
            quiet = [r for r in store.records if r["kind"] == "timing" and r["model"] == model and r["steps"] == n]
            cells = [_spread([r for r in mine if (r["method"], r["bits"], r["steps"]) == (*p, n) and r["seed"] in seeds])
                     for p in pairs]
            rows.append([n, f"{statistics.mean(r['entropy'] for r in diag):.3f}" if diag else "–",
                         f"{statistics.mean(r['confidence'] for r in diag):.3f}" if diag else "–",
                         f"{statistics.mean(r['seconds'] for r in gens):.0f} s" if gens else "–",
                         ", ".join(f"{r['seconds']:.0f} s ({r['threads']} thr, load {r['loadavg']:.1f})" for r in quiet)
                         or "–", *cells])
        out += [f"## Generation length: {model_label(model)} (natural)", "",
                f"PSAQ images for seeds {seeds} generated with more or fewer Adam steps: patch-similarity entropy "
                "and confidence of the float model on them, generation time of the 32 images (mean over the sweep's "
                "seeds, shared machine; and `--time` runs, with threads and load average), and top-1 · logit "
                "SQNR (dB) of the quantized model.", "",
                format_table(["steps", "entropy", "confidence", "time (sweep)", "time (--time)",
                              *[f"{m} {b}" for m, b in pairs]], rows), ""]
    return out


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--models", default="auto", help="'auto' (bundled + the 12-block model if trained) or a comma list")
    p.add_argument("--methods", default="minmax,repq-vit:reparam_head=false", help="comma-separated method names, or 'all'")
    p.add_argument("--bits", default="w8a8,w4a8,w4a4")
    p.add_argument("--seeds", default="0,1,2")
    p.add_argument("--calibs", default=",".join(CALIBS))
    p.add_argument("--steps", type=int, default=DataFreeConfig().steps)
    p.add_argument("--no-stress", action="store_true")
    p.add_argument("--store", default=str(RESULTS / "data_free_runs.jsonl"))
    p.add_argument("--out", default=str(RESULTS / "data_free.md"))
    p.add_argument("--render-only", action="store_true")
    p.add_argument("--time", metavar="THREADS", help="only time one generation per model (seed 0) at these "
                   "torch thread counts, e.g. '1,2', and record it with the current load average")
    args = p.parse_args()
    store = Store(Path(args.store))
    if args.time:
        os.chdir(ROOT)
        for name in ["bundled"] + ([str(D12.relative_to(ROOT))] if D12.exists() else []):
            model = load_model(name)
            for threads in [int(t) for t in args.time.split(",")]:
                torch.set_num_threads(threads)
                load = os.getloadavg()[0]
                t0 = time.perf_counter()
                generate_calibration(model, None, DataFreeConfig(steps=args.steps), progress=False)
                seconds = time.perf_counter() - t0
                store.append({"kind": "timing", "model": name, "steps": args.steps, "threads": threads,
                              "seed": 0, "seconds": round(seconds, 2), "loadavg": round(max(load, os.getloadavg()[0]), 2),
                              "finished": datetime.now(timezone.utc).isoformat(timespec="seconds")})
                print(f"{model_label(name)}: {seconds:.1f} s with {threads} thread(s)", flush=True)
    elif not args.render_only:
        models = (["bundled"] + ([str(D12.relative_to(ROOT))] if D12.exists() else [])
                  if args.models == "auto" else args.models.split(","))
        methods = list(available_methods()) if args.methods == "all" else args.methods.split(",")
        os.chdir(ROOT)  # model paths in the store are relative to the repository
        run(models, methods, args.bits.split(","), [int(s) for s in args.seeds.split(",")], args.calibs.split(","),
            not args.no_stress, args.steps, store)
    header = [
        "# Data-free calibration (PSAQ-ViT): real images vs generated vs Gaussian noise", "",
        f"Generated by `benchmarks/data_free.py` on {datetime.now(timezone.utc):%Y-%m-%d} from "
        f"`{Path(args.store).name}`. Models: the MNIST reference ViTs (`vit_mnist_d6` = bundled, 6 blocks; "
        "`vit_mnist_d12`, 12 blocks). Every source gives 32 calibration images per seed: **real** = the "
        "MNIST-5k train split (seed picks them), **PSAQ** = `DataFreeConfig(n_images=32, seed=seed)` "
        f"({args.steps} steps), **Gaussian** = N(0, 1) in normalized space. 1000 test images → one standard "
        "error ≈ 0.5 points. **stress** rows: the function-preserving LayerNorm outlier variant (6 of 192 "
        "channels ×30), a stress test, not a natural model; it reuses the natural model's generated images "
        "(same float function).", "", "",
    ]
    out = Path(args.out)
    # the hand-written discussion below the marker survives regeneration
    kept = out.read_text().partition(DISCUSSION)[2] if out.exists() and DISCUSSION in out.read_text() else "\n"
    out.write_text("\n".join(header) + render(store, args.steps) + "\n" + DISCUSSION + kept)
    print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
