"""`prepare(model)`: any float model → a `QuantizedModel` with every site found, all uncalibrated.

1. Copy the model; fuse structural-reparameterization blocks (MobileOne, RepMixer); replace every module
   that has a registered twin (Linear, Conv2d, MultiheadAttention); fold BatchNorms that only read a
   layer's output into it (rewrites.py; each verified, the model is traced again if any was folded).
2. Trace one forward (trace.py); `discover` which calls become sites and what is not understood.
3. Install the handlers on their owner modules (dispatch.py) with their sites, named after the owner.
4. Trace again through the installed handlers: roles, cores, units, heads and scale-mapping
   candidates (structure_from_trace); verify each mapping exact in float64 (mappings.py).
Layers the core does not understand are refused, naming them, or with `unknown="float"` left float
and listed in `structure.float_ops` (and so in every report).
"""
from __future__ import annotations

import copy

import torch
from torch import nn

from vitquant.errors import VitquantError
from vitquant.models import mha as _mha  # noqa: F401  (registers the MultiheadAttention twin)
from vitquant.models.derive import structure_from_trace
from vitquant.models.discover import HandlerSpec, discover
from vitquant.models.dispatch import make_owner
from vitquant.models.handlers import AttentionSites, ForeignCall, MatmulSites, OpSites
from vitquant.models.io import input_size_of, logits_of
from vitquant.models.mappings import bypass_all, verify_mappings
from vitquant.models.qmodules import ActSite, QuantConv2d, QuantLinear, twin_class
from vitquant.models.quantized import QuantizedModel
from vitquant.models.fold import reparameterize_blocks
from vitquant.models.rewrites import fold_batchnorms
from vitquant.models.roles import EXTRA_SITES
from vitquant.models.trace import Tracer

UNKNOWN_CHOICES = ("refuse", "float")
SIDECAR = "vq_twin"  # the child name of a twin kept beside a module that has a forward of its own


def install_twins(model: nn.Module) -> dict[str, nn.Module]:
    """Swap modules for their quantized twins in place (outermost first); returns path → twin layer."""
    replaced: list[str] = []
    for path, module in list(model.named_modules()):
        if path == "" or any(path.startswith(p + ".") for p in replaced):
            continue
        cls, replaces = twin_class(module)
        if cls is None:
            continue
        try:
            twin = cls.from_float(module, path if replaces else f"{path}.{SIDECAR}")
        except (ValueError, VitquantError) as e:
            raise VitquantError(f"cannot quantize {path} ({type(module).__name__}): {e}") from None
        if replaces:
            parent, _, child = path.rpartition(".")
            setattr(model.get_submodule(parent) if parent else model, child, twin)
        else:  # the module keeps its own forward; its weight's calls are routed to the sidecar twin
            module.add_module(SIDECAR, twin)
        replaced.append(path)
    layers = {}
    for path, module in model.named_modules():
        if isinstance(module, (QuantLinear, QuantConv2d)):
            module.name = path
            module.input_site.name = f"{path}.input"
            layers[path] = module
    return layers


def run_trace(model: nn.Module, example: torch.Tensor, layers: set[str]):
    names = {id(m): n for n, m in model.named_modules()}
    tracer = Tracer(names, layers, ActSite)
    handles = []
    for m in model.modules():  # per-module hooks with kwargs: a unit's full call signature is recorded
        handles.append(m.register_forward_pre_hook(tracer.pre_hook, with_kwargs=True))
        handles.append(m.register_forward_hook(tracer.post_hook, with_kwargs=True, always_call=True))
    x = example.clone()
    tracer.mark_input(x)
    try:
        with torch.no_grad(), tracer:
            out = model(x)
        tracer.rec.output = tracer.get(logits_of(out))
    except VitquantError:
        raise
    except Exception as e:  # noqa: BLE001 - the model's own forward failed on the example input
        raise VitquantError(f"the model's forward failed on an example input of shape {tuple(example.shape)}: "
                            f"{type(e).__name__}: {e}") from None
    finally:
        for h in handles:
            h.remove()
    return tracer.rec


