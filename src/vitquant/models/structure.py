"""What a traced forward tells about a model: its sites, cores, units, heads and scale mappings.

`Structure` is the one place architecture knowledge lives; methods ask it (never a module's attribute
names) which sites exist and what they see (`SiteInfo.role`), which layers form an attention core,
which units to iterate over in forward order, and which norm → layers scale transfers are exact.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from vitquant.models import roles


@dataclass(frozen=True)
class SiteInfo:
    name: str
    role: str
    consumer: str  # "layer" (a Linear/Conv input), "matmul_a"/"matmul_b" (operand), "output", "operand"
    producer: str  # the trace.Prov kind of the tensor it sees: input, norm, softmax, gelu, attn, residual…
    producer_module: str | None
    layer: str | None = None  # the weight layer it feeds (consumer "layer")
    core: str | None = None  # the attention core it belongs to
    heads_axis: int | None = None  # axis of the attention heads in what it sees ([B, H, …] operands)


@dataclass(frozen=True)
class Core:
    """One attention: Q·Kᵀ (q, k), softmax, probs·V (softmax, v); `scores` only with the opt-in site."""

    name: str
    owner: str  # the module whose forward computes it
    q: str
    k: str
    v: str
    softmax: str
    scores: str | None
    handlers: tuple[str, ...]  # handler module paths (one SDPA, or Q·Kᵀ and probs·V)
    fused: bool  # computed by F.scaled_dot_product_attention
    heads: int = 1  # size of the heads axis of q ([B, H, N, d]); 1 for 3-D operands


@dataclass(frozen=True)
class Unit:
    """A module run as a whole by sequential/reconstruction methods (a transformer block, a stem layer)."""

    name: str
    layers: tuple[str, ...]
    cores: tuple[str, ...]
    chained: bool  # called like the previous unit (same class and arguments) on its output, nothing in between


@dataclass(frozen=True)
class ScaleMapping:
    """A norm whose output feeds only these layers, through channel-preserving ops: a per-channel
    scale/shift can move from the norm into them exactly (llm-compressor's ResolvedMapping). Verified
    function-preserving on the model at run time (mappings.py)."""

    norm: str
    layers: tuple[str, ...]
    channel_axis: int  # -1: LayerNorm over the last dim → Linear; 1: a 2-D norm → 1×1 conv


@dataclass
class Structure:
    sites: dict[str, SiteInfo] = field(default_factory=dict)
    layers: list[str] = field(default_factory=list)  # weight layers, forward order
    cores: list[Core] = field(default_factory=list)
    units: list[Unit] = field(default_factory=list)
    mappings: list[ScaleMapping] = field(default_factory=list)
    heads: tuple[str, ...] = ()
    fused_qkv: dict[str, int] = field(default_factory=dict)  # layer → number of q/k/v parts in its output
    float_ops: list[str] = field(default_factory=list)  # left float and reported (with reasons)
    rejected_mappings: dict[str, str] = field(default_factory=dict)  # norm → why no mapping
    input_shape: tuple[int, ...] = ()
    patch_tokens: int | None = None  # positions the image layer outputs (tokens beyond these are prefix tokens)
    extra_sites: tuple[str, ...] = ()
    float_norm_inputs: list[str] = field(default_factory=list)  # norms whose input the extra sites miss
    rewrites: list[str] = field(default_factory=list)  # float rewrites applied first (BatchNorm folds, reparam)

    def role(self, site: str) -> str:
        return self.sites[site].role

    def sites_with_role(self, *wanted: str) -> list[str]:
        return [n for n, s in self.sites.items() if s.role in wanted]

    def layer_input(self, layer: str) -> str:
        return f"{layer}.input"

    def core(self, name: str) -> Core:
        return next(c for c in self.cores if c.name == name)

    def unit(self, name: str) -> Unit:
        return next(u for u in self.units if u.name == name)

    def unit_of(self, layer: str) -> Unit | None:
        return next((u for u in self.units if layer in u.layers), None)

    def summary(self) -> dict[str, Any]:
        counts: dict[str, int] = {}
        for s in self.sites.values():
            counts[s.role] = counts.get(s.role, 0) + 1
        return {"layers": len(self.layers), "cores": len(self.cores), "units": len(self.units),
                "mappings": len(self.mappings), "site_roles": counts, "float_ops": list(self.float_ops),
                "rewrites": list(self.rewrites)}


def input_role(producer: str, layer: str, heads: tuple[str, ...]) -> str:
    return roles.role_of_input(producer, layer in heads)
