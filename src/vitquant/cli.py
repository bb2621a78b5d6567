"""`vitquant` command line: a thin layer over the API. Every user error is one line on stderr, exit 2."""
from __future__ import annotations

import argparse
import sys
import tempfile
from pathlib import Path
from typing import Any, Sequence

from vitquant.errors import VitquantError

PRESETS = ("w8a8", "w6a6", "w4a8", "w4a4", "w3a3")


def _config(args) -> "QuantConfig":
    from vitquant.config import QuantConfig, parse_bits, parse_options, parse_site_bits

    w, a = parse_bits(args.bits)
    return QuantConfig(method=args.method, w_bits=w, a_bits=a, calib_size=args.calib_size, seed=args.seed,
                       options=parse_options(args.opt), deployable=args.deployable,
                       site_bits=parse_site_bits(args.site_bits), keep_float=list(args.keep_float),
                       unknown_layers=args.unknown_layers)


def _architecture_check(config):
    """Run the core's structure check (and the plan's pattern check) on the randomly initialized model,
    before any weight is downloaded or any image decoded."""
    from vitquant.methods import get_method
    from vitquant.models import prepare
    from vitquant.plan import SitePlan

    def check(model):
        method = get_method(config.method)()
        qmodel = prepare(model, extra_sites=method.requires_sites, unknown=config.unknown_layers)
        method.check(qmodel.structure)
        SitePlan.resolve(config, qmodel.structure)

    return check


def _is_quantized_dir(path: str) -> bool:
    from vitquant.serialization import META

    return (Path(path) / META).is_file()


def cmd_quantize(args) -> int:
    import vitquant

    config = _config(args)  # validate everything cheap before loading anything
    out = Path(args.out)
    if out.exists() and not args.force:
        raise VitquantError(f"output directory '{out}' already exists; pass --force to replace it")
    if args.data_free_steps is not None and args.calib != "data-free":
        raise VitquantError("--data-free-steps only applies to --calib data-free")
    model = vitquant.load_model(args.model, args.checkpoint, check=_architecture_check(config))
    calib, files = args.calib, {}
    with tempfile.TemporaryDirectory() as tmp:
        if calib == "data-free":  # keep what the model "dreamed" beside the result
            from vitquant.calibration.datafree import DataFreeConfig

            files["calibration_images.png"] = Path(tmp) / "calibration_images.png"
            steps = {} if args.data_free_steps is None else {"steps": args.data_free_steps}
            calib = DataFreeConfig(n_images=config.calib_size, seed=config.seed,
                                   grid_path=str(files["calibration_images.png"]), **steps)
        qmodel = vitquant.quantize(model, config, calib, progress=not args.quiet)
        if files:
            qmodel.stats["calibration_grid"] = "calibration_images.png"  # inside the output directory
        extra = _evaluate_for_report(args, qmodel, model)
        vitquant.save(qmodel, out, force=args.force, extra=extra, extra_files=files)
    s = qmodel.stats
    print(f"quantized {args.model} with {config.method} {config.bits_name} on {s['calibration_source']} "
          f"in {s['calibration_seconds']:.1f} s -> {out}")
    for what, items in (("kept float by the plan", s.get("float_sites", [])),
                        ("left float (not understood or constant)", s.get("float_ops", []))):
        if items:
            shown = ", ".join(items[:6]) + (f" and {len(items) - 6} more" if len(items) > 6 else "")
            print(f"{what}: {shown}")
    if files:
        print(f"generated calibration images: {out / 'calibration_images.png'}")
    if extra:
        e = extra["evaluation"]
        print(f"top-1 {e['top1']:.2f}% (float {e['float_top1']:.2f}%), agreement with float {e['agreement']:.2f}%")
    return 0


def _evaluate_for_report(args, qmodel, model) -> dict:
    import vitquant

    extra = {}
    if args.eval:
        res = vitquant.evaluate(qmodel, args.eval, float_model=model, progress=not args.quiet)
        flt = vitquant.evaluate(model, args.eval, progress=not args.quiet)
        extra["evaluation"] = {"data": res.source, "float_top1": flt.top1, "top1": res.top1, "top5": res.top5,
                               "agreement": res.agreement}
    return extra


def _float_reference(qmodel, hub: bool):
    """The float original of a saved quantized model, when it can be had without guessing."""
    import vitquant

    src = qmodel.source or {}
    if src.get("name") == "bundled":
        return vitquant.load_model("bundled")
    if src.get("type") == "timm" and (src.get("weights") or hub):
        return vitquant.load_model(src["name"], src.get("weights"))
    if src.get("weights"):
        return vitquant.load_model(src["weights"])
    return None


