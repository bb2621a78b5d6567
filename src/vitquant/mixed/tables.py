"""The sensitivity of every free quantization point at every candidate bit width.

For each width b, the method is calibrated at uniform WbAb (unfrozen, analysis/calibrated.py) and each
point is measured in that model (analysis/sensitivity.py): measured KL with only it quantized, the Fisher
proxy, and its relative noise. Calibrating per width, rather than mixing quantizers fitted at different
widths into one model, keeps every number valid for methods that reparameterize the model (RepQ-ViT's
scales depend on the bits). Float costs nothing by definition. `probe` may name a cheaper method to
measure with (e.g. RepQ-ViT for AdaLog, whose calibration takes minutes); the table says which was used.
"""
from __future__ import annotations

import time
from dataclasses import dataclass, field, replace
from typing import Any

import torch
from torch import nn

from vitquant.analysis.calibrated import WEIGHT_SUFFIX, calibrate_unfrozen
from vitquant.analysis.sensitivity import elements, measure
from vitquant.calibration.data import CalibrationSet
from vitquant.config import QuantConfig
from vitquant.mixed.budget import A_LEVELS, W_LEVELS, Footprint, footprint
from vitquant.plan import SitePlan, pinned_points


@dataclass
class SensitivityTable:
    free: list[str]  # points the allocators choose for, forward order
    kind: dict[str, str]  # point → "act" | "weight"
    levels: dict[str, tuple[int | None, ...]]
    costs: dict[str, dict[int | None, dict[str, float]]]  # point → level → {"kl", "fisher", "rel_noise"}
    relevance: dict[str, float]
    footprint: Footprint
    pinned: dict[str, int | None]  # points left as the config says (count in the averages)
    probe: str  # the method the numbers were measured with
    default_bits: dict[str, int] = field(default_factory=dict)  # kind → the config's bits
    seconds: float = 0.0
    notes: list[str] = field(default_factory=list)
    excluded: set[str] = field(default_factory=set)  # outside every budget (the image site)

    def points(self, kind: str) -> list[str]:
        return [p for p in self.free if self.kind[p] == kind]

    def all_points(self, kind: str) -> list[str]:
        """Free and pinned points of a kind (what the averages are over), the image site excluded."""
        return self.points(kind) + [p for p in self.pinned if self.kind[p] == kind and p not in self.excluded]

    def to_dict(self) -> dict[str, Any]:
        return {"probe": self.probe, "seconds": self.seconds, "notes": self.notes,
                "points": {p: {"kind": self.kind[p], "elements": self.footprint.elements[p],
                               "relevance": self.relevance.get(p, 0.0),
                               "levels": {("float" if b is None else str(b)): c for b, c in self.costs[p].items()}}
                           for p in self.free},
                "pinned": {p: b for p, b in self.pinned.items()}}


def plan_bits(model: nn.Module, config: QuantConfig) -> dict[str, int | None]:
    """The plan's bits per point for `config`'s method, without calibrating."""
    from vitquant.methods import get_method
    from vitquant.models import prepare

    structure = prepare(model, extra_sites=get_method(config.method).requires_sites,
                        unknown=config.unknown_layers).structure
    return SitePlan.resolve(config, structure).points()


def method_spec(config: QuantConfig) -> str:
    """'repq-vit:reparam_head=True': the method and the options that differ from its defaults."""
    from vitquant.methods import get_method

    defaults = get_method(config.method).validate_options({})
    return config.method + "".join(f":{k}={v}" for k, v in sorted(config.options.items()) if defaults.get(k) != v)


def build_table(model: nn.Module, config: QuantConfig, calib: CalibrationSet, *, probe: QuantConfig | None = None,
                w_levels: tuple[int | None, ...] = W_LEVELS, a_levels: tuple[int | None, ...] = A_LEVELS,
                measured: bool = True, batch_size: int = 32, progress: bool = False) -> SensitivityTable:
    """probe: the config to measure with (default `config`); its bits are replaced per width."""
    from vitquant.analysis.analyzer import float_relevance

    t0 = time.perf_counter()
    probe = probe or config
    images = calib.images
    widths = sorted({b for b in (*w_levels, *a_levels) if b is not None})
    per_width: dict[int, dict[str, Any]] = {}
    first = None
    for b in widths:
        cal = calibrate_unfrozen(model, replace(probe, w_bits=b, a_bits=b), calib, progress)
        per_width[b] = measure(cal, images, batch_size, measured=measured)
        first = first or cal
    structure = first.qmodel.structure
    acts = first.qmodel.act_sites()
    counts = elements(first.qmodel, images)
    fp = footprint(first.qmodel, counts)
    pinned_names = pinned_points(config, structure)
    user_plan = SitePlan.resolve(config, structure)
    pinned: dict[str, int | None] = {}
    kind, levels, costs, free = {}, {}, {}, []
    excluded = {n for n, s in structure.sites.items() if s.role == "image"}
    # the points of the config's own method (a probe with other extra sites measures a different set)
    wanted = set(plan_bits(model, config)) if probe.method != config.method else None
    for p in first.points():
        if wanted is not None and p not in wanted:
            continue
        is_weight = p not in acts
        kind[p] = "weight" if is_weight else "act"
        if p in pinned_names:
            pinned[p] = user_plan.weight(p[: -len(WEIGHT_SUFFIX)]) if is_weight else user_plan.act(p)
            continue
        free.append(p)
        levels[p] = w_levels if is_weight else a_levels
        costs[p] = {}
        for lv in levels[p]:
            if lv is None:
                costs[p][lv] = {"kl": 0.0, "fisher": 0.0, "rel_noise": 0.0}
                continue
            s = per_width[lv].get(p)  # absent: the method leaves this point float at this width
            costs[p][lv] = {"kl": s.kl, "fisher": s.fisher, "rel_noise": s.rel_noise} if s else \
                {"kl": 0.0, "fisher": 0.0, "rel_noise": 0.0}
    notes = [f"{len(wanted - set(kind))} points of {config.method} that the probe {probe.method} does not have "
             "are left at the config's bits"] if wanted is not None and wanted - set(kind) else []
    rel = float_relevance(model, images, config, batch_size)
    name = method_spec(probe)
    table = SensitivityTable(free, kind, levels, costs, rel, fp, pinned, name,
                             {"weight": config.w_bits, "act": config.a_bits}, excluded=excluded)
    table.seconds = round(time.perf_counter() - t0, 2)
    table.notes += notes
    left = [p for p in free if all(per_width[lv].get(p) is None for lv in levels[p] if lv is not None)]
    if left:
        table.notes.append(f"{len(left)} points the method never quantizes (it keeps them float), counted at "
                           f"the bits they are given: {', '.join(left[:4])}{' …' if len(left) > 4 else ''}")
    torch.manual_seed(config.seed)
    return table
