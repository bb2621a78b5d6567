"""Where a quantized ViT loses accuracy: per-point statistics, errors and sensitivities (`analyze`).

    analysis = vitquant.analyze(model, vitquant.QuantConfig.preset("w4a4", method="repq-vit"), "bundled")
    analysis.offenders[:5]

Modules: calibrated.py (a calibrated model whose quantizers switch on one at a time), probe.py (taps and
gradients per batch), stats.py (streaming float statistics), sensitivity.py (measured KL, Fisher proxy,
LRP relevance), analyzer.py (the Analysis), cli.py (`vitquant analyze`). Reports: vitquant.report.html.
Heavy modules are imported on first use, so the CLI's --help stays fast.
"""
from __future__ import annotations

from typing import Any

__all__ = ["Analysis", "analyze"]


def __getattr__(name: str) -> Any:
    if name in __all__:
        from vitquant.analysis import analyzer as module

        return getattr(module, name)
    raise AttributeError(f"module 'vitquant.analysis' has no attribute {name!r}")
