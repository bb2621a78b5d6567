"""`vitquant quantize --avg-bits B | --size-mb N | --max-drop D`: the mixed-precision flags.

`add_arguments` adds them to the quantize parser; `request(args)` checks them (cheaply, before any model
is loaded) and returns None when none is given; `MixedRequest.run` turns the config into the per-point
one before the final calibration, and `summary_lines` says what it chose.
"""
from __future__ import annotations

import argparse
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from vitquant.errors import VitquantError

CRITERIA = ("fisher", "mptq", "lrp")  # as mixed.allocate.CRITERIA, without importing numpy for --help


def add_arguments(q: argparse.ArgumentParser) -> None:
    g = q.add_argument_group("mixed precision and accuracy target")
    g.add_argument("--avg-bits", type=float, metavar="B",
                   help="choose bits per site under this average (weights 3/4/6/8/float, activations 4/6/8/float, "
                        "each averaged by size, float counted as 32), e.g. 4.5")
    g.add_argument("--size-mb", type=float, metavar="N",
                   help="choose weight bits so the deployed model is at most N MB (10^6 bytes)")
    g.add_argument("--criterion", choices=CRITERIA, default="fisher",
                   help="allocation: fisher (Hessian/Fisher knapsack, default), mptq (MPTQ-ViT-style greedy on "
                        "measured loss), lrp (LRP-QViT-style relevance × noise)")
    g.add_argument("--probe-method", metavar="METHOD",
                   help="measure sensitivities with this (cheaper) method, e.g. repq-vit for adalog "
                        "(default: --method)")
    g.add_argument("--max-drop", type=float, metavar="D",
                   help="raise the most sensitive sites (8 bits, then float) until top-1 on held-out images "
                        "drops at most D points from float")
    g.add_argument("--holdout", metavar="DATA",
                   help="labelled held-out images for --max-drop, never the calibration images (default with "
                        "--calib bundled: the bundled test split); even positions steer, odd ones report")


@dataclass
class MixedRequest:
    avg_bits: float | None
    size_mb: float | None
    criterion: str
    probe: str | None
    max_drop: float | None
    holdout: str | None

    def run(self, model, config, calib, progress: bool = True) -> tuple[Any, dict[str, Any], Any]:
        """(the config to calibrate with, facts for quant_config.json, the quantized model or None)."""
        from vitquant.calibration.data import data_config_for, load_labeled
        from vitquant.config import QuantConfig, parse_method_spec
        from vitquant.models import prepare
        from vitquant.plan import pinned_points

        extra: dict[str, Any] = {}
        keep = pinned_points(config, prepare(model).structure)
        if self.avg_bits is not None or self.size_mb is not None:
            from vitquant.mixed.allocate import allocate
            from vitquant.mixed.budget import Budget
            from vitquant.mixed.tables import build_table

            probe = None
            if self.probe:
                name, options = parse_method_spec(self.probe)
                probe = QuantConfig(**{**config.to_dict(), "method": name, "options": options})
            if progress:
                print("measuring each site's sensitivity at 3/4/6/8 bits …", flush=True)
            # measured KL (a forward per site and width) is what mptq ranks by; the others need one pass
            table = build_table(model, config, calib, probe=probe, measured=self.criterion == "mptq")
            alloc = allocate(table, Budget(self.avg_bits, self.size_mb), self.criterion)
            config = alloc.config(config)
            extra["mixed_precision"] = {**alloc.to_dict(), "table_seconds": table.seconds, "notes": table.notes,
                                        "table": table.to_dict()}  # why: every point's cost at every width
        qmodel = None
        if self.max_drop is not None:
            from vitquant.mixed.target import meet_target

            holdout = load_labeled(self.holdout, data_config_for(model, tuple(calib.images.shape[1:])))
            if progress:
                print(f"accuracy target: top-1 drop ≤ {self.max_drop:g} on {holdout.source} …", flush=True)
            result = meet_target(model, config, calib, holdout, self.max_drop, keep=keep, progress=progress)
            config, qmodel = result.config, result.qmodel
            extra["accuracy_target"] = result.to_dict()
        return config, extra, qmodel