def _example(model: nn.Module, input_size: tuple[int, ...] | None) -> torch.Tensor:
    size = input_size or input_size_of(model)
    if size is None:
        raise VitquantError(f"cannot tell the input size of this {type(model).__name__}; pass input_size=(C, H, W)")
    param = next(model.parameters(), None)
    device = param.device if param is not None else torch.device("cpu")
    dtype = param.dtype if param is not None and param.is_floating_point() else torch.float32
    return torch.randn(2, *size, generator=torch.Generator().manual_seed(0)).to(device=device, dtype=dtype)


def _site_base(owner: str, j: int, n: int) -> str:
    base = owner if n == 1 else f"{owner}.attn{j}" if owner else f"attn{j}"
    return base or "attention"


def install_handlers(model: nn.Module, disc, layers: dict[str, nn.Module], rec) -> dict[str, dict]:
    """Create each owner's handlers with their named sites; returns what derive needs per handler."""
    meta: dict[str, dict] = {}
    for owner, specs in disc.handlers.items():
        module = model.get_submodule(owner) if owner else model
        calls = {key: disc.first_call[(owner, key)] for key in specs}
        pv_of = {calls[k]: k for k, s in specs.items() if s.kind == "matmul" and calls[k] in disc.pairs}
        core_keys = [k for k in sorted(specs, key=lambda k: calls[k])
                     if specs[k].kind == "attention" or calls[k] in pv_of]
        handlers = {}
        for j, key in enumerate(core_keys):
            base = _site_base(owner, j, len(core_keys))
            spec = specs[key]
            if spec.kind == "attention":
                handlers[key] = AttentionSites(base, scores=spec.scores)
                meta[f"{owner}:{key}"] = {"core": base, "kind": "sdpa"}
            else:
                qk_call = disc.pairs[calls[key]]
                qk_key = next(k for k in specs if calls[k] == qk_call)
                handlers[qk_key] = MatmulSites(f"{base}.q", f"{base}.k")
                handlers[key] = MatmulSites(f"{base}.softmax", f"{base}.v")
                meta[f"{owner}:{qk_key}"] = {"core": base, "kind": "qk"}
                meta[f"{owner}:{key}"] = {"core": base, "kind": "pv"}
        extra_count: dict[str, int] = {}
        for key, spec in sorted(specs.items(), key=lambda kv: calls[kv[0]]):
            if key in handlers:
                continue
            if spec.kind == "matmul":
                i = extra_count["matmul"] = extra_count.get("matmul", -1) + 1
                stem = f"{owner}.matmul{i}" if owner else f"matmul{i}"
                handlers[key] = MatmulSites(f"{stem}.a", f"{stem}.b")
                meta[f"{owner}:{key}"] = {"core": None, "kind": "matmul"}
            elif spec.kind == "foreign":
                handlers[key] = ForeignCall(layers[spec.twin])
            elif spec.kind == "op":
                names = []
                for role in (spec.role, spec.operand_role):
                    if role is None:
                        names.append(None)
                        continue
                    i = extra_count[role] = extra_count.get(role, -1) + 1
                    stem = f"{role}{i}" if role == "residual" else role
                    names.append(f"{owner}.{stem}" if owner else stem)
                handlers[key] = OpSites((names[0], spec.role) if spec.role else None,
                                        (names[1], spec.operand_role, spec.index) if spec.operand_role else None)
        make_owner(module, handlers)
    return meta


def _add_output_sites(layers: dict[str, nn.Module], twin_outputs: dict[str, str]) -> None:
    for twin, role in twin_outputs.items():
        if twin in layers:
            layers[twin].output_site = ActSite(f"{twin}.output", role)


