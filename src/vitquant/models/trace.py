"""One forward on an example input, recorded: where every tensor came from, and every call that matters.

A `TorchFunctionMode` sees each torch function call of the forward (not the calls nested inside one,
exactly like the run-time dispatcher, dispatch.py); global module hooks keep the stack of running
modules. For each tensor the tracer keeps a `Prov`: does it depend on the input, what produced it
(the image, a norm, softmax, GELU, an attention, a residual sum …), and through channel-preserving ops
only (reshape, permute, slicing, window partition, roll, pad, dropout, token mean) which norm's output
it still is. From that, structure.py derives roles, scale-transfer mappings, cores, units and heads.

Nothing here knows an architecture: it reads torch function names and module types only.
"""
from __future__ import annotations

import weakref
from dataclasses import dataclass, field, replace
from typing import Any

import torch
from torch import nn
from torch.overrides import TorchFunctionMode
from torch.utils._pytree import tree_flatten

from vitquant.models.dispatch import INTERCEPT

# ops that keep every channel's values (possibly moved, selected, padded or averaged over positions):
# a per-channel affine map of their input is the same map of their output (pad: checked at run time)
CHANNEL_PRESERVING = {
    "view", "reshape", "flatten", "unflatten", "permute", "transpose", "t", "contiguous", "clone", "__getitem__",
    "narrow", "select", "squeeze", "unsqueeze", "expand", "expand_as", "roll", "pad", "_pad", "dropout", "dropout1d",
    "dropout2d", "dropout3d", "alpha_dropout", "feature_alpha_dropout", "to", "float", "type_as", "detach", "movedim",
    "moveaxis", "swapaxes", "swapdims", "split", "chunk", "unbind", "tensor_split", "split_with_sizes", "mean",
    "view_as", "reshape_as", "as_strided", "identity", "repeat",
}
# resampling ops: the output is still the same kind of tensor (an image, a norm output), not channel-exact
KIND_PRESERVING = {"unfold", "fold", "interpolate", "upsample", "avg_pool1d", "avg_pool2d", "adaptive_avg_pool1d",
                   "adaptive_avg_pool2d", "max_pool2d", "adaptive_max_pool2d", "pixel_shuffle", "pixel_unshuffle"}
NORM_FUNCS = {"layer_norm": "norm", "group_norm": "norm", "rms_norm": "norm", "instance_norm": "norm",
              "batch_norm": "batchnorm"}
ACTIVATIONS = {"gelu": "gelu", "silu": "act", "relu": "act", "relu_": "act", "relu6": "act", "hardswish": "act",
               "hardsigmoid": "act", "leaky_relu": "act", "elu": "act", "mish": "act", "sigmoid": "act", "tanh": "act",
               "softplus": "act", "selu": "act", "celu": "act"}
SOFTMAX = {"softmax", "_softmax"}
ELEMENTWISE = {"add", "__add__", "__radd__", "__iadd__", "add_", "sub", "__sub__", "__rsub__", "__isub__", "sub_",
               "mul", "__mul__", "__rmul__", "__imul__", "mul_", "div", "__truediv__", "__rtruediv__", "__itruediv__",
               "div_", "sum", "where"}
ADDS = {"add", "__add__", "__radd__", "__iadd__", "add_", "sub", "__sub__", "__rsub__", "__isub__", "sub_"}
MULS = {"mul", "__mul__", "__rmul__", "__imul__", "mul_", "div", "__truediv__", "__itruediv__", "div_"}
RESET_HEADS = {"norm", "batchnorm", "softmax", "matmul", "attn"}
WEIGHTED = {"conv1d", "conv3d", "conv_transpose1d", "conv_transpose2d", "conv_transpose3d", "bilinear", "embedding",
            "einsum", "baddbmm", "addmm", "addbmm", "linear", "conv2d"}


@dataclass(frozen=True)
class Prov:
    act: bool  # depends on the model input
    kind: str = "const"  # input, norm, batchnorm, softmax, gelu, act, attn, matmul, linear, conv, residual, gated, other
    src: str | None = None  # the module that produced it (norm, twin, attention owner)
    prob: bool = False  # a softmax output, or a combination of them (rows of probabilities)
    cp_norm: str | None = None  # the norm whose output this still is through channel-preserving ops
    heads: frozenset = frozenset()  # the weight layers whose output this is, through non-mixing ops
    qk: int | None = None  # the Q·Kᵀ call this derives from (pairs eager Q·Kᵀ with its probs·V)
    cp_add: int | None = None  # the add call whose result this still is through channel-preserving ops
    cp_embed: int | None = None  # the token-join call (or patch tokens) this still is, for FQ-ViT's embed sites
    branch: str | None = None  # the layer whose output this is through channel-preserving/constant-scale ops


