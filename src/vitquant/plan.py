"""The per-site plan: how many bits every activation site and every weight gets, resolved once.

From a `QuantConfig` and a model's `Structure`, before calibration:
1. defaults: activations `a_bits`, the image (role "image") `patch_embed_input_bits`, weights `w_bits`;
2. `site_bits` {glob: bits} in order: a glob matches site names ("blocks.0.attn.qkv.input",
   "blocks.3.attn.softmax"), weight names ("head.weight"), or a role as "role:post_softmax";
3. `keep_float` globs: those stay float (bits None).
Every glob must match something (a typo is an error, not a silent no-op). Methods read the plan
(`act(site)`, `weight(layer)`); a site with None is left float and listed in the saved config.

A per-point plan (mixed precision, vitquant.mixed) is written as exact names (`exact_glob`) in the same
two fields, so a saved config replays it with no new format: `with_point_bits`.
"""
from __future__ import annotations

import re
from dataclasses import dataclass, field, replace
from fnmatch import fnmatchcase
from typing import TYPE_CHECKING

from vitquant.errors import VitquantError

if TYPE_CHECKING:
    from vitquant.config import QuantConfig
    from vitquant.models.structure import Structure


def _matches(glob: str, name: str, role: str | None) -> bool:
    if glob.startswith("role:"):
        return role is not None and fnmatchcase(role, glob[5:])
    return fnmatchcase(name, glob)


@dataclass(frozen=True)
class SitePlan:
    acts: dict[str, int | None] = field(default_factory=dict)
    weights: dict[str, int | None] = field(default_factory=dict)
    deployable: bool = False

    def act(self, site: str) -> int | None:
        return self.acts.get(site)

    def weight(self, layer: str) -> int | None:
        return self.weights.get(layer)

    def points(self) -> dict[str, int | None]:
        """Every quantization point → bits: site names, and '<layer>.weight' for weights."""
        return {**self.acts, **{f"{n}.weight": b for n, b in self.weights.items()}}

    @property
    def float_sites(self) -> list[str]:
        return [n for n, b in self.acts.items() if b is None] + [f"{n}.weight" for n, b in self.weights.items() if b is None]

    @classmethod
    def resolve(cls, config: "QuantConfig", structure: "Structure") -> "SitePlan":
        acts = {n: (config.patch_embed_input_bits if s.role == "image" else config.a_bits)
                for n, s in structure.sites.items()}
        weights: dict[str, int | None] = {n: config.w_bits for n in structure.layers}
        roles = {n: s.role for n, s in structure.sites.items()}

        def apply(glob: str, bits: int | None, what: str) -> None:
            hit = False
            for n in acts:
                if _matches(glob, n, roles[n]):
                    acts[n], hit = bits, True
            for n in weights:
                if not glob.startswith("role:") and (fnmatchcase(f"{n}.weight", glob) or fnmatchcase(n, glob)):
                    weights[n], hit = bits, True
            if not hit:
                example = next(iter(acts), "blocks.0.attn.qkv.input")
                raise VitquantError(f"{what} {glob!r} matches no quantization site of this model (site names look "
                                    f"like {example!r}, weights like '<layer>.weight', roles like 'role:head')")

        for glob, bits in config.site_bits.items():
            apply(glob, bits, "site_bits pattern")
        for glob in config.keep_float:
            apply(glob, None, "keep_float pattern")
        return cls(acts, weights, config.deployable)


def exact_glob(name: str) -> str:
    """A glob that matches exactly `name` (fnmatch has no escape: each metacharacter goes in brackets)."""
    return re.sub(r"([*?\[])", r"[\1]", name)


def pinned_points(config: "QuantConfig", structure: "Structure") -> set[str]:
    """Points a user's own `site_bits`/`keep_float` globs decide ('<layer>.weight' for weights), and the
    image site (its bits are `patch_embed_input_bits`): an allocator leaves these as they are."""
    globs = [*config.site_bits, *config.keep_float]
    out = {n for n, s in structure.sites.items() if s.role == "image" or any(_matches(g, n, s.role) for g in globs)}
    for layer in structure.layers:
        if any(not g.startswith("role:") and (fnmatchcase(f"{layer}.weight", g) or fnmatchcase(layer, g))
               for g in globs):
            out.add(f"{layer}.weight")
    return out


def with_point_bits(config: "QuantConfig", bits: dict[str, int | None]) -> "QuantConfig":
    """`config` with these points (site names, '<layer>.weight') at these bits (None: float), appended
    after the config's own globs as exact names; points already at the config's default are not listed."""
    site_bits = dict(config.site_bits)
    keep_float = list(config.keep_float)
    for point, b in bits.items():
        default = config.w_bits if point.endswith(".weight") else config.a_bits
        if b is None:
            keep_float.append(exact_glob(point))
        elif b != default:
            site_bits[exact_glob(point)] = b
    return replace(config, site_bits=site_bits, keep_float=keep_float)
