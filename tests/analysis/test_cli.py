"""`vitquant analyze` and the mixed-precision flags of `vitquant quantize`: outputs written atomically
with the marker, one `vitquant: error:` line (exit 2) for each bad input, before any model is loaded."""
import json

import pytest

import vitquant
from vitquant.cli import main
from vitquant.serialization import MARKER


def test_analyze_writes_the_report(tmp_path, capsys):
    out = tmp_path / "an"
    args = ["analyze", "--stress", "--method", "minmax", "--calib-size", "8", "--out", str(out), "--quiet"]
    assert main(args) == 0
    printed = capsys.readouterr().out
    assert "top offenders" in printed and "report.html" in printed
    assert sorted(p.name for p in out.iterdir()) == sorted([MARKER, "analysis.json", "report.html", "summary.md"])
    data = json.loads((out / "analysis.json").read_text())
    assert data["model"] == "bundled (stress S=30)" and data["config"]["method"] == "minmax"
    assert main(args) == 2  # exists: needs --force
    assert "already exists" in capsys.readouterr().err
    (out / "mine.txt").write_text("user file")
    assert main(args + ["--force"]) == 2  # never replaces what vitquant did not write
    assert "did not write" in capsys.readouterr().err


@pytest.mark.parametrize("argv,message", [
    (["analyze", "--calib", "data-free", "--out", "{o}"], "needs real calibration images"),
    (["analyze", "--bits", "w9a4", "--out", "{o}"], "between 2 and 8"),
    (["analyze", "--calib", "{o}/nowhere", "--out", "{o}/x"], "does not exist"),
    (["quantize", "--criterion", "lrp", "--out", "{o}/q"], "applies only with --avg-bits"),
    (["quantize", "--avg-bits", "1.5", "--out", "{o}/q"], "avg_bits must be a number above 2"),
    (["quantize", "--size-mb", "-3", "--out", "{o}/q"], "size_mb must be a number above 0"),
    (["quantize", "--max-drop", "0.5", "--calib", "{o}", "--out", "{o}/q"], "needs labelled held-out images"),
    (["quantize", "--max-drop", "0.5", "--calib", "{o}", "--holdout", "{o}", "--out", "{o}/q"],
     "is the calibration folder"),
    (["quantize", "--max-drop", "120", "--out", "{o}/q"], "--max-drop must be"),
    (["quantize", "--holdout", "bundled", "--out", "{o}/q"], "applies only with"),
    (["quantize", "--avg-bits", "4.5", "--calib", "gaussian", "--out", "{o}/q"], "need real calibration images"),
    (["quantize", "--avg-bits", "4.5", "--probe-method", "nope", "--out", "{o}/q"], "nope"),
])
def test_errors_are_one_line(tmp_path, capsys, argv, message):
    assert main([a.replace("{o}", str(tmp_path)) for a in argv]) == 2
    err = capsys.readouterr().err
    assert err.startswith("vitquant: error:") and err.count("\n") == 1 and message in err, err


def test_quantize_under_a_size_budget(tmp_path, capsys):
    out = tmp_path / "q"
    assert main(["quantize", "--bits", "w4a4", "--size-mb", "1.6", "--criterion", "lrp", "--calib-size", "8",
                 "--out", str(out), "--quiet"]) == 0
    printed = capsys.readouterr().out
    assert "mixed precision (lrp, budget ≤ 1.6 MB)" in printed
    meta = json.loads((out / "quant_config.json").read_text())
    mp = meta["mixed_precision"]
    assert mp["size_bytes"] <= 1.6e6 and mp["criterion"] == "lrp"
    q = vitquant.load(out)
    assert q.size_bytes() == mp["size_bytes"]
    report = (out / "report.md").read_text()
    assert "## Mixed precision" in report and "**lrp** criterion" in report and "per-site entries" in report