def cmd_eval(args) -> int:
    import vitquant

    if args.backend == "onnxruntime":
        from vitquant.export.cli import cmd_eval as cmd_eval_ort

        return cmd_eval_ort(args)
    if _is_quantized_dir(args.model):
        model = vitquant.load(args.model)
        float_model = _float_reference(model, args.float_reference)
    else:
        model, float_model = vitquant.load_model(args.model, args.checkpoint), None
    res = vitquant.evaluate(model, args.data, float_model=float_model, limit=args.limit, progress=not args.quiet)
    line = f"{args.model}: top-1 {res.top1:.2f}%  top-5 {res.top5:.2f}%  on {res.source}"
    if res.agreement is not None:
        line += f"  agreement with float {res.agreement:.2f}%"
    print(line)
    return 0


def cmd_list(args) -> int:
    from vitquant.methods import available_methods
    from vitquant.models.loading import BUNDLED

    print("methods:")
    for name, cls in available_methods().items():
        print(f"  {name:<12} {cls.summary}")
    print("bit presets: " + ", ".join(PRESETS) + " (any wXaY with 2 ≤ X, Y ≤ 8)")
    print("bundled models: " + ", ".join(BUNDLED))
    return 0


def cmd_demo(args) -> int:
    from vitquant.demo import run_demo

    run_demo(method=args.method, presets=args.bits, progress=not args.quiet)
    return 0


def cmd_bench(args) -> int:
    from vitquant.bench import ResultsStore, SweepSpec, run_sweep
    from vitquant.report.accuracy import render_accuracy

    split = lambda v: [x.strip() for x in v.split(",") if x.strip()]  # noqa: E731
    spec = SweepSpec(models=split(args.models), methods=split(args.methods), bits=split(args.bits),
                     seeds=[int(x) for x in split(args.seeds)], stress=not args.no_stress, calib=args.calib,
                     eval_data=args.data)
    store = ResultsStore(args.store)
    before = len(store.records)
    run_sweep(spec, store, progress=not args.quiet)
    print(f"{len(store.records) - before} new runs, {len(store.records)} in {args.store}")
    if args.markdown:
        Path(args.markdown).write_text(render_accuracy(store.records) + "\n")
        print(f"wrote {args.markdown}")
    return 0


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="vitquant", description="Post-training quantization of Vision Transformers")
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
    q.add_argument("--eval", metavar="DATA", help="also evaluate on DATA ('bundled' or an ImageFolder)")
    q.add_argument("--out", required=True, help="output directory (written atomically)")
    q.add_argument("--force", action="store_true", help="replace an existing output directory")
    q.add_argument("--quiet", action="store_true", help="no progress bars")
    q.set_defaults(func=cmd_quantize)

    e = sub.add_parser("eval", help="evaluate a float model or a saved quantized model")
    e.add_argument("model", help="a saved quantized directory, 'bundled', a model file, or a timm name")
    e.add_argument("--checkpoint")
    e.add_argument("--data", default="bundled", help="'bundled' or an ImageFolder directory")
    e.add_argument("--limit", type=int, help="evaluate on this many images only")
    e.add_argument("--float-reference", action="store_true", help="for timm-hub models, load the float model too")
    e.add_argument("--backend", default="pytorch", choices=("pytorch", "onnxruntime"),
                   help="pytorch (simulation) or onnxruntime (an .onnx file or a quantized dir, exported on the fly)")
    e.add_argument("--threads", type=int, help="onnxruntime intra-op threads (default: physical cores)")
    e.add_argument("--quiet", action="store_true")
    e.set_defaults(func=cmd_eval)

    from vitquant.export.cli import add_cpu_parser, add_export_parser  # no onnx import until used

    add_export_parser(sub)
    add_cpu_parser(sub)

    ls = sub.add_parser("list", help="methods, presets and bundled models")
    ls.set_defaults(func=cmd_list)

    b = sub.add_parser("bench", help="resumable sweep: models × methods × bits × seeds, appended to a store")
    b.add_argument("--models", default="bundled", help="comma-separated model names/files")
    b.add_argument("--methods", default="all",
                   help="comma-separated method names, or 'all'; options as name:key=value, e.g. "
                        "repq-vit:reparam_head=true (a separate row in the tables)")
    b.add_argument("--bits", default="w8a8,w6a6,w4a4,w3a3")
    b.add_argument("--seeds", default="0,1,2", help="calibration seeds")
    b.add_argument("--calib", default="bundled")
    b.add_argument("--data", default="bundled", help="evaluation data")
    b.add_argument("--no-stress", action="store_true", help="skip the outlier-stress variants")
    b.add_argument("--store", default="bench_runs.jsonl", help="JSON-lines results store (resumed if present)")
    b.add_argument("--markdown", help="also write the accuracy tables to this file")
    b.add_argument("--quiet", action="store_true")
    b.set_defaults(func=cmd_bench)

    d = sub.add_parser("demo", help="quantize the bundled model at several bit widths and print a table")
    d.add_argument("--method", default="repq-vit")
    d.add_argument("--bits", nargs="+", default=["w8a8", "w6a6", "w4a4"])
    d.add_argument("--quiet", action="store_true")
    d.set_defaults(func=cmd_demo)
    return p


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return args.func(args)
    except VitquantError as e:
        print(f"vitquant: error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("vitquant: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
