"""The analysis report: one self-contained HTML file (PNGs embedded as data URIs, inline CSS, no script,
nothing fetched), a markdown summary, and the JSON of every number (`write_analysis`)."""
from __future__ import annotations

import base64
import html
import json
from pathlib import Path
from typing import Any

from vitquant.report import plots
from vitquant.report.table import format_table

DETAILS = 6  # offenders shown with their histogram and channel profile

_CSS = """
body{font-family:system-ui,-apple-system,Segoe UI,Roboto,sans-serif;margin:2em auto;max-width:1100px;color:#222;
line-height:1.4;padding:0 1em;background:#fff}
h1{font-size:1.6em}h2{margin-top:1.6em;border-bottom:1px solid #ddd}
table{border-collapse:collapse;font-size:.85em;margin:.5em 0}
th,td{border:1px solid #ccc;padding:.2em .5em;text-align:right}th{background:#f3f3f3}
td:first-child,th:first-child{text-align:left}td.name{text-align:left;font-family:monospace}
img{max-width:100%;border:1px solid #eee;margin:.4em 0}.note{color:#555;font-size:.9em}
tr.bad td{background:#fde8e8}
"""


def _fmt(v: Any, digits: int = 3) -> str:
    if v is None:
        return "–"
    if isinstance(v, bool):
        return str(v)
    if isinstance(v, float):
        if v != 0 and (abs(v) < 1e-3 or abs(v) >= 1e4):
            return f"{v:.2e}"
        return f"{v:.{digits}f}"
    return html.escape(str(v))


def _img(png: bytes, alt: str) -> str:
    return f'<img alt="{html.escape(alt)}" src="data:image/png;base64,{base64.b64encode(png).decode()}">'


def _table(headers: list[str], rows: list[list[Any]], table_id: str, bad: set[int] | None = None) -> str:
    head = "".join(f"<th>{html.escape(h)}</th>" for h in headers)
    body = []
    for i, row in enumerate(rows):
        cells = "".join(f'<td class="name">{html.escape(str(v))}</td>' if j == 0 else f"<td>{_fmt(v)}</td>"
                        for j, v in enumerate(row))
        body.append(f'<tr{" class=bad" if bad and i in bad else ""}>{cells}</tr>')
    return f'<table id="{table_id}"><thead><tr>{head}</tr></thead><tbody>{"".join(body)}</tbody></table>'


OFFENDER_COLS = ["point", "kind", "role", "bits", "KL (nats)", "Δ CE", "agree %", "Fisher", "SQNR iso dB",
                 "SQNR ctx dB", "chan. spread", "relevance"]


def _offender_row(p: str, r: dict[str, Any]) -> list[Any]:
    return [p, r["kind"], r.get("role"), r["bits"], r.get("kl"), r.get("ce_delta"), r.get("agreement"),
            r.get("fisher"), r.get("sqnr_isolated_db"), r.get("sqnr_context_db"), r.get("channel_spread"),
            r.get("relevance")]


def _headline(a: Any) -> list[tuple[str, str]]:
    c, o = a.config, a.overall
    rows = [("model", a.model), ("method / bits", f"{c['method']} W{c['w_bits']}A{c['a_bits']}"
                                 + (f" options {c['options']}" if c["options"] else "")),
            ("analysis images", f"{a.images} ({a.images_source})"),
            ("fully quantized vs float, on these images", f"KL {_fmt(o['kl'])} nats, top-1 agreement "
                                                          f"{_fmt(o['agreement'], 1)} %, logit SQNR "
                                                          f"{_fmt(o.get('logit_sqnr_db'), 1)} dB")]
    if "top1" in o:
        rows.append(("top-1 on the evaluation set", f"{o['top1']:.2f} % (float {o['float_top1']:.2f} %) on "
                                                    f"{o['eval_source']}"))
    rows.append(("worst point", f"{a.offenders[0]} (KL {_fmt(a.points[a.offenders[0]]['kl'])})"
                 if a.offenders else "none measurable"))
    rows.append(("computed", f"{a.created} on {a.machine} in {a.seconds:.1f} s"))
    return rows


