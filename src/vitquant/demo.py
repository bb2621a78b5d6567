"""The main job of the README: quantize the bundled reference ViT at several bit widths and show
float vs quantized accuracy, size and calibration time side by side."""
from __future__ import annotations

from typing import Sequence

from vitquant.api import quantize
from vitquant.config import QuantConfig
from vitquant.evaluate import evaluate
from vitquant.models.loading import load_model
from vitquant.report import format_table


def float_size_bytes(model) -> int:
    return sum(p.numel() * 4 for p in model.parameters())


def run_demo(method: str = "repq-vit", presets: Sequence[str] = ("w8a8", "w6a6", "w4a4"), progress: bool = True) -> list[list]:
    configs = [QuantConfig.preset(p, method=method) for p in presets]  # validate before any work
    model = load_model("bundled")
    meta = getattr(model, "vitquant_meta", {})
    print(f"bundled model: timm VisionTransformer {meta.get('model_kwargs', {}).get('depth', '?')} blocks, "
          f"trained on MNIST-5k; evaluating on the 1000-image test split")
    flt = evaluate(model, "bundled", progress=progress)
    fsize = float_size_bytes(model)
    rows = [["float32", "–", flt.top1, 0.0, 100.0, fsize / 2**20, 1.0, None]]
    for cfg in configs:
        q = quantize(model, cfg, "bundled", progress=progress)
        res = evaluate(q, "bundled", float_model=model, progress=progress)
        size = q.size_bytes()
        rows.append([cfg.bits_name, method, res.top1, res.top1 - flt.top1, res.agreement, size / 2**20,
                     fsize / size, q.stats["calibration_seconds"]])
    headers = ["bits", "method", "top-1 %", "Δ top-1", "agree %", "size MB", "compression ×", "calib s"]
    print(format_table(headers, rows))
    print(f"calibration: {configs[0].calib_size} images of the MNIST-5k train split; "
          "agreement = top-1 equal to the float model's.")
    return rows
