"""`vitquant` command line: a thin layer over the API.

Every user error is one line `vitquant: error: …` on stderr with exit code 2, and every check that can
fail cheaply (arguments, paths, output writability, what `--force` would replace, the architecture) runs
before the expensive work. Warnings are one line too (`vitquant: warning: …`). Nothing heavy is
imported until a command runs, so `vitquant --help` answers at once.
"""
from __future__ import annotations

import argparse
import os
import socket
import sys
import tempfile
import warnings
from pathlib import Path
from contextlib import contextmanager, redirect_stdout
from typing import Iterator, Sequence

from vitquant.errors import VitquantError

PRESETS = ("w8a8", "w6a6", "w4a8", "w4a4", "w3a3")
GENERATED = ("data-free", "gaussian")
# Calibration wall time of the 12-block 28×28 reference ViT, 32 images, 2 CPU cores, W8A8..W3A3
# (benchmarks/results/accuracy.md), and CPU time on timm DeiT-S 224², 32 images, W4A4, 2 threads, in
# units of one float forward over the same images (benchmarks/results/calibration_cost.md).
COST_HINTS = {"minmax": "<1 s", "fq-vit": "<1 s", "percentile": "2-6 s", "dopq-vit": "2-6 s", "repq-vit": "4-8 s",
              "noisyquant": "5-20 s", "erq": "5-30 s", "ptq4vit": "0.5-2 min", "ias-vit": "0.5-3.5 min",
              "adalog": "1.5-3 min", "aphq-vit": "3-6 min", "fima-q": "3-6 min", "best": "4 s-6 min"}
# calibration CPU time on DeiT-S 224² (32 images, 2 threads) in float forwards over the same images: the
# latest "after" rows of benchmarks/results/calibration_cost.jsonl (a test keeps the two equal)
DEIT_S_COST = {"minmax": "2×", "fq-vit": "3×", "percentile": "3×", "repq-vit": "3×", "dopq-vit": "6×",
               "noisyquant": "8×", "adalog": "19×", "erq": "25×", "ptq4vit": "25×", "ias-vit": "266×"}


class Parser(argparse.ArgumentParser):
    """argparse that reports a usage error as one line, like every other vitquant error."""

    def error(self, message: str):
        self.exit(2, f"vitquant: error: {message} (see `{self.prog} --help`)\n")


def _config(args):
    from vitquant.config import QuantConfig, parse_bits, parse_options, parse_site_bits

    w, a = parse_bits(args.bits)
    return QuantConfig(method=args.method, w_bits=w, a_bits=a, calib_size=args.calib_size, seed=args.seed,
                       options=parse_options(args.opt), deployable=args.deployable,
                       site_bits=parse_site_bits(args.site_bits), keep_float=list(args.keep_float),
                       unknown_layers=args.unknown_layers)


def _architecture_check(config, found: dict):
    """The core's structure check (and the plan's pattern check) on the randomly initialized model,
    before any weight is downloaded or any image decoded; keeps the input shape it found."""
    from vitquant.methods import get_method
    from vitquant.models import prepare
    from vitquant.plan import SitePlan

    def check(model):
        method = get_method(config.method)()
        qmodel = prepare(model, extra_sites=method.requires_sites, unknown=config.unknown_layers)
        method.check(qmodel.structure)
        SitePlan.resolve(config, qmodel.structure)
        found["input_shape"] = tuple(qmodel.structure.input_shape or ()) or None

    return check


def _needs_hub(name: str, checkpoint: str | None) -> bool:
    from vitquant.models.loading import BUNDLED
    from vitquant.models.sources import HF_PREFIX, PY_PREFIX, TV_PREFIX

    if name in BUNDLED or name.startswith((PY_PREFIX, TV_PREFIX)) or Path(name).exists():
        return False
    if name.startswith(HF_PREFIX):
        return not Path(name[len(HF_PREFIX):]).is_dir()
    return checkpoint is None and not name.endswith(".safetensors")


def fail_fast_offline(name: str, checkpoint: str | None = None) -> None:
    """Without a network, huggingface_hub retries each file for ~50 s before failing; when the hub is not
    reachable, switch it to offline mode, so cached weights still load and missing ones fail at once."""
    if not _needs_hub(name, checkpoint) or os.environ.get("HF_HUB_OFFLINE"):
        return
    try:
        socket.create_connection(("huggingface.co", 443), timeout=3).close()
    except OSError:
        os.environ["HF_HUB_OFFLINE"] = "1"
        if "huggingface_hub.constants" in sys.modules:  # read at import time, so set it there too
            sys.modules["huggingface_hub.constants"].HF_HUB_OFFLINE = True


