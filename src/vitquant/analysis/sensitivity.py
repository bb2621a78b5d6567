"""How much each quantization point hurts, measured three ways on a calibrated, unfrozen model:

- measured: only this point quantized (everything else float), KL(p_float ‖ p) of the outputs, the change
  of the pseudo-label cross-entropy and the top-1 agreement with the float model (AIMET's per-layer
  "quant analyzer", NNCF's ranking, ONNX Runtime's qdq_loss_debug, done by switching quantizers);
- Fisher proxy: ΔL ≈ ½ Σ (g ⊙ δ)², the second-order Taylor term with the diagonal Fisher approximation
  of the Hessian *in activation space*: g = ∂L/∂(point output) under the pseudo-label cross-entropy,
  δ = the point's quantization error — Q(x) − x for an activation, x·(Q(W) − W)ᵀ at the output of a
  weight's layer (PTQ4ViT §4.2 weighs output errors by (∂L/∂O)²; HAWQ-V2/V3 use the Hessian trace);
- relative noise ‖δ‖² / ‖reference‖² (its SQNR in isolation).
`relevance` is the LRP-0 score of LRP-QViT (gradient × input of the top-1 logit, see its docstring).
All numbers are per image, on the images given (calibration images: no labels are needed).
"""
from __future__ import annotations

import math
from dataclasses import asdict, dataclass
from typing import Any

import torch
import torch.nn.functional as F

from vitquant.analysis.calibrated import WEIGHT_SUFFIX, Calibrated, kl_to_reference, logits
from vitquant.analysis.probe import float_batches, site_quantized, weight_delta_output
from vitquant.analysis.stats import sqnr_db
from vitquant.models import QuantizedModel


@dataclass
class PointSensitivity:
    point: str
    kind: str  # "act" or "weight"
    role: str  # the site's role; a weight takes its layer input's role
    bits: int | None
    elements: int  # per image for an activation, parameters for a weight
    kl: float = 0.0  # nats, mean over images
    ce_delta: float = 0.0
    agreement: float = 100.0  # % of images whose top-1 is the float one
    fisher: float = 0.0
    rel_noise: float = 0.0
    sqnr_db: float = math.inf

    def to_dict(self) -> dict[str, Any]:
        return {k: (None if isinstance(v, float) and not math.isfinite(v) else v) for k, v in asdict(self).items()}


def _layer_role(qmodel: QuantizedModel, layer: str) -> str:
    site = qmodel.structure.sites.get(qmodel.structure.layer_input(layer))
    return site.role if site is not None else "other"


def elements(qmodel: QuantizedModel, images: torch.Tensor) -> dict[str, int]:
    """Per point: activation elements per image (from one image), or the weight's parameter count."""
    out: dict[str, int] = {}
    for taps in float_batches(qmodel, images[:1], 1):
        out.update({n: t.numel() for n, t in taps.site_out.items()})
    out.update({f"{n}{WEIGHT_SUFFIX}": layer.weight.numel() for n, layer in qmodel.weight_layers().items()})
    return out


def measure(cal: Calibrated, images: torch.Tensor, batch_size: int = 32, measured: bool = True,
            fisher: bool = True) -> dict[str, PointSensitivity]:
    """Every point the calibrated model quantizes, at the bits its plan gives."""
    qmodel = cal.qmodel
    acts, layers = qmodel.act_sites(), qmodel.weight_layers()
    points = cal.quantized_points()
    counts = elements(qmodel, images)
    bits = cal.points()
    n_images = images.shape[0]
    res = {p: PointSensitivity(p, "weight" if p not in acts else "act",
                               acts[p].role if p in acts else _layer_role(qmodel, p[: -len(WEIGHT_SUFFIX)]),
                               bits[p], counts[p]) for p in points}
    noise = {p: 0.0 for p in points}
    signal = {p: 0.0 for p in points}
    for taps in float_batches(qmodel, images, batch_size, loss="ce" if fisher else None):
        for p in points:
            if p in acts:
                ref = taps.site_out[p]
                delta = site_quantized(acts[p], taps.site_in[p]) - ref
                g = taps.site_grad.get(p)
            else:
                name = p[: -len(WEIGHT_SUFFIX)]
                ref = taps.layer_out[name]
                delta = weight_delta_output(layers[name], taps.layer_in[name])
                g = taps.layer_grad.get(name)
            noise[p] += delta.double().pow(2).sum().item()
            signal[p] += ref.double().pow(2).sum().item()
            if g is not None:
                res[p].fisher += 0.5 * (g.double() * delta.double()).pow(2).sum().item() / n_images
    for p in points:
        res[p].rel_noise = noise[p] / signal[p] if signal[p] > 0 else 0.0
        res[p].sqnr_db = sqnr_db(signal[p], noise[p])
    if measured:
        with qmodel.bypassed():
            ref = logits(qmodel, images, batch_size)
        top = ref.argmax(1)
        ce_ref = F.cross_entropy(ref.double(), top).item()
        for p in points:
            with cal.only([p]):
                out = logits(qmodel, images, batch_size)
            res[p].kl = kl_to_reference(ref, out).mean().item()
            res[p].ce_delta = F.cross_entropy(out.double(), top).item() - ce_ref
            res[p].agreement = (out.argmax(1) == top).double().mean().item() * 100
    return res


def relevance(qmodel: QuantizedModel, images: torch.Tensor, batch_size: int = 32) -> dict[str, float]:
    """LRP-0 relevance mass per point, as a share of the total of its kind (activations, weights).

    The relevance of the top-1 logit z_c reaching a tensor a is R = a ⊙ ∂z_c/∂a, LRP's ε=0 rule, which
    equals gradient × input for piecewise-linear maps (Ancona et al., ICLR'18) — we apply it through
    softmax, GELU and LayerNorm too, where Chefer et al.'s transformer rules would differ (LRP-QViT's own
    rules are not public). A site's score is E_images Σ|R| over its output; a weight's is E Σ|R| over its
    layer's output (the relevance that flows through that weight)."""
    raw: dict[str, float] = {}
    for taps in float_batches(qmodel, images, batch_size, loss="target"):
        for n, g in taps.site_grad.items():
            raw[n] = raw.get(n, 0.0) + (taps.site_out[n].double() * g.double()).abs().sum().item()
        for n, g in taps.layer_grad.items():
            key = f"{n}{WEIGHT_SUFFIX}"
            raw[key] = raw.get(key, 0.0) + (taps.layer_out[n].double() * g.double()).abs().sum().item()
    out: dict[str, float] = {}
    for is_weight in (False, True):
        group = {k: v for k, v in raw.items() if k.endswith(WEIGHT_SUFFIX) == is_weight}
        total = sum(group.values()) or 1.0
        out.update({k: v / total for k, v in group.items()})
    return out
