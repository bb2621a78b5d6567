"""Markdown accuracy tables from a sweep's results store (see vitquant.bench).

`paper(model, variant, method, bits)` (optional) gives a published top-1 for a cell (method "float", bits "FP32"
for the float model) or None: each bit width a model has published numbers for gets a "paper" column beside it.
"""
from __future__ import annotations

from typing import Any, Callable

from vitquant.bench import summarize
from vitquant.report.table import format_table

Paper = Callable[[str, str, str, str], "float | None"]
MNIST_NOTE = "Top-1 % on the MNIST-5k test split (1000 images)"

BITS_ORDER = ["W8A8", "W6A6", "W4A8", "W4A4", "W3A3"]


def _cell(s: dict[str, Any] | None) -> str:
    if s is None:
        return "–"
    if "refused" in s:
        return "refused"
    if s["n"] == 1:
        return f"{s['top1']:.2f}"
    return f"{s['top1']:.2f} ({s['min']:.1f}–{s['max']:.1f})"


def _ordered(methods: list[str], order: list[str] | None) -> list[str]:
    """`methods` with those named in `order` first, in that order; the rest as they came."""
    if not order:
        return methods
    return [m for m in order if m in methods] + [m for m in methods if m not in order]


def _paper_cell(paper: Paper | None, model: str, variant: str, method: str, bits: str, digits: int = 2) -> str:
    value = None if paper is None else paper(model, variant, method, "FP32" if method == "float" else bits)
    return "–" if value is None else f"{value:.{digits}f}"


def _has_paper(paper: Paper | None, model: str, variant: str, methods: list[str], bits: str) -> bool:
    return paper is not None and any(_paper_cell(paper, model, variant, m, bits) != "–" for m in ["float", *methods])


def render_accuracy(records: list[dict[str, Any]], method_order: list[str] | None = None,
                    labels: dict[str, str] | None = None, data_note: str = MNIST_NOTE,
                    paper: Paper | None = None) -> str:
    """One section per (model, variant); `labels` maps a stored model id (e.g. a path) to its display name;
    `data_note` says what top-1 was measured on; `paper`: see the module docstring."""
    labels = labels or {}
    summary = summarize(records)
    models = list(dict.fromkeys((r["model"], r["variant"]) for r in records))
    bits = [b for b in BITS_ORDER if any(k[3] == b for k in summary)]
    out = []
    for model, variant in models:
        methods = [m for m in dict.fromkeys(k[2] for k in summary if k[:2] == (model, variant)) if m != "float"]
        methods = _ordered(methods, method_order)
        flt = summary.get((model, variant, "float", "FP32"))
        seeds = max((summary[k]["n"] for k in summary if k[:2] == (model, variant)), default=1)
        out.append(f"### {labels.get(model, model)} — {variant}" + (f" (float top-1 {flt['top1']:.2f})" if flt else ""))
        out.append("")
        out.append(f"{data_note}; mean over {seeds} calibration seeds with (min–max) when more than one.")
        out.append("")
        cols = [c for b in bits for c in [(b, False)] + [(b, True)] * _has_paper(paper, model, variant, methods, b)]

        def row(label: str, method: str, ours: Callable[[str], str]) -> list[str]:
            return [label, *[_paper_cell(paper, model, variant, method, b) if is_paper else ours(b)
                             for b, is_paper in cols]]

        rows = [row("float (FP32)", "float", lambda b: f"{flt['top1']:.2f}" if flt else "–")]
        rows += [row(m, m, lambda b, m=m: _cell(summary.get((model, variant, m, b)))) for m in methods]
        out.append(format_table(["method", *[f"{b} paper" if is_paper else b for b, is_paper in cols]], rows))
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
                cells.append("–" if s is None or "refused" in s else
                             f"{s['calib_seconds']:.1f} s / {s['peak_rss_mb']:.0f} MB")
            cost.append([m, *cells])
        out.append(format_table(["method", *bits], cost))
        out.append("")
    return "\n".join(out)


def render_summary(records: list[dict[str, Any]], bits: tuple[str, ...] = ("W4A4", "W3A3"),
                   method_order: list[str] | None = None, labels: dict[str, str] | None = None,
                   paper: Paper | None = None) -> str:
    """One row per method, one column per (model, variant, bits): the low-bit results side by side,
    methods sorted by their mean top-1 over those columns (best first; the paper columns are not averaged)."""
    labels = labels or {}
    summary = {k: v for k, v in summarize(records).items() if "refused" not in v}  # refusals: per-model tables
    models = list(dict.fromkeys((r["model"], r["variant"]) for r in records))
    cols = [(m, v, b) for m, v in models for b in bits if any(k[:2] == (m, v) and k[3] == b for k in summary)]
    methods = _ordered([m for m in dict.fromkeys(k[2] for k in summary) if m != "float"], method_order)

    def score(method: str) -> float:
        vals = [summary[(m, v, method, b)]["top1"] for m, v, b in cols if (m, v, method, b) in summary]
        return sum(vals) / len(vals) if vals else float("-inf")

    methods = sorted((m for m in methods if score(m) > float("-inf")), key=score, reverse=True)  # rows with a value
    shown = [(c, is_paper) for c in cols
             for is_paper in [False] + [True] * _has_paper(paper, c[0], c[1], methods, c[2])]
    # short headers: the model label, "stress" for a stress variant, the bit width
    header = ["method", *[" ".join([labels.get(m, m), *([] if v == "natural" else [v.split()[0]]), b,
                                    *(["paper"] if is_paper else [])]) for (m, v, b), is_paper in shown], "mean"]

    def ours(m: str, v: str, method: str, b: str) -> str:
        s = summary.get((m, v, method, b))
        return f"{s['top1']:.1f}" if s else "–"

    rows = [["float (FP32)", *[_paper_cell(paper, m, v, "float", b, 1) if is_paper else ours(m, v, "float", "FP32")
                               for (m, v, b), is_paper in shown], ""]]
    for method in methods:
        rows.append([method, *[_paper_cell(paper, m, v, method, b, 1) if is_paper else ours(m, v, method, b)
                               for (m, v, b), is_paper in shown], f"{score(method):.1f}"])
    return format_table(header, rows)