class _ForceExplicit:
    """A tap that makes attention handlers compute explicitly (so the tracer sees every site)."""

    output_only = False

    def record(self, kind, **tensors) -> None:
        pass


def prepare(model: nn.Module, source: dict | None = None, extra_sites: tuple[str, ...] = (),
            unknown: str = "refuse", input_size: tuple[int, ...] | None = None, fold_bn: bool = True) -> QuantizedModel:
    """Copy `model` and make it quantizable: twins, sites, structure (all uncalibrated).

    extra_sites: opt-in site groups of fully quantized methods (roles.EXTRA_SITES).
    unknown: "refuse" (default) raises on a weighted op the core does not understand, naming it;
        "float" leaves it float and lists it in `structure.float_ops`.
    """
    if unknown not in UNKNOWN_CHOICES:
        raise VitquantError(f"unknown must be one of {UNKNOWN_CHOICES}, got {unknown!r}")
    bad = sorted(set(extra_sites) - set(EXTRA_SITES))
    if bad:
        raise VitquantError(f"unknown extra quantization sites {bad}; known: {EXTRA_SITES}")
    if not isinstance(model, nn.Module):
        raise VitquantError(f"expected a torch nn.Module, got {type(model).__name__}")
    model = copy.deepcopy(model).eval()
    example = _example(model, input_size)
    rewrites = [f"{b}: reparameterized" for b in reparameterize_blocks(model)]
    layers = install_twins(model)
    if not layers:
        raise VitquantError(f"{type(model).__name__} has no Linear or Conv2d layer to quantize")
    bypass_all(model)  # traces run the float function
    rec1 = run_trace(model, example, set(layers))
    folded = fold_batchnorms(model, rec1, layers, example) if fold_bn else []
    if folded:
        rewrites += [f"{f}: BatchNorm folded" for f in folded]
        rec1 = run_trace(model, example, set(layers))
    disc = discover(rec1, {id(t.weight): p for p, t in layers.items()}, set(extra_sites))
    if disc.unknown and unknown == "refuse":
        shown = "; ".join(disc.unknown[:4]) + (f"; and {len(disc.unknown) - 4} more" if len(disc.unknown) > 4 else "")
        raise VitquantError(f"{type(model).__name__}: vitquant does not understand {shown}. Pass unknown='float' "
                            "(CLI: --unknown-layers float) to leave these float and list them in the report")
    if extra_sites and any(s.kind == "matmul" for specs in disc.handlers.values() for s in specs.values()) \
            and "attn_scores" in extra_sites:
        raise VitquantError(f"{type(model).__name__} computes attention with explicit matmuls (not "
                            "F.scaled_dot_product_attention): the attention-scores site these methods need is "
                            "only available for SDPA attention")
    _add_output_sites(layers, disc.twin_outputs)
    meta = install_handlers(model, disc, layers, rec1)
    make_owner(model, None)  # the dispatch mode is active for the whole forward, as while tracing
    taps = [m for m in model.modules() if isinstance(m, AttentionSites)]
    for t in taps:
        t.tap = _ForceExplicit()
    bypass_all(model)  # the new handler sites too
    try:
        rec2 = run_trace(model, example, set(layers))
    finally:
        for t in taps:
            t.tap = None
    structure = structure_from_trace(model, rec2, meta, layers, disc, tuple(example.shape[1:]), tuple(extra_sites))
    structure.rewrites = rewrites
    verify_mappings(model, structure, example)
    for unit in structure.units:
        make_owner(model.get_submodule(unit.name) if unit.name else model, None)
    bypass_all(model, False)
    qmodel = QuantizedModel(model, structure, source)
    for name in set(layers) - set(structure.layers):  # never called, or computing constants only: float
        layers[name].bypass = True
        layers[name].input_site.bypass = True
    return qmodel


__all__ = ["HandlerSpec", "prepare", "install_twins", "UNKNOWN_CHOICES"]
