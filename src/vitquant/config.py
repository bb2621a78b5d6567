"""Typed, validated, JSON-serializable quantization configs.

`QuantConfig` is all a user states: which method, how many bits for weights and activations, and the
method's own options (validated by the method's options dataclass, see `vitquant.methods`).
"""
from __future__ import annotations

import dataclasses
import json
import re
from dataclasses import dataclass, field
from typing import Any

from vitquant.errors import VitquantError

CONFIG_VERSION = 2
READABLE_VERSIONS = (1, 2)  # version 1 had no site_bits / keep_float / unknown_layers
MIN_BITS, MAX_BITS = 2, 8
_PRESET = re.compile(r"^w(\d+)a(\d+)$")


def _refuse_constant(token: str) -> Any:
    raise ValueError(f"{token} is not a JSON value")


def strict_json_loads(text: str) -> Any:
    """json.loads without the NaN/Infinity extension, which is not JSON and that other readers refuse."""
    return json.loads(text, parse_constant=_refuse_constant)


def parse_options(pairs: "list[str] | tuple[str, ...]", what: str = "--opt") -> dict[str, Any]:
    """key=value pairs; a value is parsed as (strict) JSON when it is JSON (numbers, true/false, lists),
    else kept as the string; the method's Options types then coerce and check it."""
    opts: dict[str, Any] = {}
    for pair in pairs:
        key, sep, value = pair.partition("=")
        if not sep or not key:
            raise VitquantError(f"{what} {pair!r} is not of the form key=value")
        try:
            opts[key] = strict_json_loads(value)
        except ValueError:  # JSONDecodeError is a ValueError, as is a NaN/Infinity token
            opts[key] = value
    return opts


def parse_site_bits(pairs: "list[str] | tuple[str, ...]") -> dict[str, int]:
    """['head*=8', 'role:image=8'] -> {'head*': 8, 'role:image': 8} (checked by QuantConfig)."""
    out: dict[str, int] = {}
    for pair in pairs:
        glob, sep, bits = pair.rpartition("=")
        if not sep or not glob or not bits.strip().isdigit():
            raise VitquantError(f"--site-bits {pair!r} is not of the form GLOB=BITS (e.g. 'head*=8')")
        out[glob] = int(bits)
    return out


def parse_method_spec(spec: str) -> tuple[str, dict[str, Any]]:
    """'repq-vit' or 'repq-vit:reparam_head=true:other=1' -> (method name, options)."""
    name, *pairs = spec.split(":")
    return name, parse_options(pairs, what=f"method option in {spec!r}:")


def parse_bits(preset: str) -> tuple[int, int]:
    """'w4a4' -> (4, 4). Raises VitquantError naming the accepted form."""
    m = _PRESET.match(preset.strip().lower())
    if not m:
        raise VitquantError(f"bits preset {preset!r} is not of the form 'wXaY' (e.g. w8a8, w4a4, w4a8)")
    w, a = int(m.group(1)), int(m.group(2))
    for kind, b in (("weight", w), ("activation", a)):
        if not MIN_BITS <= b <= MAX_BITS:
            raise VitquantError(
                f"bits preset {preset!r}: {kind} bits must be between {MIN_BITS} and {MAX_BITS}, got {b}"
            )
    return w, a


