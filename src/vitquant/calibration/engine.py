"""Running calibration data through a prepared model and collecting activation statistics."""
from __future__ import annotations

from contextlib import contextmanager
from typing import Iterable, Iterator

import torch
from tqdm.auto import tqdm

from vitquant.calibration.observer import ReservoirObserver
from vitquant.models.qmodules import ActSite
from vitquant.models.quantized import QuantizedModel


@contextmanager
def observing(sites: Iterable[ActSite], seed: int = 0) -> Iterator[dict[str, ReservoirObserver]]:
    """Attach a fresh observer to each site for the duration of the block."""
    sites = list(sites)
    observers = {}
    for i, site in enumerate(sites):
        site.observer = observers[site.name] = ReservoirObserver(site.channel_axis, seed=seed + i)
    try:
        yield observers
    finally:
        for site in sites:
            site.observer = None


@torch.no_grad()
def run_batches(model: torch.nn.Module, batches: list[torch.Tensor], desc: str, progress: bool = True) -> None:
    device = next(model.parameters()).device
    for x in tqdm(batches, desc=desc, unit="batch", disable=not progress, leave=False):
        model(x.to(device))


def observe_float(
    qmodel: QuantizedModel, batches: list[torch.Tensor], sites: Iterable[ActSite] | None = None,
    seed: int = 0, progress: bool = True, desc: str = "calibrating",
) -> dict[str, ReservoirObserver]:
    """Statistics of each site's input as the *float* model computes it (the papers' "parallel"
    calibration: a site never sees errors of the quantizers before it)."""
    sites = [s for s in (qmodel.act_sites().values() if sites is None else sites) if s.enabled]
    with qmodel.bypassed(), observing(sites, seed) as observers:
        run_batches(qmodel, batches, desc, progress)
    missing = [name for name, obs in observers.items() if obs.empty]
    if missing:
        raise RuntimeError(f"calibration forward never reached these sites: {missing[:5]}")
    return observers