CONST = Prov(act=False)
DEBUG = False


@dataclass
class Call:
    index: int
    name: str  # function name
    kind: str | None  # dispatch kind (sdpa, matmul, linear, conv, add, cat) or None
    stack: tuple[tuple[str, int], ...]  # (module path, invocation number), outermost first
    operands: list[Prov]
    params: list[bool]  # operand i is an nn.Parameter itself
    out: list[Prov]
    weight: Any = None  # for linear/conv: the weight tensor's id


@dataclass
class ModuleCall:
    path: str
    invocation: int
    order: int
    in_ids: list[int]
    out_ids: list[int]
    out_is_tensor: bool
    in_prov: list[Prov]
    signature: str = ""  # the call's non-tensor arguments and where its tensors go (args/kwargs)


@dataclass
class TraceRecord:
    calls: list[Call] = field(default_factory=list)
    modules: list[ModuleCall] = field(default_factory=list)
    site_prov: dict[str, Prov] = field(default_factory=dict)  # ActSite name → what it saw
    site_ndim: dict[str, int] = field(default_factory=dict)
    site_shape: dict[str, tuple[int, ...]] = field(default_factory=dict)
    layer_out_shape: dict[str, tuple[int, ...]] = field(default_factory=dict)
    layer_in: dict[str, Prov] = field(default_factory=dict)  # twin path → its input
    layer_out: dict[str, Prov] = field(default_factory=dict)
    layer_calls: dict[str, int] = field(default_factory=dict)
    norm_in: dict[str, list[Prov]] = field(default_factory=dict)  # norm path → input provenance per call
    norm_uses: dict[str, list[str]] = field(default_factory=dict)  # norm → "consumer twin" or "!op" per use
    layer_uses: dict[str, list[tuple[str, str]]] = field(default_factory=dict)  # twin → (op, module) per use
    output: Prov | None = None
    output_ids: list[int] = field(default_factory=list)
    input_id: int = 0


def _norm_kind(module: nn.Module) -> str | None:
    if isinstance(module, nn.modules.batchnorm._BatchNorm):
        return "batchnorm"
    name = type(module).__name__
    if isinstance(module, (nn.LayerNorm, nn.GroupNorm)) or (
            "Norm" in name and "Act" not in name and not list(module.children())):
        return "norm"
    return None


def _act_kind(module: nn.Module) -> str | None:
    name = type(module).__name__.lower()
    if "gelu" in name:
        return "gelu"
    if any(a in name for a in ("silu", "swish", "relu", "hardswish", "sigmoid", "mish")) and not list(module.children()):
        return "act"
    return None