def request(args) -> MixedRequest | None:
    """The flags, checked; None when no mixed-precision flag is given."""
    asked = [f for f, v in (("--avg-bits", args.avg_bits), ("--size-mb", args.size_mb),
                            ("--max-drop", args.max_drop)) if v is not None]
    if not asked:
        for flag, value, default in (("--holdout", args.holdout, None), ("--probe-method", args.probe_method, None),
                                     ("--criterion", args.criterion, "fisher")):
            if value != default:
                raise VitquantError(f"{flag} applies only with --avg-bits, --size-mb or --max-drop")
        return None
    if args.calib in ("data-free", "gaussian"):
        raise VitquantError(f"{' and '.join(asked)} need real calibration images (--calib DATA), not {args.calib!r}")
    if args.avg_bits is not None or args.size_mb is not None:
        from vitquant.mixed.budget import Budget

        Budget(args.avg_bits, args.size_mb)  # its errors name the value
    elif args.probe_method or args.criterion != "fisher":
        raise VitquantError("--criterion and --probe-method apply to --avg-bits / --size-mb")
    if args.probe_method:
        from vitquant.config import QuantConfig, parse_method_spec

        name, options = parse_method_spec(args.probe_method)
        QuantConfig(method=name, options=options)
    holdout = None
    if args.max_drop is not None:
        if not 0 <= args.max_drop < 100:
            raise VitquantError(f"--max-drop must be a number of top-1 points in [0, 100), got {args.max_drop:g}")
        holdout = args.holdout or ("bundled" if args.calib == "bundled" else None)
        if holdout is None:
            raise VitquantError("--max-drop needs labelled held-out images: pass --holdout DATA (an ImageFolder "
                                "that is not the calibration folder)")
        if holdout != "bundled" and args.calib != "bundled" and Path(holdout).resolve() == Path(args.calib).resolve():
            raise VitquantError(f"--holdout '{holdout}' is the calibration folder; the accuracy target must be "
                                "measured on images the calibration never saw")
        from vitquant.calibration.data import check_source

        check_source(holdout, "evaluation")
    elif args.holdout:
        raise VitquantError("--holdout applies only with --max-drop")
    return MixedRequest(args.avg_bits, args.size_mb, args.criterion, args.probe_method, args.max_drop, holdout)


def summary_lines(extra: dict[str, Any]) -> list[str]:
    lines = []
    if "mixed_precision" in extra:
        m = extra["mixed_precision"]
        counts = ", ".join(f"{k}×{v}" for k, v in m["counts"].items())
        lines.append(f"mixed precision ({m['criterion']}, budget {_budget(m['budget'])}): weights "
                     f"W{m['avg_weight_bits']:.2f}, activations A{m['avg_act_bits']:.2f} ({counts}); planned size "
                     f"{m['size_bytes'] / 1e6:.3f} MB; sensitivities by {m['probe']} in {m['table_seconds']:.0f} s")
    if "accuracy_target" in extra:
        t = extra["accuracy_target"]
        last = t["final"]
        raised = sum(1 for b in t["changes"].values() if b != "float")
        floated = len(t["changes"]) - raised
        rep = t["report"]
        lines.append(f"accuracy target (drop ≤ {t['max_drop']:g}): {'met' if t['met_on_validation'] else 'MISSED'} "
                     f"after {len(t['path'])} trials — {raised} sites raised to 8 bits, {floated} kept float; "
                     f"validation drop {last['drop']:.2f}; reporting half: top-1 {rep['top1']:.2f} "
                     f"(float {rep['float_top1']:.2f}, drop {rep['drop']:.2f}); size {last['size_bytes'] / 1e6:.3f} MB")
    return lines


def _budget(b: dict[str, Any]) -> str:
    return ", ".join(x for x in (f"avg {b['avg_bits']:g} bits" if b.get("avg_bits") else "",
                                 f"≤ {b['size_mb']:g} MB" if b.get("size_mb") else "") if x)
