"""Accuracy of a (quantized) model, and how often it agrees with its float original."""
from __future__ import annotations

import time
import warnings
from pathlib import Path
from dataclasses import asdict, dataclass
from typing import Any

import torch
from torch import nn
from tqdm.auto import tqdm

from vitquant.calibration.data import LabeledSet, data_config_for
from vitquant.calibration.stream import labeled_stream
from vitquant.errors import VitquantError
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
    batch_size: int = 100, limit: int | None = None, progress: bool = True, workers: int | None = None,
) -> EvalResult:
    """Top-1/top-5 on `data` ("bundled" MNIST-5k test split, an ImageFolder path, or a LabeledSet);
    with `float_model`, also the top-1 agreement with it.

    A folder is streamed (decoded `batch_size` images at a time, by `workers` DataLoader processes; default:
    none for small folders, else up to 8). Under torch.distributed (`torchrun`) each rank scores a contiguous
    range of the batches and the counts are summed: the result equals one process's exactly, and every rank
    returns it; progress shows on rank 0 only."""
    from vitquant import distributed

    stream = labeled_stream(data, data_config_for(_inner(model)), limit=limit)
    part = distributed.shard(stream.n_batches(batch_size))
    device = next(model.parameters()).device
    model.eval()
    if float_model is not None:
        float_model.eval()
    counts = torch.zeros(5, dtype=torch.int64)  # images, top-1, top-5, agreeing, unreadable
    t0 = time.perf_counter()
    bar = tqdm(total=len(part), desc="evaluating", unit="batch", disable=not (progress and distributed.is_main()),
               leave=False)
    with torch.no_grad(), bar:
        for x, labels in stream.batches(batch_size, part.start, part.stop, workers):
            logits = logits_of(model(x.to(device))).float().cpu()  # HF models return an output object
            # top-1 is argmax (not topk's first), as bench stores have always counted it: the two break exact
            # ties differently, which a collapsed model's logits have
            pred = logits.argmax(1)
            topk = logits.topk(min(5, logits.shape[1]), dim=1).indices
            counts[0] += len(labels)
            counts[1] += int((pred == labels).sum())
            counts[2] += int((topk == labels[:, None]).any(dim=1).sum())
            if float_model is not None:
                ref = logits_of(float_model(x.to(next(float_model.parameters()).device))).float().cpu()
                counts[3] += int((ref.argmax(1) == pred).sum())
            bar.update(1)
    counts[4] = len(stream.skipped)
    seconds = time.perf_counter() - t0
    counts = distributed.all_reduce(counts)
    n, unreadable = int(counts[0]), int(counts[4])
    if n == 0:
        raise VitquantError(f"no readable evaluation images in {stream.source} ({unreadable} could not be decoded)")
    if unreadable:
        where = f" in '{stream.folder}'" if stream.folder is not None else ""
        shown = ", ".join(Path(p).name for p in stream.skipped[:3])
        warnings.warn(f"skipped {unreadable} unreadable image file(s){where}" + (f" (e.g. {shown})" if shown else ""),
                      stacklevel=2)
    source = stream.source if not unreadable else f"{stream.source[:-1]}, {unreadable} unreadable skipped)"
    agreement = None if float_model is None else 100 * int(counts[3]) / n
    return EvalResult(100 * int(counts[1]) / n, 100 * int(counts[2]) / n, n, seconds, agreement, source)
