"""The calibration engine: the one place that runs calibration images through a prepared model.

It owns batching and device placement (the model's device, CPU or CUDA), and offers what methods
need without them knowing where anything is computed:
- `observe(sites)`: streaming statistics of each site's input in the *float* model (the papers'
  "parallel" calibration: a site never sees the errors of the quantizers before it);
- `capture(layers, cores, with_grad)`: each layer's float input (and ∂L/∂output), each attention
  core's operands (and ∂L/∂(Q·Kᵀ), ∂L/∂(probs·V)), via taps on the dispatch handlers (capture.py);
- `unit_io(unit, model)`: a unit's call arguments (and output) as a given model computes them, for
  sequential and reconstruction methods — chaining from the previous unit when nothing runs between
  them, otherwise a forward that stops at the unit.
Methods get it through the `Context` they are called with.
"""
from __future__ import annotations

from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Callable, Iterable, Iterator

import torch
from torch import nn
from torch.utils._pytree import tree_flatten, tree_unflatten
from tqdm.auto import tqdm

from vitquant import distributed
from vitquant.calibration.observer import ReservoirObserver
from vitquant.models.dispatch import quiet
from vitquant.models.io import logits_of
from vitquant.models.qmodules import ActSite
from vitquant.profiling import release_memory

if TYPE_CHECKING:
    from vitquant.calibration.data import CalibrationSet
    from vitquant.config import QuantConfig
    from vitquant.models.quantized import QuantizedModel
    from vitquant.plan import SitePlan


def model_device(model: nn.Module) -> torch.device:
    p = next(model.parameters(), None)
    return p.device if p is not None else torch.device("cpu")


@contextmanager
def observing(sites: Iterable[ActSite], seed: int = 0,
              sample: Callable[[ActSite], bool] | None = None) -> Iterator[dict[str, ReservoirObserver]]:
    """Attach a fresh observer to each site for the duration of the block. sample(site) False: the
    site's observer keeps only the extremes (and one row), for min-max ranges."""
    sites = list(sites)
    observers = {}
    for i, site in enumerate(sites):
        kw = {} if sample is None or sample(site) else {"max_elements": 1}
        site.observer = observers[site.name] = ReservoirObserver(site.channel_axis, seed=seed + i, **kw)
    try:
        yield observers
    finally:
        for site in sites:
            site.observer = None


@torch.no_grad()
def run_batches(model: nn.Module, batches: list[torch.Tensor], desc: str, progress: bool = True,
                before: Callable[[int], None] | None = None) -> None:
    """Forward each batch; before(i) runs ahead of batch i."""
    device = model_device(model)
    for i, x in enumerate(tqdm(batches, desc=desc, unit="batch", disable=not progress, leave=False)):
        if before is not None:
            before(i)
        model(x.to(device))


def observe_float(
    qmodel: "QuantizedModel", batches: list[torch.Tensor], sites: Iterable[ActSite] | None = None,
    seed: int = 0, progress: bool = True, desc: str = "calibrating",
    sample: Callable[[ActSite], bool] | None = None,
    on_complete: Callable[[ActSite, ReservoirObserver], None] | None = None, first_batch: int = 0,
) -> dict[str, ReservoirObserver]:
    """Statistics of each enabled site's input as the *float* model computes it (see `observing`).
    `batches` are batches first_batch, first_batch + 1, … of the calibration grid (a rank's share of them
    in a distributed calibration): the observers' sampling keys follow the grid's batch indices.

    on_complete(site, observer): called for each site as soon as its statistics are final — during the
    last batch, when the unit holding the site has run (a unit runs once per forward, as unit-wise
    capture assumes; sites outside every unit after the forward) — after which the observer keeps only
    its extremes. Memory then holds one unit's samples instead of every site's (DeiT-S: ~100 sites of
    2 MiB each)."""
    sites = [s for s in (qmodel.act_sites().values() if sites is None else sites) if s.enabled]
    with qmodel.bypassed(), observing(sites, seed, sample) as observers:
        def start(offset: int) -> Callable[[int], None]:
            def before(i: int) -> None:
                for obs in observers.values():
                    obs.start_batch(first_batch + offset + i)
            return before

        if on_complete is None:
            run_batches(qmodel, batches, desc, progress, start(0))
        else:
            done: set[str] = set()

            def complete(group: list[ActSite]) -> None:
                with quiet():
                    for site in group:
                        obs = observers[site.name]
                        if site.name in done or obs.empty:
                            continue
                        done.add(site.name)
                        on_complete(site, obs)
                        obs.drop_sample()
                release_memory()

            run_batches(qmodel, batches[:-1], desc, progress, start(0))
            by_id = {id(s): s for s in sites}
            handles = []
            for unit in qmodel.structure.units:
                group = [by_id[id(m)] for m in qmodel.submodule(unit.name).modules() if id(m) in by_id]
                if group:
                    handles.append(qmodel.submodule(unit.name).register_forward_hook(
                        lambda _m, _a, _o, group=group: complete(group)))
            try:
                run_batches(qmodel, batches[-1:], desc, progress, start(len(batches) - 1))
            finally:
                for h in handles:
                    h.remove()
            complete(sites)  # sites outside every unit
    missing = [name for name, obs in observers.items() if obs.empty]
    if missing:
        raise RuntimeError(f"calibration forward never reached these sites: {missing[:5]}")
    return observers


