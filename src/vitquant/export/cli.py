"""Command line for deployment, usable as `python -m vitquant.export …` and meant to be mounted in the
main `vitquant` CLI (`add_subcommands(subparsers)`):

    vitquant export QDIR --format onnx --out model.onnx [--scheme auto] [--bias float] [--parity bundled]
    vitquant eval model.onnx --backend onnxruntime            (or a quantized directory: exported on the fly)
    vitquant cpu                                              (ISA, and the scheme export would pick)
"""
from __future__ import annotations

import sys
from pathlib import Path
from typing import Sequence

from vitquant.errors import VitquantError


def _quantized(path: str):
    import vitquant
    from vitquant.serialization import META

    if not (Path(path) / META).is_file():
        raise VitquantError(f"'{path}' is not a saved quantized model directory (no {META}); "
                            "run `vitquant quantize … --out DIR` first")
    return vitquant.load(path)


def _is_vitquant_onnx(path: Path) -> bool:
    """An .onnx file vitquant exported (its producer name), the only kind `--force` replaces."""
    try:
        import onnx

        return onnx.load(str(path), load_external_data=False).producer_name == "vitquant"
    except Exception:  # noqa: BLE001 - anything unreadable is not ours to overwrite
        return False


def cmd_export(args) -> int:
    from vitquant.calibration.data import check_source
    from vitquant.serialization import check_output_file, is_vitquant_markdown, write_output_text

    if args.format != "onnx":
        raise VitquantError(f"export format {args.format!r} is not supported; use --format onnx")
    if args.limit is not None and args.limit < 1:
        raise VitquantError(f"--limit must be a positive number of images, got {args.limit}")
    out = check_output_file(args.out, args.force, _is_vitquant_onnx, "ONNX file")
    if args.report:  # a report vitquant wrote is replaced; anything else never
        check_output_file(args.report, True, is_vitquant_markdown, "export report")
    if args.parity:
        check_source(args.parity, "evaluation")
    qmodel = _quantized(args.model)
    report = _export_atomically(qmodel, out, args)
    text = report.to_markdown()
    if args.parity:
        from vitquant.export.parity import check_parity

        par = check_parity(qmodel, args.parity, limit=args.limit, scheme=args.scheme, non_uniform=args.non_uniform,
                           bias=args.bias)
        text += "\n" + par.to_markdown()
    if args.report:
        write_output_text(args.report, text)
    print(text if not args.quiet else f"exported {args.model} -> {out}")
    return 0


def _export_atomically(qmodel, out: Path, args):
    """Export into a temporary sibling and rename it into place: a failed export leaves no half file and
    an existing one untouched."""
    import os
    import tempfile

    from vitquant.export.onnx_qdq import export

    try:
        out.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(prefix=f".{out.name}.tmp-", suffix=".onnx", dir=out.parent)
        os.close(fd)
    except OSError as e:
        raise VitquantError(f"cannot write the ONNX file '{out}': {e.strerror}") from None
    try:
        report = export(qmodel, tmp, scheme=args.scheme, non_uniform=args.non_uniform, bias=args.bias)
        os.replace(tmp, out)
    except OSError as e:
        raise VitquantError(f"could not write the ONNX file '{out}': {e.strerror or e}") from None
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)
    report.path = str(out)
    return report


def runtime_model(path: str, threads: int | None = None):
    """An OrtModel for a .onnx file, or for a quantized directory (exported to a temporary file)."""
    from vitquant.export.runtime import OrtModel

    if threads is not None and threads < 1:
        raise VitquantError(f"--threads must be at least 1, got {threads}")
    if path.endswith(".onnx") or Path(path).is_file():
        if not Path(path).is_file():
            raise VitquantError(f"ONNX model file '{path}' does not exist")
        try:
            model = OrtModel(path, threads)
        except VitquantError:
            raise
        except Exception as e:  # noqa: BLE001 - onnxruntime raises its own exception types for a bad file
            first = (str(e).strip().splitlines() or [type(e).__name__])[0][:200]
            raise VitquantError(f"'{path}' is not a loadable ONNX model ({first}): it is truncated or damaged; "
                                "export it again with `vitquant export`") from None
        names = [i.name for i in model.session.get_inputs()]
        if names != ["input"] or "logits" not in model.output_names:
            raise VitquantError(f"'{path}' was not exported by vitquant (inputs {names}, outputs "
                                f"{model.output_names}); evaluate a file written by `vitquant export`")
        return model
    from vitquant.export.onnx_qdq import export

    return OrtModel(export(_quantized(path)).model, threads)