class Tracer(TorchFunctionMode):
    """Records one forward. `names` maps module ids to paths; `twin_paths` are the quantized twins;
    `site_type` is ActSite (what each site sees is recorded)."""

    def __init__(self, names: dict[int, str], twin_paths: set[str], site_type: type) -> None:
        super().__init__()
        self.names, self.twin_paths, self.site_type = names, set(twin_paths), site_type
        self.prov: dict[int, tuple[weakref.ref, Prov]] = {}
        self.serials: dict[int, tuple[weakref.ref, int]] = {}
        self.counter = 0
        self.stack: list[tuple[str, int]] = []
        self.invocations: dict[str, int] = {}
        self.rec = TraceRecord()
        self._module_calls: list[ModuleCall] = []
        self._open: list[tuple[nn.Module, ModuleCall | None]] = []

    # -- provenance table ---------------------------------------------------------------------------
    def get(self, t: torch.Tensor) -> Prov:
        entry = self.prov.get(id(t))
        if entry is not None and entry[0]() is t:
            return entry[1]
        return CONST

    def set(self, t: torch.Tensor, p: Prov) -> None:
        key = id(t)
        try:
            ref = weakref.ref(t, lambda _r, key=key: self.prov.pop(key, None))
        except TypeError:
            return
        self.prov[key] = (ref, p)

    def tid(self, t: torch.Tensor) -> int:
        """A serial number for `t` that is never reused (ids of freed tensors are)."""
        key = id(t)
        entry = self.serials.get(key)
        if entry is not None and entry[0]() is t:
            return entry[1]
        self.counter += 1
        try:
            self.serials[key] = (weakref.ref(t, lambda _r, key=key: self.serials.pop(key, None)), self.counter)
        except TypeError:
            pass
        return self.counter

    def mark_input(self, x: torch.Tensor) -> None:
        self.set(x, Prov(act=True, kind="input"))
        self.rec.input_id = self.tid(x)

    # -- module stack -------------------------------------------------------------------------------
    def pre_hook(self, module: nn.Module, args: Any, kwargs: dict | None = None) -> None:
        path = self.names.get(id(module))
        if path is None:
            self._open.append((module, None))
            return
        n = self.invocations.get(path, 0)
        self.invocations[path] = n + 1
        self.stack.append((path, n))
        leaves, spec = tree_flatten((args, kwargs or {}))
        tensors = [a for a in leaves if isinstance(a, torch.Tensor)]
        signature = repr((spec, [None if isinstance(a, torch.Tensor) else repr(a)[:80] for a in leaves]))
        mc = ModuleCall(path, n, len(self.rec.modules), [self.tid(t) for t in tensors], [], False,
                        [self.get(t) for t in tensors], signature)
        self.rec.modules.append(mc)
        self._open.append((module, mc))
        if isinstance(module, self.site_type) and tensors:
            self.rec.site_prov.setdefault(module.name, self.get(tensors[0]))
            self.rec.site_ndim.setdefault(module.name, tensors[0].dim())
            self.rec.site_shape.setdefault(module.name, tuple(tensors[0].shape))
        if path in self.twin_paths and tensors:
            self.rec.layer_in.setdefault(path, self.get(tensors[0]))
            self.rec.layer_calls[path] = self.rec.layer_calls.get(path, 0) + 1
        if _norm_kind(module) is not None and tensors:
            self.rec.norm_in.setdefault(path, []).append(self.get(tensors[0]))

    def post_hook(self, module: nn.Module, args: Any, *rest: Any) -> None:
        output = rest[-1]  # (output) or (kwargs, output)
        if not self._open or self._open[-1][0] is not module:
            return
        _, mc = self._open.pop()
        if mc is None:
            return
        self.stack.pop()
        outs = [o for o in tree_flatten(output)[0] if isinstance(o, torch.Tensor)]
        mc.out_ids = [self.tid(o) for o in outs]
        first = output[0] if isinstance(output, (tuple, list)) and output else output
        mc.out_is_tensor = isinstance(first, torch.Tensor)
        if not outs:
            return
        out = outs[0]
        p = self.get(out)
        if mc.path in self.twin_paths:
            self.rec.layer_out.setdefault(mc.path, p)
            self.rec.layer_out_shape.setdefault(mc.path, tuple(out.shape))
        norm = _norm_kind(module)
        if norm is not None and p.act:
            self.set(out, replace(p, kind=norm, src=mc.path, cp_norm=mc.path, heads=frozenset(), branch=None,
                                  cp_add=None, cp_embed=None))
        elif _act_kind(module) is not None and p.act and p.kind not in ("gelu", "act"):
            self.set(out, replace(p, kind=_act_kind(module), src=mc.path, cp_norm=None, cp_add=None, branch=None))

    # -- calls --------------------------------------------------------------------------------------
    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        out = func(*args, **kwargs)
        try:
            self._record(func, args, kwargs, out)
        except Exception:  # noqa: BLE001 - bookkeeping must never change what the model computes
            if DEBUG:
                raise
        return out

    def _innermost(self) -> str | None:
        return self.stack[-1][0] if self.stack else None

    def _record(self, func, args, kwargs, out) -> None:
        name = getattr(func, "__name__", "")
        if name in ("__get__", "__set__", "size", "dim", "numel", "shape", "__len__", "data_ptr"):
            return
        ins = [a for a in tree_flatten((args, kwargs))[0] if isinstance(a, torch.Tensor)]
        outs = [o for o in tree_flatten(out)[0] if isinstance(o, torch.Tensor)]
        provs = [self.get(t) for t in ins]
        kind = INTERCEPT.get(func)
        acts = [p for p in provs if p.act]
        if not acts and kind is None:
            return  # constant computation
        new = self._derive(name, kind, args, ins, provs, outs)
        call = Call(len(self.rec.calls), name, kind, tuple(self.stack), provs,
                    [isinstance(t, nn.Parameter) for t in ins], [new] * len(outs))
        if name in ("linear", "conv2d") and len(ins) > 1:
            call.weight = id(ins[1])
        if kind is not None or name in WEIGHTED:
            self.rec.calls.append(call)
            if kind == "matmul" and len(acts) == 2 and new.kind == "matmul":  # a Q·Kᵀ: what follows derives from it
                new = replace(new, qk=call.index)
            if kind == "add" and acts:
                new = replace(new, cp_add=call.index)
            if kind == "cat" and acts and len(acts) < len(provs):
                new = replace(new, cp_embed=call.index)
            call.out = [new] * len(outs)
        self._uses(name, ins, provs)
        for o in outs:
            self.set(o, new)

    def _derive(self, name, kind, args, ins, provs, outs) -> Prov:
        acts = [p for p in provs if p.act]
        first = acts[0] if acts else CONST
        inner = self._innermost()
        heads = frozenset().union(*(p.heads for p in acts)) if acts else frozenset()
        qk = next((p.qk for p in acts if p.qk is not None), None)
        if not acts:
            return Prov(act=False, prob=name in SOFTMAX)
        if name in CHANNEL_PRESERVING:
            return first
        if name in KIND_PRESERVING:
            return Prov(True, first.kind, first.src, heads=heads, qk=qk)
        if name in NORM_FUNCS:
            return Prov(True, NORM_FUNCS[name], inner, cp_norm=inner)
        if name in SOFTMAX:
            return Prov(True, "softmax", inner, prob=True, qk=qk)
        if name in ACTIVATIONS:
            return Prov(True, ACTIVATIONS[name], inner, heads=heads, qk=qk)
        if kind == "sdpa":
            return Prov(True, "attn", inner)
        if kind == "matmul" or name == "einsum":
            if len(acts) == 2:
                # ·V when the first operand derives from a Q·Kᵀ (through softmax, masks, talking heads)
                is_pv = acts[0].qk is not None or acts[0].prob
                return Prov(True, "attn", inner) if is_pv else Prov(True, "matmul", inner)
            return Prov(True, "other", inner, qk=qk)
        if kind in ("linear", "conv"):
            return Prov(True, kind, inner, heads=frozenset([inner]), qk=qk, branch=inner)
        if name in ELEMENTWISE:
            prob = all(p.prob for p in acts)
            if len(acts) >= 2 and name in ADDS:
                return Prov(True, "residual", inner, prob=prob, heads=heads, qk=qk)
            if len(acts) >= 2 and name in MULS:
                return Prov(True, "gated" if not prob else first.kind, inner, prob=prob, heads=heads, qk=qk)
            # act ∘ constant: the producer stays the same kind of tensor (a scaled GELU output is one)
            keep_branch = first.branch if name in MULS else None
            keep_embed = first.cp_embed if name in ADDS else None
            return Prov(True, first.kind, first.src, prob=prob, heads=heads, qk=qk, branch=keep_branch,
                        cp_embed=keep_embed)
        if kind == "cat":
            return replace(first, cp_norm=first.cp_norm if all(p.cp_norm == first.cp_norm for p in acts) else None,
                           cp_add=None, branch=None)
        return Prov(True, "other", inner, heads=heads, qk=qk)

    def _uses(self, name: str, ins: list, provs: list[Prov]) -> None:
        """Record every use of a norm's output (a twin consuming it as its input, or anything else) and
        of a weight layer's output (for folding a BatchNorm that is its only reader)."""
        inner = self._innermost()
        for p in provs:
            if p.kind in ("linear", "conv") and p.src in self.twin_paths and name not in CHANNEL_PRESERVING:
                self.rec.layer_uses.setdefault(p.src, []).append((name, inner or ""))
        for i, p in enumerate(provs):
            if p.cp_norm is None or name in CHANNEL_PRESERVING:
                continue
            uses = self.rec.norm_uses.setdefault(p.cp_norm, [])
            if name in ("linear", "conv2d") and i == 0 and inner is not None and self._is_twin(inner):
                uses.append(inner)
            elif name in NORM_FUNCS and inner == p.cp_norm:
                continue  # the norm's own computation (a manual RMSNorm reading its output)
            else:
                uses.append(f"!{name} in {inner or 'the model'}")

    def _is_twin(self, path: str) -> bool:
        return path in self.twin_paths