class _Stop(Exception):
    """Raised by a hook to end a forward pass once the unit of interest has been reached."""


class UnitInputs:
    """The arguments a unit was called with over all calibration batches. Tensors that differ between
    batches are concatenated along dim 0 (the images); those that do not (masks, position tables) are
    kept once. `args(idx)` rebuilds a call for a subset of the images."""

    def __init__(self, calls: list[tuple[tuple, dict]]) -> None:
        flat = [tree_flatten((a, k)) for a, k in calls]
        self.spec = flat[0][1]
        self.leaves: list[Any] = []
        self.batched: list[bool] = []
        for i, leaf in enumerate(flat[0][0]):
            column = [f[0][i] for f in flat]
            if isinstance(leaf, torch.Tensor) and leaf.dim() > 0 and not all(
                    c is leaf or (c.shape == leaf.shape and torch.equal(c, leaf)) for c in column):
                self.leaves.append(torch.cat(column))
                self.batched.append(True)
            else:
                self.leaves.append(leaf)
                self.batched.append(False)
        main = next((i for i, b in enumerate(self.batched) if b), None)
        if main is None:  # a single batch: the first tensor is the batched one
            main = next(i for i, leaf in enumerate(self.leaves) if isinstance(leaf, torch.Tensor))
            self.batched[main] = True
        self.main = main

    def __len__(self) -> int:
        return self.leaves[self.main].shape[0]

    @property
    def x(self) -> torch.Tensor:
        return self.leaves[self.main]

    def call(self, idx: torch.Tensor | slice) -> tuple[tuple, dict]:
        leaves = [leaf[idx] if b else leaf for leaf, b in zip(self.leaves, self.batched)]
        return tree_unflatten(leaves, self.spec)

    def with_x(self, x: torch.Tensor) -> "UnitInputs":
        """The same calls with the main tensor replaced (a previous unit's output, for chaining)."""
        other = object.__new__(UnitInputs)
        other.__dict__.update(self.__dict__)
        other.leaves = list(self.leaves)
        other.leaves[self.main] = x
        return other


def first_tensor(out: Any) -> torch.Tensor:
    return logits_of(out)


def run_unit(unit: nn.Module, inputs: UnitInputs, idx: torch.Tensor | slice) -> torch.Tensor:
    args, kwargs = inputs.call(idx)
    return first_tensor(unit(*args, **kwargs))


@torch.no_grad()
def unit_outputs(unit: nn.Module, inputs: UnitInputs, batch_size: int) -> torch.Tensor:
    """The unit's outputs on all its recorded calls, `batch_size` images at a time."""
    return torch.cat([run_unit(unit, inputs, slice(s, s + batch_size)) for s in range(0, len(inputs), batch_size)])


@torch.no_grad()
def unit_io(model: nn.Module, unit_name: str, images: torch.Tensor, batch_size: int,
            with_output: bool) -> tuple[UnitInputs, torch.Tensor | None]:
    """The calls `model` makes to its unit `unit_name` on `images` (and the unit's outputs)."""
    unit = model.submodule(unit_name) if hasattr(model, "submodule") else (
        model.get_submodule(unit_name) if unit_name else model)
    calls, outs = [], []

    def pre(_m, args, kwargs):
        with quiet():
            calls.append((tuple(a.detach() if isinstance(a, torch.Tensor) else a for a in args),
                          {k: v.detach() if isinstance(v, torch.Tensor) else v for k, v in kwargs.items()}))
        if not with_output:
            raise _Stop

    def post(_m, _args, out):
        with quiet():
            outs.append(first_tensor(out).detach())
        raise _Stop

    handles = [unit.register_forward_pre_hook(pre, with_kwargs=True)]
    if with_output:
        handles.append(unit.register_forward_hook(post))
    try:
        for x in images.split(batch_size):
            try:
                model(x)
            except _Stop:
                pass
    finally:
        for h in handles:
            h.remove()
    if not calls:
        raise RuntimeError(f"the forward never reached unit {unit_name!r}")
    return UnitInputs(calls), (torch.cat(outs) if with_output else None)