def render_html(a: Any, top: int = 15) -> str:
    parts = [f"<!doctype html><html lang=en><head><meta charset=utf-8><title>vitquant analysis: "
             f"{html.escape(a.model)}</title><style>{_CSS}</style></head><body>",
             f"<h1>Where it hurts: {html.escape(a.model)}</h1>",
             "<table id=summary>" + "".join(f"<tr><th>{html.escape(k)}</th><td class=name>{html.escape(v)}</td></tr>"
                                           for k, v in _headline(a)) + "</table>",
             "<h2>Top offenders</h2>",
             "<p class=note>Ranked by the measured output KL with <em>only</em> that point quantized (everything "
             "else float), on the analysis images. Fisher: ½Σ(∂L/∂x · δ)², the diagonal-Fisher estimate of the "
             "loss change. SQNR iso: the point's own error on float inputs; ctx: its output in the fully "
             "quantized model against the float model. Spread: max/median of the per-channel max |x|.</p>",
             _table(OFFENDER_COLS, [_offender_row(p, a.points[p]) for p in a.offenders[:top]], "offenders"),
             _img(plots.offenders_bar(a), "top offenders"),
             "<h2>Every point, in forward order</h2>",
             _img(plots.sensitivity_map(a), "sensitivity map"), _img(plots.sqnr_plot(a), "SQNR per point"),
             _img(plots.spread_plot(a), "inter-channel spread"),
             "<h2>The worst points up close</h2>"]
    for p in a.offenders[:DETAILS]:
        r = a.points[p]
        extra = f"top channels {r['top_channels']}" if r.get("top_channels") else ""
        parts.append(f"<h3>{html.escape(p)}</h3><p class=note>{html.escape(r['quantizer'])}; range "
                     f"[{_fmt(r.get('min'))}, {_fmt(r.get('max'))}], p0.1–p99.9 [{_fmt(r.get('p0.1'))}, "
                     f"{_fmt(r.get('p99.9'))}]; {html.escape(extra)}</p>")
        parts.append(_img(plots.point_detail(a, p), f"{p} histogram"))
    parts.append("<h2>Per layer (input site + weight)</h2>")
    layers = sorted(a.layers.items(), key=lambda kv: -kv[1]["kl"])
    parts.append(_table(["layer", "KL (input + weight)", "Fisher", "relevance"],
                        [[n, v["kl"], v["fisher"], v["relevance"]] for n, v in layers], "layers"))
    parts.append("<h2>All points</h2><details><summary>show the table</summary>")
    parts.append(_table(OFFENDER_COLS, [_offender_row(p, r) for p, r in a.points.items()], "points"))
    parts.append("</details>")
    if a.notes:
        parts.append("<h2>Notes</h2><ul>" + "".join(f"<li>{html.escape(n)}</li>" for n in a.notes) + "</ul>")
    parts.append("<p class=note>Every number is in analysis.json beside this file. Written by vitquant.</p>"
                 "</body></html>")
    return "\n".join(parts)


def render_markdown(a: Any, top: int = 10) -> str:
    lines = [f"# Where it hurts: {a.model}", ""]
    lines += [f"- {k}: {v}" for k, v in _headline(a)]
    lines += ["", f"## Top {min(top, len(a.offenders))} offenders", "",
              "Measured KL with only that point quantized (nats per image); Fisher proxy; SQNR in isolation and "
              "in the fully quantized model.", ""]
    rows = [[p, r["kind"], r.get("bits"), r.get("kl"), r.get("agreement"), r.get("fisher"),
             r.get("sqnr_isolated_db"), r.get("sqnr_context_db"), r.get("channel_spread")]
            for p, r in ((p, a.points[p]) for p in a.offenders[:top])]
    lines.append(format_table(["point", "kind", "bits", "KL", "agree %", "Fisher", "SQNR iso", "SQNR ctx",
                               "spread"], [[_md(v) for v in row] for row in rows]))
    if a.notes:
        lines += ["", "## Notes", "", *[f"- {n}" for n in a.notes]]
    return "\n".join(lines) + "\n"


def _md(v: Any) -> Any:
    return f"{v:.3g}" if isinstance(v, float) else v


def write_analysis(a: Any, directory: str | Path) -> dict[str, Path]:
    """report.html, summary.md and analysis.json into `directory` (which must exist)."""
    d = Path(directory)
    files = {"report.html": render_html(a), "summary.md": render_markdown(a),
             "analysis.json": json.dumps(a.to_dict(), indent=1, allow_nan=False) + "\n"}
    for name, text in files.items():
        (d / name).write_text(text, encoding="utf-8")
    return {name: d / name for name in files}