def cmd_eval(args) -> int:
    import vitquant
    from vitquant.calibration.data import check_class_count, check_source

    if args.limit is not None and args.limit < 1:
        raise VitquantError(f"--limit must be a positive number of images, got {args.limit}")
    classes = check_source(args.data, "evaluation")
    model = runtime_model(args.model, args.threads)
    check_class_count(model, classes)
    res = vitquant.evaluate(model, args.data, limit=args.limit, progress=not args.quiet)
    print(f"{args.model} [onnxruntime, {model.scheme or 'float'}]: top-1 {res.top1:.2f}%  top-5 {res.top5:.2f}%  "
          f"on {res.source} ({res.n} images, {res.seconds:.1f} s)")
    return 0


def cmd_cpu(args) -> int:
    from vitquant.export.isa import choose_scheme, detect_cpu

    cpu = detect_cpu()
    print(cpu.summary())
    for bits in (8, 7):
        s = choose_scheme(cpu, bits)
        print(f"  {bits}-bit weights -> {s.name}: {s.reason}")
    return 0


def add_export_parser(sub) -> None:
    """`export` — the main CLI mounts this as `vitquant export`."""
    e = sub.add_parser("export", help="export a saved quantized model to ONNX (QDQ) for ONNX Runtime")
    e.add_argument("model", help="a saved quantized model directory")
    e.add_argument("--format", default="onnx", help="only 'onnx'")
    e.add_argument("--out", required=True, help="the .onnx file to write")
    e.add_argument("--scheme", default="auto", choices=("auto", "u8s8", "u8u8", "u8s8-w7"),
                   help="auto (ISA-aware), u8s8, u8u8 or u8s8-w7")
    e.add_argument("--non-uniform", default="uniform8", choices=("uniform8", "float"),
                   help="how quantizers without a QDQ form (log2, log√2, twin-uniform…) are exported")
    e.add_argument("--bias", default="float", choices=("float", "int32"),
                   help="float (default, bit-exact with the simulation) or int32 (inside the integer GEMM)")
    e.add_argument("--parity", metavar="DATA", help="also compare simulation and ONNX Runtime on DATA")
    e.add_argument("--limit", type=int, default=500, help="images for --parity (default 500)")
    e.add_argument("--report", help="write the export (and parity) report as markdown here (replaced only if "
                                    "vitquant wrote it)")
    e.add_argument("--force", action="store_true", help="replace an existing .onnx file, only if vitquant wrote it")
    e.add_argument("--quiet", action="store_true")
    e.set_defaults(func=cmd_export)


def add_cpu_parser(sub) -> None:
    c = sub.add_parser("cpu", help="this CPU's integer ISA and the scheme export picks")
    c.set_defaults(func=cmd_cpu)


def add_subcommands(sub) -> None:
    """export, eval (ONNX Runtime only) and cpu: what `python -m vitquant.export` offers."""
    add_export_parser(sub)
    add_cpu_parser(sub)
    v = sub.add_parser("eval", help="evaluate an .onnx model (or a quantized directory) in ONNX Runtime")
    v.add_argument("model")
    v.add_argument("--data", default="bundled")
    v.add_argument("--limit", type=int)
    v.add_argument("--threads", type=int, help="intra-op threads (default: physical cores)")
    v.add_argument("--quiet", action="store_true")
    v.set_defaults(func=cmd_eval)


def main(argv: Sequence[str] | None = None) -> int:
    from vitquant.cli import Parser, report_error

    p = Parser(prog="python -m vitquant.export", description="ONNX export and ONNX Runtime")
    add_subcommands(p.add_subparsers(dest="command", required=True))
    args = p.parse_args(argv)
    try:
        return args.func(args)
    except (VitquantError, OSError) as e:
        return report_error(e)


if __name__ == "__main__":
    sys.exit(main())
