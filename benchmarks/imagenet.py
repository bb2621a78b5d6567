"""Reproduce the papers' ImageNet tables: method × bits × model × seed on a real ImageNet folder, with timm or
Hugging Face pretrained weights, written as the tables of benchmarks/results/accuracy.md with the papers'
numbers beside ours.

    torchrun --nproc_per_node 8 benchmarks/imagenet.py --data /data/imagenet --device cuda \\
        --models deit_small_patch16_224,swin_tiny_patch4_window7_224 --methods minmax,repq-vit --bits w6a6,w4a4
    python benchmarks/imagenet.py --data /data/imagenet --limit-val 1000 --device cpu   # a quick look, one process

--data ROOT holds val/ and train/ (one subfolder per class); or --data VAL (the class folders themselves) with
--calib FOLDER. Each run calibrates on --calib-size images (32, the papers'; the reconstruction methods'
papers use 1024) drawn from the calibration folder with the run's seed, then scores every validation image
(or the first --limit-val of a seed-0 shuffle: a variant of its own, never mixed with full runs). A
calibration folder is listed on every run: point --calib at a sample of train/ to save minutes per run.

Runs go through vitquant.bench (a resumable store: re-running resumes, a finished run is never repeated;
several sweeps may share it). Under torchrun every rank evaluates its shard of the validation images and the
calibration observe pass is split among them; rank 0 alone writes the store and the markdown.

The papers' numbers (PAPER below, from ../shared/research/ptq_methods.md §1 and methods_2025.md) are those of
their own checkpoints and preprocessing: DeiT crop 0.875 in the papers, 0.9 in timm's config, which vitquant
uses; vit_base_patch16_224 and swin_small_patch4_window7_224 resolve in timm ≥ 0.9 to other weights than the
papers' (name the tag: vit_base_patch16_224.augreg_in21k_ft_in1k, swin_small_patch4_window7_224.ms_in1k).
Compare the float rows first. Third-party [T] numbers of the research notes are left out.
"""
from __future__ import annotations

import argparse
import platform
import sys
import warnings
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent / "src"))

from vitquant import distributed  # noqa: E402
from vitquant.bench import ResultsStore, SweepSpec, run_sweep  # noqa: E402
from vitquant.calibration.data import check_source  # noqa: E402
from vitquant.config import parse_method_spec  # noqa: E402
from vitquant.errors import VitquantError  # noqa: E402
from vitquant.report.accuracy import BITS_ORDER, render_accuracy, render_summary  # noqa: E402
from vitquant.report.table import format_table  # noqa: E402
from vitquant.serialization import check_output_file, is_vitquant_markdown, write_output_text  # noqa: E402

PAPER_MODELS = ["DeiT-S", "DeiT-B", "ViT-B", "Swin-T", "Swin-S"]
# timm architecture (or Hugging Face id: the same weights converted) -> the papers' model and checkpoint tag
CHECKPOINTS = {
    "deit_small_patch16_224": ("DeiT-S", "fb_in1k"), "deit_base_patch16_224": ("DeiT-B", "fb_in1k"),
    "vit_base_patch16_224": ("ViT-B", "augreg_in21k_ft_in1k"),
    "swin_tiny_patch4_window7_224": ("Swin-T", "ms_in1k"), "swin_small_patch4_window7_224": ("Swin-S", "ms_in1k"),
    "hf:facebook/deit-small-patch16-224": ("DeiT-S", None), "hf:facebook/deit-base-patch16-224": ("DeiT-B", None),
    "hf:microsoft/swin-tiny-patch4-window7-224": ("Swin-T", None),
    "hf:microsoft/swin-small-patch4-window7-224": ("Swin-S", None),
}


@dataclass(frozen=True)
class Published:
    method: str  # a vitquant method spec (name, or name:key=value for the paper's setting)
    bits: str
    top1: dict[str, float]  # paper model -> ImageNet top-1 %
    source: str  # [R] official README, [P] the method's paper, [S] another paper's table