class UnitStream:
    """A model's calls to its units, unit by unit in forward order (`inputs(unit)`). A chained unit's
    calls are the previous unit's with its outputs as input (computed when asked for, so with the
    previous unit as it is by then); any other unit's come from a forward that stops at it. Each unit
    then runs once, instead of one forward up to every unit, and memory holds one unit's tensors."""

    def __init__(self, model: nn.Module, images: torch.Tensor, batch_size: int) -> None:
        self.model, self.images, self.batch_size = model, images, batch_size
        self.unit_name: str | None = None
        self.calls: UnitInputs | None = None
        self._outputs: torch.Tensor | None = None

    def inputs(self, unit_name: str, chained: bool) -> UnitInputs:
        if chained and self.calls is not None:
            self.calls = self.calls.with_x(self.outputs())
        else:
            self.calls = unit_io(self.model, unit_name, self.images, self.batch_size, with_output=False)[0]
        self.unit_name, self._outputs = unit_name, None
        return self.calls

    def outputs(self) -> torch.Tensor:
        """The current unit's outputs on its calls (computed once)."""
        if self._outputs is None:
            self._outputs = unit_outputs(self.model.submodule(self.unit_name), self.calls, self.batch_size)
        return self._outputs


@dataclass
class Context:
    """What a method's `calibrate` gets: the model, the images, the config, the resolved per-site plan
    and the engine that runs the forward loop."""

    qmodel: "QuantizedModel"
    calib: "CalibrationSet"
    config: "QuantConfig"
    plan: "SitePlan"
    progress: bool = True
    # the user's float model that `qmodel` was prepared from (None: not available), left untouched; a
    # float teacher may share its weights instead of copying them (reconstruction.float_teacher)
    float_model: "torch.nn.Module | None" = field(default=None, repr=False)
    # site name → exact per-channel (min, max) of its float input, from this context's observe passes
    _ranges: dict[str, tuple[torch.Tensor, torch.Tensor]] = field(default_factory=dict, repr=False)

    @property
    def structure(self):
        return self.qmodel.structure

    @property
    def device(self) -> torch.device:
        return model_device(self.qmodel)

    def batches(self, batch_size: int = 32) -> list[torch.Tensor]:
        device = self.device
        return [x.to(device) for x in self.calib.batches(batch_size)]

    def images(self) -> torch.Tensor:
        return self.calib.images.to(self.device)

    def channel_range(self, site: ActSite) -> tuple[torch.Tensor, torch.Tensor]:
        """Exact per-channel (min, max) of `site`'s input in the float model over every calibration image:
        kept from this context's last `observe` that saw the site (during it, from the moment the site's
        statistics are final, i.e. inside its on_complete), else measured by one extremes-only forward."""
        if site.name not in self._ranges:
            self.observe([site], sample=lambda _s: False, desc="channel ranges")
        return self._ranges[site.name]

    def observe(self, sites: Iterable[ActSite] | None = None, batch_size: int = 32,
                desc: str = "calibrating", sample: Callable[[ActSite], bool] | None = None,
                on_complete: Callable[[ActSite, ReservoirObserver], None] | None = None,
                ) -> dict[str, ReservoirObserver]:
        def complete(site: ActSite, observer: ReservoirObserver) -> None:
            self._ranges[site.name] = (observer.lo, observer.hi)
            if on_complete is not None:
                on_complete(site, observer)

        batches, first = self.batches(batch_size), 0
        # Distributed (torchrun): each rank observes a contiguous range of the same batches and the observers
        # are reduced, in site order, before any site is fitted — what one process computes, exactly. With
        # fewer batches than ranks (32 images are one batch) every rank observes all of them.
        shared = distributed.is_distributed() and len(batches) >= distributed.world_size()
        if shared:
            part = distributed.shard(len(batches))
            batches, first = batches[part.start:part.stop], part.start
        observers = observe_float(self.qmodel, batches, sites, seed=self.config.seed,
                                  progress=self.progress, desc=desc, sample=sample,
                                  on_complete=complete if on_complete is not None and not shared else None,
                                  first_batch=first)
        if shared:
            by_name = self.qmodel.act_sites()
            for name, obs in observers.items():
                obs.reduce_across_ranks()
                if on_complete is not None:
                    complete(by_name[name], obs)
                    obs.drop_sample()
        self._ranges.update({name: (obs.lo, obs.hi) for name, obs in observers.items()})
        return observers
