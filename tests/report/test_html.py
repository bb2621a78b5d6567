"""The analysis report: self-contained HTML (embedded PNGs, nothing fetched), markdown, strict JSON, and
the HTML as a real browser renders it (Debian chromium, headless; skipped with a reason without it)."""
import base64
import io
import json
import re

import numpy as np
import pytest
from PIL import Image

import vitquant
from vitquant.analysis.analyzer import analyze
from vitquant.bench import STRESS
from vitquant.calibration.data import data_config_for, load_calibration
from vitquant.config import QuantConfig
from vitquant.models.outliers import inject_ln_outliers
from vitquant.report.browser import find_chromium, rendered_dom, screenshot
from vitquant.report.html import render_html, write_analysis


@pytest.fixture(scope="module")
def report_dir(tmp_path_factory):
    model = inject_ln_outliers(vitquant.load_model("bundled"), **STRESS)
    calib = load_calibration("bundled", data_config_for(model), n=8, seed=0)
    a = analyze(model, QuantConfig.preset("w4a4", method="minmax", calib_size=8), calib, name="bundled stress")
    d = tmp_path_factory.mktemp("report")
    write_analysis(a, d)
    return a, d


def test_report_files_are_self_contained(report_dir):
    a, d = report_dir
    html = (d / "report.html").read_text(encoding="utf-8")
    # nothing is fetched: no scripts, no external sources or stylesheets
    assert "<script" not in html and not re.search(r'(src|href)="(?!data:)', html)
    pngs = re.findall(r'src="data:image/png;base64,([^"]+)"', html)
    assert len(pngs) >= 4 + min(6, len(a.offenders))  # offenders, map, SQNR, spread, + one per worst point
    for b64 in pngs:
        img = Image.open(io.BytesIO(base64.b64decode(b64)))
        assert img.format == "PNG" and img.size[0] > 300
    rows = re.search(r'<table id="offenders">.*?<tbody>(.*?)</tbody>', html, re.S).group(1)
    assert rows.count("<tr") == min(15, len(a.offenders)) and a.offenders[0] in rows
    md = (d / "summary.md").read_text(encoding="utf-8")
    assert "| point" in md and a.offenders[0] in md
    data = json.loads((d / "analysis.json").read_text(encoding="utf-8"))
    assert data["offenders"] == a.offenders and set(data["points"]) == set(a.points)


def test_report_escapes_names(report_dir, monkeypatch):
    a, _ = report_dir
    for name in ("offenders_bar", "sensitivity_map", "sqnr_plot", "spread_plot", "point_detail"):
        monkeypatch.setattr(f"vitquant.report.plots.{name}", lambda *args: b"png")  # plots are not the point
    a.model = "<b>model</b> & co"
    try:
        html = render_html(a)
    finally:
        a.model = "bundled stress"
    assert "<b>model</b>" not in html and "&lt;b&gt;model&lt;/b&gt; &amp; co" in html


@pytest.mark.skipif(find_chromium() is None,
                    reason="Debian chromium is not installed (apt-get install -y chromium; .ci/run installs it)")
def test_report_renders_in_headless_chromium(report_dir, tmp_path):
    a, d = report_dir
    png = screenshot(d / "report.html", tmp_path / "shot.png", width=1200, height=1600)
    pixels = np.asarray(Image.open(png).convert("RGB")).astype(np.int32)
    assert pixels.shape[:2] == (1600, 1200)
    assert (pixels.sum(-1) < 600).mean() > 0.02  # not blank: text, tables and plots cover the page
    # the offenders bar chart's blue (#1f77b4) is on screen: the embedded PNGs were decoded and drawn
    blue = (abs(pixels[..., 0] - 0x1F) < 12) & (abs(pixels[..., 1] - 0x77) < 12) & (abs(pixels[..., 2] - 0xB4) < 12)
    assert blue.sum() > 2000
    dom = rendered_dom(d / "report.html")
    table = re.search(r'<table id="offenders">.*?</table>', dom, re.S)
    assert table is not None and table.group(0).count("<tr") == min(15, len(a.offenders)) + 1
    assert "Top offenders" in dom and a.offenders[0] in table.group(0)