PAPER = [
    Published("float", "FP32", {"DeiT-S": 79.85, "DeiT-B": 81.80, "ViT-B": 84.54, "Swin-T": 81.35, "Swin-S": 83.23},
              "FP32 most papers print (ptq_methods.md §1.0)"),
    Published("minmax", "W8A8", {"DeiT-S": 77.65, "DeiT-B": 80.95, "ViT-B": 83.90, "Swin-T": 80.96, "Swin-S": 82.76},
              "PTQ4ViT README, its \"Base PTQ\" [R]"),
    Published("minmax", "W6A6", {"DeiT-S": 72.27, "DeiT-B": 78.79, "ViT-B": 75.67, "Swin-T": 78.46, "Swin-S": 81.74},
              "PTQ4ViT README, its \"Base PTQ\" [R]"),
    Published("ptq4vit", "W8A8", {"DeiT-S": 79.47, "DeiT-B": 81.48, "ViT-B": 84.25, "Swin-T": 81.25, "Swin-S": 83.11},
              "PTQ4ViT README [R]"),
    Published("ptq4vit", "W6A6", {"DeiT-S": 76.28, "DeiT-B": 80.25, "ViT-B": 81.65, "Swin-T": 80.47, "Swin-S": 82.38},
              "PTQ4ViT README [R]"),
    Published("ptq4vit", "W4A4", {"DeiT-S": 34.08, "DeiT-B": 64.39, "ViT-B": 30.69, "Swin-S": 76.09},
              "RepQ-ViT's reproduction, cited by I&S-ViT, ERQ and APHQ-ViT [S]"),
    Published("ptq4vit", "W3A3", {"DeiT-S": 0.10, "DeiT-B": 31.06, "ViT-B": 0.10, "Swin-S": 28.69},
              "APHQ-ViT Table 1 [S]; I&S-ViT prints 0.01 / 0.27 / 0.01 / 0.35"),
    Published("fq-vit", "W8A8", {"DeiT-S": 78.40, "DeiT-B": 80.85, "ViT-B": 82.68, "Swin-T": 80.04, "Swin-S": 82.47},
              "FQ-ViT README, W8/A8/Attn4 with Log-Int-Softmax [R]"),
    Published("fq-vit:lis=false", "W8A8", {"DeiT-S": 79.17, "DeiT-B": 81.20, "ViT-B": 83.31, "Swin-T": 80.51,
                                           "Swin-S": 82.71}, "FQ-ViT README, W8/A8/Attn8 [R]"),
    Published("fq-vit", "W6A6", {"DeiT-S": 45.51, "DeiT-B": 64.63, "ViT-B": 0.10, "Swin-S": 66.50},
              "I&S-ViT Table 1 [S]"),
    Published("fq-vit", "W4A4", {"DeiT-S": 0.10, "DeiT-B": 0.10, "ViT-B": 0.10, "Swin-S": 0.10},
              "I&S-ViT and ERQ tables [S]"),
    Published("noisyquant:matmuls=float", "W6A6", {"DeiT-S": 76.37, "DeiT-B": 79.77, "ViT-B": 81.90, "Swin-S": 82.78},
              "NoisyQuant-Linear (on EasyQuant), I&S-ViT Table 1 [S]"),
    Published("repq-vit", "W6A6", {"DeiT-S": 78.90, "DeiT-B": 81.27, "ViT-B": 83.62, "Swin-T": 80.69, "Swin-S": 82.79},
              "RepQ-ViT README [R]"),
    Published("repq-vit", "W4A4", {"DeiT-S": 69.03, "DeiT-B": 75.61, "ViT-B": 68.48, "Swin-T": 72.31, "Swin-S": 79.45},
              "RepQ-ViT README [R]"),
    Published("repq-vit", "W3A3", {"DeiT-S": 0.10, "DeiT-B": 0.10, "ViT-B": 0.10, "Swin-S": 0.10},
              "APHQ-ViT Table 1 [S]; I&S-ViT prints 4.37 / 4.84 / 0.14 / 8.84"),
    Published("adalog", "W6A6", {"DeiT-S": 79.39, "DeiT-B": 81.55, "ViT-B": 84.80, "Swin-S": 83.19},
              "AdaLog README, calibration only [R]"),
    Published("adalog", "W4A4", {"DeiT-S": 72.06, "DeiT-B": 78.03, "ViT-B": 79.68, "Swin-S": 80.77},
              "AdaLog README, calibration only [R]"),
    Published("adalog", "W3A3", {"DeiT-S": 24.47, "DeiT-B": 57.45, "ViT-B": 37.91, "Swin-S": 64.41},
              "AdaLog README, calibration only [R]"),
    Published("adalog:reconstruct=true", "W4A4", {"DeiT-S": 76.36, "DeiT-B": 80.20, "ViT-B": 83.13, "Swin-S": 81.99},
              "AdaLog README, with block reconstruction (\"Retrain\") [R]"),
    Published("adalog:reconstruct=true", "W3A3", {"DeiT-S": 63.24, "DeiT-B": 74.99, "ViT-B": 76.73, "Swin-S": 76.01},
              "AdaLog README, with block reconstruction (\"Retrain\") [R]"),
    Published("ias-vit", "W6A6", {"DeiT-S": 79.15, "DeiT-B": 81.68, "ViT-B": 83.82, "Swin-S": 82.89},
              "I&S-ViT paper [P]"),
    Published("ias-vit", "W4A4", {"DeiT-S": 75.81, "DeiT-B": 79.97, "ViT-B": 80.07, "Swin-S": 81.17},
              "I&S-ViT paper [P]"),
    Published("ias-vit", "W3A3", {"DeiT-S": 55.78, "DeiT-B": 73.30, "ViT-B": 63.77, "Swin-S": 74.20},
              "I&S-ViT paper [P]"),
    Published("dopq-vit", "W4A4", {"DeiT-S": 75.84, "DeiT-B": 80.13, "ViT-B": 80.95, "Swin-S": 81.71},
              "APHQ-ViT Table 1 [S]"),
    Published("dopq-vit", "W3A3", {"DeiT-S": 59.26, "DeiT-B": 74.91, "ViT-B": 65.76, "Swin-S": 74.77},
              "APHQ-ViT Table 1 [S]"),
    Published("erq", "W4A4", {"DeiT-S": 72.56, "DeiT-B": 78.23, "ViT-B": 76.63, "Swin-S": 80.74},
              "ERQ (ICML'24), APHQ-ViT Table 1 [S]"),
]
_BY_CELL = {(p.method, p.bits): p for p in PAPER}
METHOD_ORDER = ["minmax", "percentile", "repq-vit", "ptq4vit", "fq-vit", "noisyquant", "adalog", "dopq-vit",
                "ias-vit", "erq"]