@dataclass
class QuantConfig:
    """What to quantize and how.

    method: a registered method name (`vitquant list` shows them).
    w_bits / a_bits: bits of Linear/Conv weights and of matmul inputs (the papers' "WxAy").
    patch_embed_input_bits: bits of the image fed to the patch-embedding conv (8 as RepQ-ViT does;
        None keeps it float, as PTQ4ViT does).
    calib_size: number of calibration images used (the papers use 32).
    seed: picks the calibration images and seeds any randomness in a method.
    options: method-specific options, validated by the method.
    deployable: calibrate only quantizers an integer runtime runs exactly (affine grids of ≤ 8 bits), so
        the exported ONNX model computes what was evaluated (see vitquant.methods.deployable).
    site_bits: {glob: bits} per-site overrides (site names, '<layer>.weight', or 'role:<role>'), see plan.py.
    keep_float: globs of sites/weights left float.
    unknown_layers: "refuse" a model with weighted ops the core does not understand (default), or leave
        them "float" and list them in the report.
    """

    method: str = "repq-vit"
    w_bits: int = 8
    a_bits: int = 8
    patch_embed_input_bits: int | None = 8
    calib_size: int = 32
    seed: int = 0
    options: dict[str, Any] = field(default_factory=dict)
    deployable: bool = False
    site_bits: dict[str, int] = field(default_factory=dict)
    keep_float: list[str] = field(default_factory=list)
    unknown_layers: str = "refuse"
    version: int = CONFIG_VERSION

    def __post_init__(self) -> None:
        if not isinstance(self.method, str) or not self.method:
            raise VitquantError(f"method must be a method name (see `vitquant list`), got {self.method!r}")
        if not isinstance(self.options, dict):
            raise VitquantError(f"options must be a mapping of option names to values, got {self.options!r}")
        if not isinstance(self.seed, int) or isinstance(self.seed, bool) or not -2**63 <= self.seed < 2**64:
            raise VitquantError(f"seed must be an integer that fits 64 bits (torch seeds its generators with it), "
                                f"got {self.seed!r}")
        for name in ("w_bits", "a_bits"):
            b = getattr(self, name)
            if not isinstance(b, int) or not MIN_BITS <= b <= MAX_BITS:
                raise VitquantError(f"{name} must be an integer between {MIN_BITS} and {MAX_BITS}, got {b!r}")
        b = self.patch_embed_input_bits
        if b is not None and (not isinstance(b, int) or not MIN_BITS <= b <= MAX_BITS):
            raise VitquantError(f"patch_embed_input_bits must be None or {MIN_BITS}..{MAX_BITS}, got {b!r}")
        if not isinstance(self.calib_size, int) or isinstance(self.calib_size, bool) or self.calib_size < 1:
            raise VitquantError(f"calib_size must be a positive integer, got {self.calib_size!r}")
        if not isinstance(self.deployable, bool):
            raise VitquantError(f"deployable must be True or False, got {self.deployable!r}")
        if self.version not in READABLE_VERSIONS:
            raise VitquantError(f"config version {self.version} is not supported (this vitquant reads {READABLE_VERSIONS})")
        self.version = CONFIG_VERSION
        if not isinstance(self.site_bits, dict) or not all(
                isinstance(k, str) and k and isinstance(v, int) and not isinstance(v, bool) and MIN_BITS <= v <= MAX_BITS
                for k, v in self.site_bits.items()):
            raise VitquantError(f"site_bits must map site patterns to bits in {MIN_BITS}..{MAX_BITS}, got {self.site_bits!r}")
        if isinstance(self.keep_float, str) or not all(isinstance(k, str) and k for k in self.keep_float):
            raise VitquantError(f"keep_float must be a list of site patterns, got {self.keep_float!r}")
        self.keep_float = list(self.keep_float)
        if self.unknown_layers not in ("refuse", "float"):
            raise VitquantError(f"unknown_layers must be 'refuse' or 'float', got {self.unknown_layers!r}")
        from vitquant.methods import get_method  # late: methods import config

        self.options = get_method(self.method).validate_options(self.options)

    @classmethod
    def preset(cls, bits: str, method: str = "repq-vit", **kwargs: Any) -> "QuantConfig":
        w, a = parse_bits(bits)
        return cls(method=method, w_bits=w, a_bits=a, **kwargs)

    @property
    def bits_name(self) -> str:
        return f"W{self.w_bits}A{self.a_bits}"

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), indent=2, sort_keys=True, allow_nan=False)

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> "QuantConfig":
        if not isinstance(d, dict):
            raise VitquantError(f"a quantization config is a JSON object, got {type(d).__name__}")
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = set(d) - known
        if unknown:
            raise VitquantError(f"unknown quantization config keys: {sorted(unknown)}")
        return cls(**d)
