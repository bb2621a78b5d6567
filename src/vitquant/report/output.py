"""`report.md` of a saved quantized model: what a person opening the output directory wants to know
without reading JSON — the model and where it came from, method, bits and options, calibration data and
time, accuracy when it was evaluated, sizes, what was left float, and how to use the files.
"""
from __future__ import annotations

from typing import Any

from vitquant.report.mixed import mixed_sections, site_bits_cell
from vitquant.report.table import format_table


def _mb(n: int | None) -> str:
    return "–" if n is None else f"{n / 1e6:.2f} MB"


def _model_name(source: dict[str, Any] | None) -> str:
    source = source or {}
    name = source.get("name") or source.get("factory") or source.get("class") or source.get("type") or "custom model"
    return f"{name} ({source['type']})" if source.get("type") and source.get("type") != name else str(name)


def _listing(items: list[str], shown: int = 12) -> str:
    more = f" and {len(items) - shown} more" if len(items) > shown else ""
    return ", ".join(f"`{i}`" for i in items[:shown]) + more


def render_output_report(meta: dict[str, Any], sizes: dict[str, int], files: list[str]) -> str:
    config, stats = meta.get("config") or {}, meta.get("stats") or {}
    source = meta.get("source") or {}
    bits = f"W{config.get('w_bits')}A{config.get('a_bits')}"
    lines = [f"# {_model_name(source)} — {config.get('method')} {bits}", ""]
    facts = [["method", config.get("method")], ["bits", bits],
             ["options", ", ".join(f"{k}={v}" for k, v in (config.get("options") or {}).items()) or "defaults"],
             ["deployable only", "yes" if config.get("deployable") else "no"]]
    if config.get("site_bits"):
        facts.append(["site bits", site_bits_cell(config["site_bits"])])
    if config.get("keep_float"):
        facts.append(["kept float (asked)", _listing(config["keep_float"])])
    weights = meta.get("float_weights") or {}
    facts.append(["float weights", weights.get("path") or source.get("weights") or source.get("name") or "–"])
    if weights.get("sha256"):
        facts.append(["float weights sha256", weights["sha256"]])
    lines += [format_table(["", ""], facts), "", "## Calibration", ""]
    calib = [["data", stats.get("calibration_source", "–")], ["images", stats.get("calibration_images", "–")],
             ["seed", config.get("seed", "–")]]
    if "generation_seconds" in stats:
        calib.append(["image generation time", f"{stats['generation_seconds']:.1f} s"])
    seconds = stats.get("calibration_seconds")
    calib += [["calibration time", "–" if seconds is None else f"{seconds:.1f} s"],
              ["peak memory (process)", f"{stats['calibration_peak_rss_mb']:.0f} MB"
               if "calibration_peak_rss_mb" in stats else "–"]]
    lines += [format_table(["", ""], calib), ""]
    evaluation = meta.get("evaluation")
    if evaluation:
        lines += ["## Accuracy", "", f"On {evaluation.get('data')}:", "",
                  format_table(["float top-1", "quantized top-1", "quantized top-5", "top-1 agreement with float"],
                               [[f"{evaluation['float_top1']:.2f} %", f"{evaluation['top1']:.2f} %",
                                 f"{evaluation['top5']:.2f} %", f"{evaluation['agreement']:.2f} %"]]), ""]
    else:
        lines += ["## Accuracy", "", "Not evaluated (pass `--eval DATA` to `vitquant quantize`, or run "
                  "`vitquant eval` on this directory).", ""]
    lines += mixed_sections(meta)
    lines += ["## Size", "", format_table(["float (fp32)", "deployed (weights at their bits)", "model.safetensors"],
                                          [[_mb(sizes.get("float_fp32_bytes")), _mb(sizes.get("deployed_bytes")),
                                            _mb(sizes.get("file_bytes"))]]), ""]
    float_sites, float_ops = stats.get("float_sites") or [], stats.get("float_ops") or []
    if float_sites or float_ops:
        lines += ["## Left float", ""]
        if float_sites:
            lines.append(f"- by the plan: {_listing(float_sites)}")
        if float_ops:
            lines.append(f"- not understood or constant: {_listing(float_ops)}")
        lines.append("")
    lines += ["## Files", "", *[f"- `{f}`" for f in files], "",
              "Evaluate with `vitquant eval THIS_DIR --data DATA`; export with "
              "`vitquant export THIS_DIR --out model.onnx`; in Python, `vitquant.load(\"THIS_DIR\")`.", ""]
    return "\n".join(lines)