def _arch_and_tag(model: str) -> tuple[str, str | None]:
    """('deit_small_patch16_224', 'fb_in1k') from a timm name with or without its tag; HF ids as given."""
    if model.startswith("hf:") or "/" in model or model.endswith(".safetensors"):
        return model, None
    arch, _, tag = model.partition(".")
    return arch, tag or None


def paper_model(model: str) -> str | None:
    """The papers' name for a stored model id ('DeiT-S'), or None when no paper reports it."""
    entry = CHECKPOINTS.get(_arch_and_tag(model)[0])
    return entry[0] if entry else None


def paper_top1(model: str, variant: str, method: str, bits: str) -> float | None:
    """The published top-1 of a cell: the exact method spec's row, else (for a spec with options the table has
    no row of its own for, e.g. repq-vit:reparam_head=false) the method's. Natural models only."""
    key = paper_model(model)
    if key is None or not variant.startswith("natural"):
        return None
    own_rows = any(p.method == method for p in PAPER)
    for spec in [method] if own_rows else [method, parse_method_spec(method)[0]]:
        entry = _BY_CELL.get((spec, bits))
        if entry is not None and key in entry.top1:
            return entry.top1[key]
    return None


def checkpoint_note(model: str) -> str | None:
    """Where the weights `model` names differ from the papers' checkpoint (timm's default tag moved)."""
    arch, tag = _arch_and_tag(model)
    entry = CHECKPOINTS.get(arch)
    if entry is None or entry[1] is None:
        return None
    if tag is None:
        try:
            from timm.models import get_pretrained_cfg

            cfg = get_pretrained_cfg(arch)
            tag = getattr(cfg, "tag", None)
        except Exception:  # noqa: BLE001 - an older timm: say nothing rather than guess
            return None
    if tag is None or tag == entry[1]:
        return None
    return (f"`{model}` loads timm's `{tag}` weights; the papers used `{arch}.{entry[1]}` "
            "(compare the float rows; pass that name to match them)")


