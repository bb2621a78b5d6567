"""`vitquant analyze`: the per-site sensitivity report of a model under a config, written atomically to
a directory (report.html, summary.md, analysis.json, and the `.vitquant-output` marker), with every
cheap check (arguments, paths, what --force would replace, the architecture) before the work."""
from __future__ import annotations

import argparse

from vitquant.errors import VitquantError


def add_parser(sub) -> None:
    a = sub.add_parser("analyze", help="where quantization hurts: per-site sensitivity report (HTML, markdown, JSON)")
    a.add_argument("--model", default="bundled",
                   help="'bundled', a vitquant .safetensors model, a timm name, 'hf:<id or dir>', 'torchvision:<name>' "
                        "or 'python:package.module:factory'")
    a.add_argument("--checkpoint", help="weights for a timm/torchvision model")
    a.add_argument("--stress", action="store_true",
                   help="analyze the outlier-stress variant (6 channels ×30 in every norm → layers mapping, "
                        "function-preserving: a known ground truth)")
    a.add_argument("--method", default="repq-vit", help="see `vitquant list`")
    a.add_argument("--bits", default="w4a4", help="wXaY preset (default w4a4)")
    a.add_argument("--opt", action="append", default=[], metavar="KEY=VALUE", help="method option (repeatable)")
    a.add_argument("--site-bits", action="append", default=[], metavar="GLOB=N", help="as for quantize")
    a.add_argument("--keep-float", action="append", default=[], metavar="GLOB", help="as for quantize")
    a.add_argument("--unknown-layers", choices=("refuse", "float"), default="refuse")
    a.add_argument("--calib", default="bundled", help="calibration (and analysis) images: a folder or 'bundled'")
    a.add_argument("--calib-size", type=int, default=32, help="images (default 32)")
    a.add_argument("--min-calib", type=int, default=8, metavar="N")
    a.add_argument("--seed", type=int, default=0)
    a.add_argument("--eval", metavar="DATA",
                   help="also report top-1 of both models on DATA ('bundled' or an ImageFolder)")
    a.add_argument("--allow-nonfinite", action="store_true")
    a.add_argument("--out", required=True, help="output directory (written atomically)")
    a.add_argument("--force", action="store_true", help="replace an output directory vitquant wrote")
    from vitquant.cli import add_device_argument

    add_device_argument(a)
    a.add_argument("--quiet", action="store_true")
    a.set_defaults(func=cmd_analyze, deployable=False)


def cmd_analyze(args: argparse.Namespace) -> int:
    import vitquant
    from vitquant.calibration.data import check_source, data_config_for, load_calibration
    from vitquant.cli import (_architecture_check, _config, _min_calib, fail_fast_offline, refuse_nonfinite,
                              resolve_device)
    from vitquant.serialization import atomic_dir, check_output_dir

    config = _config(args)
    device = resolve_device(args.device)
    _min_calib(args)
    if args.calib in ("data-free", "gaussian"):
        raise VitquantError("analyze needs real calibration images (--calib DATA or 'bundled')")
    out = check_output_dir(args.out, args.force)
    check_source(args.calib, "calibration", min_images=args.min_calib)
    if args.eval:
        check_source(args.eval, "evaluation")
    fail_fast_offline(args.model, args.checkpoint)
    found: dict = {}
    model = vitquant.load_model(args.model, args.checkpoint, check=_architecture_check(config, found))
    if not args.allow_nonfinite:
        refuse_nonfinite(model, f"model {args.model!r}")
    from pathlib import Path

    name = Path(args.model).name if Path(args.model).is_file() else args.model  # a file: its name, not its path
    if args.stress:
        from vitquant.bench import STRESS
        from vitquant.models.outliers import inject_ln_outliers

        model = inject_ln_outliers(model, **STRESS)
        name += f" (stress S={STRESS['factor']:g})"
    model = model.to(device)  # calibration and every measurement compute where the model is
    from vitquant.analysis.analyzer import analyze
    from vitquant.report.html import write_analysis

    calib = load_calibration(args.calib, data_config_for(model, found.get("input_shape")), n=config.calib_size,
                             seed=config.seed, min_images=args.min_calib)
    if not args.quiet:
        print(f"analyzing {name} with {config.method} {config.bits_name} on {calib.source} …", flush=True)
    analysis = analyze(model, config, calib, name=name, eval_data=args.eval, progress=not args.quiet)
    with atomic_dir(out, args.force) as tmp:
        write_analysis(analysis, tmp)
    o = analysis.overall
    acc = f"; top-1 {o['top1']:.2f}% (float {o['float_top1']:.2f}%)" if "top1" in o else ""
    print(f"{name}, {config.method} {config.bits_name}: fully quantized KL {o['kl']:.3g} nats, top-1 agreement "
          f"{o['agreement']:.1f}% on the analysis images{acc}")
    print("top offenders (KL with only that site quantized):")
    for p in analysis.offenders[:5]:
        r = analysis.points[p]
        spread = f"  channel spread {r['channel_spread']:.0f}×" if r.get("channel_spread") else ""
        print(f"  {p:<32} {r['kind']:<6} {r['bits']}-bit  KL {r['kl']:.3g}  "
              f"SQNR {r.get('sqnr_isolated_db') or 0:.1f} dB{spread}")
    print(f"report: {out / 'report.html'} (summary.md, analysis.json beside it)")
    return 0
