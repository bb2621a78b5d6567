"""Markdown accuracy tables from a sweep's results store (see vitquant.bench)."""
from __future__ import annotations

from typing import Any

from vitquant.bench import summarize
from vitquant.report.table import format_table

BITS_ORDER = ["W8A8", "W6A6", "W4A8", "W4A4", "W3A3"]


def _cell(s: dict[str, Any] | None) -> str:
    if s is None:
        return "–"
    if s["n"] == 1:
        return f"{s['top1']:.2f}"
    return f"{s['top1']:.2f} ({s['min']:.1f}–{s['max']:.1f})"


def render_accuracy(records: list[dict[str, Any]], method_order: list[str] | None = None) -> str:
    summary = summarize(records)
    models = list(dict.fromkeys((r["model"], r["variant"]) for r in records))
    bits = [b for b in BITS_ORDER if any(k[3] == b for k in summary)]
    out = []
    for model, variant in models:
        methods = [m for m in dict.fromkeys(k[2] for k in summary if k[:2] == (model, variant)) if m != "float"]
        if method_order:
            methods = [m for m in method_order if m in methods] + [m for m in methods if m not in method_order]
        flt = summary.get((model, variant, "float", "FP32"))
        seeds = max((summary[k]["n"] for k in summary if k[:2] == (model, variant)), default=1)
        out.append(f"### {model} — {variant}" + (f" (float top-1 {flt['top1']:.2f})" if flt else ""))
        out.append("")
        out.append(f"Top-1 % on the MNIST-5k test split (1000 images); mean over {seeds} calibration seeds "
                   "with (min–max) when more than one.")
        out.append("")
        rows = [["float (FP32)", *[f"{flt['top1']:.2f}" if flt else "–" for _ in bits]]]
        rows += [[m, *[_cell(summary.get((model, variant, m, b))) for b in bits]] for m in methods]
        out.append(format_table(["method", *bits], rows))
        out.append("")
        out.append("Calibration wall time (s, mean over seeds) / peak resident memory of the benchmark process "
                   "during that calibration (MB, max over seeds; it includes PyTorch itself, ~1 GB, and memory "
                   "kept by earlier runs, so it is an upper bound):")
        out.append("")
        cost = []
        for m in methods:
            cells = []
            for b in bits:
                s = summary.get((model, variant, m, b))
                cells.append("–" if s is None else f"{s['calib_seconds']:.1f} s / {s['peak_rss_mb']:.0f} MB")
            cost.append([m, *cells])
        out.append(format_table(["method", *bits], cost))
        out.append("")
    return "\n".join(out)