def _tagged(variant: str, tag: str) -> str:
    """'natural' -> 'natural (tag)'; 'natural (val subset 10)' -> 'natural (val subset 10, tag)'."""
    return f"{variant[:-1]}, {tag})" if variant.endswith(")") else f"{variant} ({tag})"


def render(records: list[dict], store_name: str) -> str:
    """The markdown of benchmarks/results/imagenet.md from the store's records."""
    # runs calibrated on another number of images than the papers' 32 (1024 for the reconstruction methods'
    # setting) are distinct runs in the store; they get sections of their own here, never a shared mean
    records = [r if r.get("calib_size", 32) == 32 else
               {**r, "variant": _tagged(r["variant"], f"calib {r['calib_size']}")} for r in records]
    models = list(dict.fromkeys(r["model"] for r in records))
    labels = {m: f"{m} ({paper_model(m)})" if paper_model(m) else m for m in models}
    # the summary's column headers: the papers' name where it names one model of this store, else the file stem
    named = [paper_model(m) for m in models]
    short = {m: n if n and named.count(n) == 1 else Path(m).stem if m.endswith(".safetensors") else m
             for m, n in zip(models, named)}
    data: dict[tuple[str, str], dict[str, str]] = {}
    for r in records:
        seen = data.setdefault((r["model"], r["variant"]), {})
        for field in ("eval", "calib"):
            if r.get(field):
                seen.setdefault(field, r[field])
    machines = sorted({r["machine"] for r in records if "machine" in r})
    lines = [
        "# ImageNet top-1 of vitquant's PTQ methods next to the papers' numbers", "",
        f"Generated by `benchmarks/imagenet.py` on {datetime.now(timezone.utc):%Y-%m-%d} from `{store_name}` "
        f"({len(records)} runs; {'; '.join(machines) or platform.machine()}). Data (each seed draws its own "
        "calibration images from the folder named):", "",
        *[f"- {labels[m]} — {v}: scored on {d.get('eval', '–')}; calibrated on {d.get('calib', '–')}"
          for (m, v), d in data.items()], "",
        "Preprocessing is each model's own timm/HF config (DeiT: crop 0.9, where the papers crop 0.875). "
        "**paper** columns: the published number for that method, bits and model (sources below; the "
        "checkpoints the papers used are named in `benchmarks/imagenet.py`).", "",
    ]
    notes = [n for n in (checkpoint_note(m) for m in models) if n]
    lines += [f"Note: {n}." for n in notes] + ([""] if notes else [])
    bits = tuple(b for b in BITS_ORDER if any(r["bits"] == b for r in records))
    lines += ["## Summary", "",
              "Top-1 %, mean over the seeds run; methods sorted by their mean over our columns.", "",
              render_summary(records, bits=bits, method_order=METHOD_ORDER, labels=short, paper=paper_top1), "",
              "## Per model", "",
              render_accuracy(records, method_order=METHOD_ORDER, labels=labels, paper=paper_top1,
                              data_note="Top-1 % on the validation images listed at the top"),
              "## The papers' numbers", "",
              "ImageNet-1k top-1 %. [R] the method's official README, [P] its paper, [S] another paper's table.", ""]
    swept = {parse_method_spec(r["method"])[0] for r in records} | {"float"}
    rows = [[p.method, p.bits, *[f"{p.top1[k]:.2f}" if k in p.top1 else "–" for k in PAPER_MODELS], p.source]
            for p in PAPER if parse_method_spec(p.method)[0] in swept]
    lines += [format_table(["vitquant method", "bits", *PAPER_MODELS, "source"], rows), ""]
    return "\n".join(lines)


