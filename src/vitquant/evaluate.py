"""Accuracy of a (quantized) model, and how often it agrees with its float original."""
from __future__ import annotations

import time
from dataclasses import asdict, dataclass
from typing import Any

import torch
from torch import nn
from tqdm.auto import tqdm

from vitquant.calibration.data import LabeledSet, data_config_for, load_labeled
from vitquant.models import QuantizedModel
from vitquant.models.io import logits_of


@dataclass
class EvalResult:
    top1: float  # percent
    top5: float
    n: int
    seconds: float
    agreement: float | None = None  # percent of images where top-1 equals the float model's top-1
    source: str = ""

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def _inner(model: nn.Module) -> nn.Module:
    return model.model if isinstance(model, QuantizedModel) else model


@torch.no_grad()
def predict_logits(model: nn.Module, data: LabeledSet, batch_size: int = 100, progress: bool = True,
                   desc: str = "evaluating") -> torch.Tensor:
    model.eval()
    device = next(model.parameters()).device
    outs = []
    n_batches = -(-len(data.labels) // batch_size)
    for x, _ in tqdm(data.batches(batch_size), total=n_batches, desc=desc, unit="batch", disable=not progress, leave=False):
        outs.append(logits_of(model(x.to(device))).float().cpu())  # HF models return an output object
    return torch.cat(outs)


def evaluate(
    model: nn.Module, data: Any = "bundled", float_model: nn.Module | None = None, *,
    batch_size: int = 100, limit: int | None = None, progress: bool = True,
) -> EvalResult:
    """Top-1/top-5 on `data` ("bundled" MNIST-5k test split, an ImageFolder path, or a LabeledSet);
    with `float_model`, also the top-1 agreement with it."""
    if not isinstance(data, LabeledSet):
        data = load_labeled(data, data_config_for(_inner(model)), limit=limit)
    t0 = time.perf_counter()
    logits = predict_logits(model, data, batch_size, progress)
    seconds = time.perf_counter() - t0
    labels = data.labels
    k = min(5, logits.shape[1])
    topk = logits.topk(k, dim=1).indices
    top1 = (topk[:, 0] == labels).float().mean().item() * 100
    top5 = (topk == labels[:, None]).any(dim=1).float().mean().item() * 100
    agreement = None
    if float_model is not None:
        ref = predict_logits(float_model, data, batch_size, progress, desc="float reference")
        agreement = (ref.argmax(1) == topk[:, 0]).float().mean().item() * 100
    return EvalResult(top1, top5, len(labels), seconds, agreement, data.source)
