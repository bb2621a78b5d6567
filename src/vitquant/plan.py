"""The per-site plan: how many bits every activation site and every weight gets, resolved once.

From a `QuantConfig` and a model's `Structure`, before calibration:
1. defaults: activations `a_bits`, the image (role "image") `patch_embed_input_bits`, weights `w_bits`;
2. `site_bits` {glob: bits} in order: a glob matches site names ("blocks.0.attn.qkv.input",
   "blocks.3.attn.softmax"), weight names ("head.weight"), or a role as "role:post_softmax";
3. `keep_float` globs: those stay float (bits None).
Every glob must match something (a typo is an error, not a silent no-op). Methods read the plan
(`act(site)`, `weight(layer)`); a site with None is left float and listed in the saved config.
"""
from __future__ import annotations

from dataclasses import dataclass, field
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