def _folders(args) -> tuple[str, str]:
    """(validation folder, calibration folder) from --data/--calib, checked before any model is loaded."""
    root = Path(args.data)
    val = root / "val" if (root / "val").is_dir() else root
    calib = Path(args.calib) if args.calib else root / "train"
    if not args.calib and not calib.is_dir():
        raise VitquantError(f"'{root}' has no train/ folder to calibrate from; pass --calib FOLDER (any folder of "
                            "images, e.g. a sample of ImageNet train)")
    check_source(str(val), "evaluation")
    check_source(str(calib), "calibration", min_images=min(8, args.calib_size))
    return str(val), str(calib)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--data", help="ImageNet root holding val/ and train/, or a validation ImageFolder with --calib")
    p.add_argument("--calib", help="calibration image folder (default: DATA/train)")
    p.add_argument("--models", default="deit_small_patch16_224",
                   help="comma-separated timm names (pretrained weights), hf:<id>, or vitquant model files")
    p.add_argument("--methods", default="minmax,repq-vit", help="comma-separated method specs, or 'all'")
    p.add_argument("--bits", default="w6a6,w4a4")
    p.add_argument("--seeds", default="0")
    p.add_argument("--calib-size", type=int, default=32,
                   help="calibration images per run (32, the papers'; 1024 for the reconstruction methods' setting)")
    p.add_argument("--limit-val", type=int, help="score only the first N validation images of a seed-0 shuffle")
    p.add_argument("--device", help="cpu or cuda (default: CUDA when available; under torchrun each rank's own GPU)")
    p.add_argument("--stress", action="store_true", help="also the outlier-stress variants (no paper numbers)")
    p.add_argument("--no-agreement", action="store_true",
                   help="skip the agreement with the float model (saves a float forward per evaluated batch)")
    p.add_argument("--store", default=str(HERE / "results" / "imagenet_runs.jsonl"))
    p.add_argument("--out", default=str(HERE / "results" / "imagenet.md"))
    p.add_argument("--render-only", action="store_true", help="only rewrite the markdown from the store")
    args = p.parse_args(argv)
    try:
        distributed.init(device=args.device)
        if not distributed.is_main():
            warnings.simplefilter("ignore")  # every rank would repeat rank 0's warnings
        check_output_file(args.out, True, is_vitquant_markdown, "markdown table")
        store = ResultsStore(args.store)
        if not args.render_only:
            if not args.data:
                p.error("--data is required (or --render-only)")
            val, calib = _folders(args)
            spec = SweepSpec(models=[m.strip() for m in args.models.split(",") if m.strip()],
                             methods=args.methods.split(","), bits=args.bits.split(","),
                             seeds=[int(s) for s in args.seeds.split(",")], stress=args.stress, calib=calib,
                             eval_data=val, calib_size=args.calib_size, eval_limit=args.limit_val,
                             device=str(distributed.local_device(args.device)), agreement=not args.no_agreement)
            run_sweep(spec, store)
        if distributed.is_main():
            write_output_text(args.out, render(store.records, Path(args.store).name) + "\n")
            print(f"wrote {args.out} ({len(store.records)} runs in {args.store})")
    except VitquantError as e:
        # a refusal every rank meets alike (paths, options); a rank that fails alone ends the job through torchrun
        print(f"imagenet.py: error: {e}", file=sys.stderr)
        return 2
    distributed.finish()
    return 0


if __name__ == "__main__":
    sys.exit(main())
