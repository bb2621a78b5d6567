"""Matplotlib figures of an `Analysis`, returned as PNG bytes (for embedding in the HTML report).

Agg backend only: no display is needed, and nothing global is changed for a caller that uses pyplot.
"""
from __future__ import annotations

import io
from typing import Any

KIND_COLORS = {"act": "#1f77b4", "weight": "#ff7f0e"}


def _figure(w: float, h: float, **margins: float):
    from matplotlib.figure import Figure  # no pyplot: no global state, no backend selection

    fig = Figure(figsize=(w, h), dpi=100)
    # fixed margins: a layout engine costs a second draw of ~80 tick labels per figure
    fig.subplots_adjust(**{"left": 0.07, "right": 0.98, "top": 0.9, "bottom": 0.12, **margins})
    return fig


def _png(fig) -> bytes:
    buf = io.BytesIO()
    fig.savefig(buf, format="png")
    return buf.getvalue()


def _short(point: str) -> str:
    return point.replace("blocks.", "b").replace(".attn.", ".").replace(".mlp.", ".")


def offenders_bar(a: Any, top: int = 20) -> bytes:
    """Measured KL of the worst points, one bar each (log scale), weights and activations coloured."""
    pts = a.offenders[:top][::-1]
    fig = _figure(8, max(2.5, 0.28 * len(pts) + 1), left=0.22, bottom=0.8 / max(2.5, 0.28 * len(pts) + 1))
    ax = fig.add_subplot()
    kl = [max(a.points[p].get("kl") or 0.0, 1e-9) for p in pts]
    ax.barh(range(len(pts)), kl, color=[KIND_COLORS[a.points[p]["kind"]] for p in pts])
    ax.set_yticks(range(len(pts)), [_short(p) for p in pts], fontsize=8)
    ax.set_xscale("log")
    ax.set_xlabel("KL(float ‖ only this point quantized), nats per image")
    ax.set_title("Top offenders (blue: activation site, orange: weight)")
    return _png(fig)


def _lines(pts: list[str], series: list[tuple[str, list[float], str]], ylabel: str, title: str) -> bytes:
    """One line per series over the points in forward order (None: a gap)."""
    fig = _figure(10, 3.6, bottom=0.3)
    ax = fig.add_subplot()
    for label, values, style in series:
        ax.plot(range(len(pts)), [float("nan") if v is None else v for v in values], style, ms=3, lw=1, label=label)
    ax.set_xticks(range(len(pts)), [_short(p) for p in pts], rotation=90, fontsize=5)
    ax.set_ylabel(ylabel)
    ax.legend(fontsize=8)
    ax.set_title(title)
    return _png(fig)


def sensitivity_map(a: Any) -> bytes:
    """Every point in forward order: measured KL, Fisher proxy and relevance, each normalized to its max."""
    pts = list(a.points)
    series = []
    for key, label, style in (("kl", "measured KL", "-o"), ("fisher", "Fisher proxy", "-s"),
                              ("relevance", "LRP relevance", ":")):
        v = [a.points[p].get(key) or 0.0 for p in pts]
        m = max(v) or 1.0
        series.append((label, [x / m for x in v], style))
    return _lines(pts, series, "share of the largest", "Sensitivity of every quantization point, in forward order")


def sqnr_plot(a: Any) -> bytes:
    keys = (("sqnr_isolated_db", "in isolation"), ("sqnr_context_db", "in context (all quantized)"))
    pts = [p for p in a.points if any(a.points[p].get(k) is not None for k, _ in keys)]
    return _lines(pts, [(label, [a.points[p].get(k) for p in pts], "-o") for k, label in keys], "SQNR (dB)",
                  "Quantization SQNR per point (weights: their layer's output)")


def spread_plot(a: Any) -> bytes:
    pts = [p for p in a.points if a.points[p]["kind"] == "act" and a.points[p].get("channel_spread")]
    fig = _figure(10, 3.4, bottom=0.32)
    ax = fig.add_subplot()
    v = [a.points[p]["channel_spread"] for p in pts]
    ax.bar(range(len(pts)), v, color=["#d62728" if x >= 10 else "#7f7f7f" for x in v])
    ax.set_yscale("log")
    ax.set_xticks(range(len(pts)), [_short(p) for p in pts], rotation=90, fontsize=5)
    ax.set_ylabel("max / median channel |x|")
    ax.set_title("Inter-channel spread of each activation site (red: ≥ 10×)")
    return _png(fig)


def point_detail(a: Any, point: str) -> bytes:
    """Histogram (log counts) with the quantizer's grid range, and the per-channel max |x|."""
    fig = _figure(9, 2.6, wspace=0.25, bottom=0.18)
    ax1, ax2 = fig.subplots(1, 2)
    h = a.histograms.get(point) or {"edges": [], "counts": []}
    if h["counts"]:
        edges = h["edges"]
        ax1.stairs(h["counts"], edges, fill=True, color="#1f77b4")
        ax1.set_yscale("log")
    for x in a.grids.get(point, []):
        ax1.axvline(x, color="#d62728", lw=1, ls="--")
    ax1.set_title(f"{_short(point)}: values (dashed: grid range)", fontsize=9)
    prof = a.channel_profiles.get(point, [])
    if prof:
        ax2.bar(range(len(prof)), prof, width=1.0, color="#7f7f7f")
        ax2.set_yscale("log")
        ax2.set_xlabel("channel")
    ax2.set_title("max |x| per channel", fontsize=9)
    return _png(fig)