def refuse_nonfinite(model, what: str) -> None:
    from vitquant.models.io import refuse_nonfinite as refuse

    refuse(model, what, "--allow-nonfinite")


DEVICE_HELP = "'cpu', 'cuda' or 'cuda:N' (default: CUDA when available, else the CPU)"


def add_device_argument(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--device", help=DEVICE_HELP)


def resolve_device(requested: str | None):
    """--device as a torch.device (under torchrun a plain 'cuda' is this rank's GPU), refused at once when it
    does not exist here, before any model is loaded."""
    import torch

    from vitquant.distributed import local_device

    try:
        device = local_device(requested)
    except RuntimeError:  # torch.device's own parse error: not a VitquantError
        raise VitquantError(f"--device {requested!r} is not a device; use 'cpu', 'cuda' or 'cuda:N'") from None
    if device.type not in ("cpu", "cuda"):
        raise VitquantError(f"--device {requested!r}: vitquant runs on 'cpu' or 'cuda' devices only")
    if device.type == "cuda" and device.index >= torch.cuda.device_count():
        raise VitquantError(f"--device {requested}: this machine has {torch.cuda.device_count()} CUDA device(s) "
                            f"(cuda:0 … cuda:{torch.cuda.device_count() - 1})")
    return device


def _min_calib(args) -> None:
    if args.min_calib < 1:
        raise VitquantError(f"--min-calib must be at least 1, got {args.min_calib}")
    if args.calib_size < 1:
        raise VitquantError(f"--calib-size must be a positive number of images, got {args.calib_size}")
    if args.calib not in GENERATED and args.calib_size < args.min_calib:
        raise VitquantError(f"--calib-size {args.calib_size} is below the minimum of {args.min_calib} calibration "
                            "images; ask for more images, or lower the minimum with --min-calib N")


def cmd_quantize(args) -> int:
    import vitquant
    from vitquant.calibration.data import check_source
    from vitquant.serialization import check_output_dir

    config = _config(args)  # every check that needs no model, before loading anything
    device = resolve_device(args.device)
    if args.data_free_steps is not None and args.calib != "data-free":
        raise VitquantError("--data-free-steps only applies to --calib data-free")
    _min_calib(args)
    from vitquant.mixed.cli import request, summary_lines

    mixed = request(args)  # --avg-bits / --size-mb / --max-drop, checked (None when not asked)
    out = check_output_dir(args.out, args.force)
    if args.calib not in GENERATED:
        check_source(args.calib, "calibration", min_images=args.min_calib)
    if args.eval:
        check_source(args.eval, "evaluation")
    fail_fast_offline(args.model, args.checkpoint)
    found: dict = {}
    model = vitquant.load_model(args.model, args.checkpoint, check=_architecture_check(config, found))
    if not args.allow_nonfinite:
        refuse_nonfinite(model, f"model {args.model!r}")
    model = model.to(device)  # calibration, data-free generation and --eval compute where the model is
    calib, files = args.calib, {}
    with tempfile.TemporaryDirectory() as tmp:
        if calib == "data-free":  # keep what the model "dreamed" beside the result
            from vitquant.calibration.datafree import DataFreeConfig

            files["calibration_images.png"] = Path(tmp) / "calibration_images.png"
            steps = {} if args.data_free_steps is None else {"steps": args.data_free_steps}
            calib = DataFreeConfig(n_images=config.calib_size, seed=config.seed,
                                   grid_path=str(files["calibration_images.png"]), **steps)
        elif calib not in GENERATED:
            from vitquant.calibration.data import data_config_for, load_calibration

            calib = load_calibration(calib, data_config_for(model, found.get("input_shape")), n=config.calib_size,
                                     seed=config.seed, min_images=args.min_calib)
        qmodel, mixed_extra = None, {}
        if mixed is not None:  # the per-site plan, and with --max-drop the model it ends with
            config, mixed_extra, qmodel = mixed.run(model, config, calib, progress=not args.quiet)
        if qmodel is None:
            qmodel = vitquant.quantize(model, config, calib, progress=not args.quiet,
                                       allow_nonfinite=args.allow_nonfinite)
        if files:
            qmodel.stats["calibration_grid"] = "calibration_images.png"  # inside the output directory
        extra = _evaluate_for_report(args, qmodel, model)
        from vitquant import distributed

        if distributed.is_main():  # under torchrun every rank holds the same model; one writes it
            vitquant.save(qmodel, out, force=args.force, extra={**extra, **mixed_extra}, extra_files=files)
    _print_quantized(args, config, qmodel.stats, out, extra)
    for line in summary_lines(mixed_extra):
        print(line)
    return 0


def _print_quantized(args, config, s: dict, out: Path, extra: dict) -> None:
    took = f"calibrated in {s['calibration_seconds']:.1f} s"
    if "generation_seconds" in s:
        took = f"{s['calibration_images']} images generated in {s['generation_seconds']:.1f} s, {took}"
    method = s["recipe"].replace(" → ", " (") + ")" if "recipe" in s else config.method  # best (repq-vit+qwt)
    print(f"quantized {args.model} with {method} {config.bits_name} on {s['calibration_source']}: {took} "
          f"-> {out}")
    for what, items in (("kept float by the plan", s.get("float_sites", [])),
                        ("left float (not understood or constant)", s.get("float_ops", []))):
        if items:
            shown = ", ".join(items[:6]) + (f" and {len(items) - 6} more" if len(items) > 6 else "")
            print(f"{what}: {shown}")
    if "calibration_grid" in s:
        print(f"generated calibration images: {out / 'calibration_images.png'}")
    if extra:
        e = extra["evaluation"]
        print(f"top-1 {e['top1']:.2f}% (float {e['float_top1']:.2f}%), agreement with float {e['agreement']:.2f}%")
    print(f"report: {out / 'report.md'}")


def _evaluate_for_report(args, qmodel, model) -> dict:
    import vitquant

    extra = {}
    if args.eval:
        res = vitquant.evaluate(qmodel, args.eval, float_model=model, progress=not args.quiet)
        flt = vitquant.evaluate(model, args.eval, progress=not args.quiet)
        extra["evaluation"] = {"data": res.source, "float_top1": flt.top1, "top1": res.top1, "top5": res.top5,
                               "agreement": res.agreement}
    return extra


def _is_quantized_dir(path: str) -> bool:
    from vitquant.serialization import META

    return (Path(path) / META).is_file()


def _float_reference(path: str, qmodel, args):
    """(the float original of a saved quantized model, or None; why not, when not)."""
    import json

    import vitquant
    from vitquant.serialization import META, sha256_file

    src = qmodel.source or {}
    if src.get("name") == "bundled":
        return vitquant.load_model("bundled"), None
    recorded = json.loads((Path(path) / META).read_text(encoding="utf-8")).get("float_weights") or {}
    weights = args.float_checkpoint or recorded.get("path") or src.get("weights")
    kind = src.get("type")
    if weights and (Path(weights).exists() or kind == "hf"):
        if recorded.get("sha256") and Path(weights).is_file() and sha256_file(weights) != recorded["sha256"]:
            why = f"'{weights}' is not the checkpoint {path} was quantized from (its sha256 differs)"
            if args.float_checkpoint:
                raise VitquantError(f"{why}; pass the original checkpoint")
            return None, f"{why}; pass the original with --float-checkpoint PATH"
        if kind == "timm":
            return vitquant.load_model(src["name"], weights), None
        if kind == "torchvision":
            return vitquant.load_model(f"torchvision:{src['name']}", weights), None
        if kind == "hf" and (Path(weights).is_dir() or args.float_reference):
            fail_fast_offline(f"hf:{weights}")
            return vitquant.load_model(f"hf:{weights}"), None
        if kind == "timm.VisionTransformer":
            return vitquant.load_model(str(weights)), None
    if kind == "python":
        return vitquant.load_model(f"python:{src['factory']}"), None
    if args.float_reference and kind in ("timm", "torchvision") and not weights:
        fail_fast_offline(src["name"])
        return vitquant.load_model(src["name"] if kind == "timm" else f"torchvision:{src['name']}"), None
    if weights and not Path(weights).exists() and kind != "hf":
        return None, (f"the float checkpoint it was quantized from, '{weights}', is gone (moved or deleted); pass "
                      "its new place with --float-checkpoint PATH")
    return None, "its float model comes from the hub; pass --float-reference to download it"


def cmd_eval(args) -> int:
    import vitquant
    from vitquant.calibration.data import check_class_count, check_source

    backend = args.backend or ("onnxruntime" if args.model.endswith(".onnx") else "pytorch")
    if args.limit is not None and args.limit < 1:
        raise VitquantError(f"--limit must be a positive number of images, got {args.limit}")
    if backend == "onnxruntime":
        if args.device not in (None, "cpu"):
            raise VitquantError(f"--device {args.device} applies to the pytorch backend; ONNX Runtime runs on the CPU")
        from vitquant.export.cli import cmd_eval as cmd_eval_ort

        return cmd_eval_ort(args)
    device = resolve_device(args.device)
    classes = check_source(args.data, "evaluation")
    float_model, note = None, None
    if _is_quantized_dir(args.model):
        if args.checkpoint:
            raise VitquantError("--checkpoint does not apply to a saved quantized directory (it holds its weights); "
                                "for its float reference use --float-checkpoint PATH")
        model = vitquant.load(args.model)
        float_model, note = _float_reference(args.model, model, args)
        if args.float_checkpoint is None and args.float_reference and float_model is None:
            raise VitquantError(f"no float reference for {args.model}: {note}")
    elif Path(args.model).is_dir() and not (Path(args.model) / "config.json").is_file():
        raise VitquantError(f"'{args.model}' is a directory but neither a saved quantized model (no "
                            "quant_config.json) nor a Hugging Face model (no config.json)")
    else:
        if args.float_checkpoint:
            raise VitquantError("--float-checkpoint applies to a saved quantized directory only")
        fail_fast_offline(args.model, args.checkpoint)
        model = vitquant.load_model(args.model, args.checkpoint)
    if not args.allow_nonfinite:
        refuse_nonfinite(getattr(model, "model", model), f"model {args.model!r}")
    check_class_count(model, classes)
    model = model.to(device)  # a saved quantized model loads on the CPU: all of it moves
    float_model = float_model.to(device) if float_model is not None else None
    res = vitquant.evaluate(model, args.data, float_model=float_model, limit=args.limit, progress=not args.quiet)
    line = f"{args.model}: top-1 {res.top1:.2f}%  top-5 {res.top5:.2f}%  on {res.source}"
    if res.agreement is not None:
        line += f"  agreement with float {res.agreement:.2f}%"
    print(line)
    if note:
        print(f"agreement with float not computed: {note}")
    return 0


def cmd_list(args) -> int:
    from vitquant.methods import available_methods
    from vitquant.models.loading import BUNDLED

    print("methods (cost: calibration time of the 12-block 28×28 reference ViT with 32 images on 2 CPU cores;")
    print("         DeiT-S 224²: CPU time with 32 images in float forwards over them, 30× ≈ 2 CPU-min,")
    print("         for I&S-ViT with --opt iters=100 --opt batch_size=8):")
    for name, cls in available_methods().items():
        deit = f"DeiT-S {DEIT_S_COST[name]}" if name in DEIT_S_COST else ""
        print(f"  {name:<12} {COST_HINTS.get(name, '?'):<11} {deit:<12} {cls.summary}")
    print("steps: append +qwt to any method (e.g. repq-vit+qwt): QwT (CVPR'25), a closed-form float linear")
    print("       compensation of each block's quantization error, fitted on the calibration images (seconds)")
    print("bit presets: " + ", ".join(PRESETS) + " (any wXaY with 2 ≤ X, Y ≤ 8)")
    print("bundled models: " + ", ".join(BUNDLED))
    return 0


def cmd_demo(args) -> int:
    from vitquant.config import parse_bits
    from vitquant.demo import run_demo
    from vitquant.methods import get_method

    get_method(args.method)
    for b in args.bits:
        parse_bits(b)
    run_demo(method=args.method, presets=args.bits, progress=not args.quiet)
    return 0


def cmd_bench(args) -> int:
    from vitquant.bench import ResultsStore, SweepSpec, run_sweep
    from vitquant.calibration.data import check_source
    from vitquant.report.accuracy import render_accuracy
    from vitquant.serialization import check_writable, check_output_file, is_vitquant_markdown, write_output_text

    split = lambda v: [x.strip() for x in v.split(",") if x.strip()]  # noqa: E731
    try:
        seeds = [int(x) for x in split(args.seeds)]
    except ValueError:
        raise VitquantError(f"--seeds must be comma-separated integers, e.g. 0,1,2; got {args.seeds!r}") from None
    spec = SweepSpec(models=split(args.models), methods=split(args.methods), bits=split(args.bits), seeds=seeds,
                     stress=not args.no_stress, calib=args.calib, eval_data=args.data)
    for name in spec.models:
        if ("/" in name or name.endswith(".safetensors")) and ":" not in name and not Path(name).is_file():
            raise VitquantError(f"model file '{name}' does not exist")
    check_source(spec.calib, "calibration")
    check_source(spec.eval_data, "evaluation")
    store = ResultsStore(args.store)  # refuses a file that is not a store
    check_writable(store.path.parent, f"the results store '{store.path}'")
    if args.markdown:  # a table vitquant wrote is replaced on every run; anything else never
        check_output_file(args.markdown, True, is_vitquant_markdown, "markdown table")
    added = run_sweep(spec, store, progress=not args.quiet)
    print(f"{added} new runs, {len(store.records)} in {args.store}")
    from vitquant import distributed

    if args.markdown and distributed.is_main():
        write_output_text(args.markdown, render_accuracy(store.records) + "\n")
        print(f"wrote {args.markdown}")
    return 0


def build_parser() -> argparse.ArgumentParser:
    p = Parser(prog="vitquant", description="Post-training quantization of Vision Transformers")
    sub = p.add_subparsers(dest="command", required=True)

    q = sub.add_parser("quantize", help="quantize a model and save it")
    q.add_argument("--model", default="bundled",
                   help="'bundled', a vitquant .safetensors model, a timm name, 'hf:<id or dir>', "
                        "'torchvision:<name>', or 'python:package.module:factory'")
    q.add_argument("--checkpoint", help="weights for a timm/torchvision model (.safetensors, or .pth loaded "
                                        "weights_only)")
    q.add_argument("--calib", default="bundled",
                   help="image folder, 'bundled' (MNIST-5k), 'data-free' (PSAQ-ViT images generated from the "
                        "model; saved as calibration_images.png) or 'gaussian' (noise baseline)")
    q.add_argument("--calib-size", type=int, default=32, help="calibration images (default 32)")
    q.add_argument("--min-calib", type=int, default=8, metavar="N",
                   help="refuse to calibrate on fewer than N readable images (default 8)")
    q.add_argument("--data-free-steps", type=int, metavar="N",
                   help="Adam steps per image batch for --calib data-free (default 300; PSAQ-ViT: 1000, "
                        "better calibration, ~3x the time; fewer than 300 can be worse than noise)")
    q.add_argument("--method", default="repq-vit", help="see `vitquant list`")
    q.add_argument("--bits", default="w8a8", help="wXaY preset, e.g. w8a8, w4a4")
    q.add_argument("--opt", action="append", default=[], metavar="KEY=VALUE", help="method option (repeatable)")
    q.add_argument("--seed", type=int, default=0)
    q.add_argument("--deployable", action="store_true",
                   help="only quantizers ONNX Runtime runs exactly, so what is evaluated is what is exported")
    q.add_argument("--keep-float", action="append", default=[], metavar="GLOB",
                   help="leave matching sites float (site names like 'blocks.0.attn.qkv.input', weights "
                        "'<layer>.weight', a layer name glob like 'head*', or 'role:post_softmax'); repeatable")
    q.add_argument("--site-bits", action="append", default=[], metavar="GLOB=N",
                   help="bits for matching sites, e.g. 'head*=8' or 'role:image=8'; repeatable, in order")
    q.add_argument("--unknown-layers", choices=("refuse", "float"), default="refuse",
                   help="a weighted op the core does not understand: refuse the model (default), or leave it "
                        "float and list it")
    q.add_argument("--allow-nonfinite", action="store_true",
                   help="quantize even when weights hold NaN/Inf (refused by default)")
    q.add_argument("--eval", metavar="DATA", help="also evaluate on DATA ('bundled' or an ImageFolder)")
    q.add_argument("--out", required=True, help="output directory (written atomically)")
    q.add_argument("--force", action="store_true",
                   help="replace an existing output directory, only if vitquant wrote it (and it holds nothing else)")
    add_device_argument(q)
    q.add_argument("--quiet", action="store_true", help="no progress bars")
    q.set_defaults(func=cmd_quantize)
    from vitquant.mixed.cli import add_arguments as add_mixed_arguments  # argparse only, no torch

    add_mixed_arguments(q)

    e = sub.add_parser("eval", help="evaluate a float model or a saved quantized model")
    e.add_argument("model", help="a saved quantized directory, 'bundled', a model file, an .onnx file, or a timm name")
    e.add_argument("--checkpoint")
    e.add_argument("--data", default="bundled", help="'bundled' or an ImageFolder directory")
    e.add_argument("--limit", type=int, help="evaluate on this many images only")
    e.add_argument("--float-reference", action="store_true", help="for hub models, download the float model too")
    e.add_argument("--float-checkpoint", metavar="PATH",
                   help="the float checkpoint of a saved quantized model, when it moved (checked by content hash)")
    e.add_argument("--allow-nonfinite", action="store_true", help="evaluate even when weights hold NaN/Inf")
    e.add_argument("--backend", choices=("pytorch", "onnxruntime"),
                   help="pytorch (simulation; the default) or onnxruntime (the default for an .onnx file; a "
                        "quantized dir is exported on the fly)")
    e.add_argument("--threads", type=int, help="onnxruntime intra-op threads (default: physical cores)")
    add_device_argument(e)
    e.add_argument("--quiet", action="store_true")
    e.set_defaults(func=cmd_eval)

    from vitquant.export.cli import add_cpu_parser, add_export_parser  # no onnx import until used

    add_export_parser(sub)
    add_cpu_parser(sub)
    from vitquant.analysis.cli import add_parser as add_analyze_parser

    add_analyze_parser(sub)

    ls = sub.add_parser("list", help="methods (with their cost), presets and bundled models")
    ls.set_defaults(func=cmd_list)

    b = sub.add_parser("bench", help="resumable sweep: models × methods × bits × seeds, appended to a store")
    b.add_argument("--models", default="bundled", help="comma-separated model names/files")
    b.add_argument("--methods", default="all",
                   help="comma-separated method names, or 'all'; options as name:key=value, e.g. "
                        "repq-vit:reparam_head=false (a separate row in the tables)")
    b.add_argument("--bits", default="w8a8,w6a6,w4a4,w3a3")
    b.add_argument("--seeds", default="0,1,2", help="calibration seeds")
    b.add_argument("--calib", default="bundled")
    b.add_argument("--data", default="bundled", help="evaluation data")
    b.add_argument("--no-stress", action="store_true", help="skip the outlier-stress variants")
    b.add_argument("--store", default="bench_runs.jsonl",
                   help="JSON-lines results store (resumed if present; several processes may share it)")
    b.add_argument("--markdown",
                   help="also write the accuracy tables to this file (replaced only if vitquant wrote it)")
    b.add_argument("--quiet", action="store_true")
    b.set_defaults(func=cmd_bench)

    d = sub.add_parser("demo", help="quantize the bundled model at several bit widths and print a table")
    d.add_argument("--method", default="repq-vit")
    d.add_argument("--bits", nargs="+", default=["w8a8", "w6a6", "w4a4"])
    d.add_argument("--quiet", action="store_true")
    d.set_defaults(func=cmd_demo)
    return p


def _one_line_warning(message, category, filename, lineno, line=None) -> str:
    return f"vitquant: warning: {' '.join(str(message).split())}\n"


def report_error(e: BaseException) -> int:
    """Print a user error as one line and return the exit code 2."""
    if isinstance(e, OSError) and not isinstance(e, VitquantError):
        where = f": '{e.filename}'" if e.filename else ""
        text = f"{e.strerror or e}{where}; check the path, its permissions and the free disk space"
    else:
        text = str(e)
    print(f"vitquant: error: {' '.join(text.split())}", file=sys.stderr)
    return 2


DISTRIBUTED_COMMANDS = ("quantize", "eval", "bench")


@contextmanager
def _launched(command: str, device: str | None) -> Iterator[None]:
    """Under `torchrun` (WORLD_SIZE > 1): join the process group for the commands that run data-parallel, and
    let only rank 0 print; refuse the others. A plain run is untouched (torch is not even imported)."""
    if int(os.environ.get("WORLD_SIZE", "1") or 1) <= 1:
        yield
        return
    if command not in DISTRIBUTED_COMMANDS:
        raise VitquantError(f"`vitquant {command}` does not run distributed; run it without torchrun (only "
                            f"{', '.join(DISTRIBUTED_COMMANDS)} do)")
    from vitquant import distributed

    distributed.init(device=device)
    if distributed.is_main():
        yield
    else:
        with open(os.devnull, "w") as quiet, redirect_stdout(quiet), warnings.catch_warnings():
            warnings.simplefilter("ignore")
            yield
    distributed.finish()


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    previous, warnings.formatwarning = warnings.formatwarning, _one_line_warning
    try:
        with _launched(args.command, getattr(args, "device", None)):
            return args.func(args)
    except (VitquantError, OSError) as e:  # OSError: a refusal the checks could not foresee (disk full)
        return report_error(e)
    except KeyboardInterrupt:
        print("vitquant: interrupted", file=sys.stderr)
        return 130
    finally:
        warnings.formatwarning = previous


if __name__ == "__main__":
    sys.exit(main())
