"""Routing torch function calls made inside a model's forward to quantization handlers.

Attention is computed by code vitquant does not own (timm's `F.scaled_dot_product_attention`, Swin's
`q @ k.transpose(-2, -1)`, Hugging Face's eager or SDPA paths, BEiT's `F.linear(x, self.qkv.weight,
qkv_bias)`). Instead of rewriting each forward, a module that makes such a call becomes an *owner*:
while it runs, a `TorchFunctionMode` counts the interceptable calls it makes ("sdpa0", "matmul1",
"linear0", …, one counter per kind and per owner call) and hands the ones that have a handler in
`owner.vq_handlers` to that handler (an `nn.Module` holding the quantization sites, see handlers.py).

The numbering is deterministic for a given forward, and the tracer (trace.py) numbers the calls with
exactly this rule, so a handler installed at "matmul1" sees the same call at run time as at trace time.
A call belongs to the innermost running owner that *counts* (has handlers); modules registered with
`counting=False` (the model root, reconstruction units) only keep the mode active, so that torch's
fast paths that skip Python (`nn.MultiheadAttention`'s native kernel, `TransformerEncoderLayer`'s fused
one) are off exactly as they were while tracing.

Handlers run inside the mode's `__torch_function__`, where the mode is popped: the operations they
perform are neither counted nor intercepted again. vitquant's own work inside a forward (quantizers,
observers, capture hooks) runs under `quiet()`, so it never shifts the numbering either.
"""
from __future__ import annotations

import threading
from collections import Counter
from contextlib import contextmanager
from typing import Any, Callable

import torch
import torch.nn.functional as F
from torch import nn
from torch.overrides import TorchFunctionMode

# Interceptable calls, by kind. Every kind is always counted (whether or not a handler exists), so
# the indices never depend on which handlers a method asked for.
INTERCEPT: dict[Callable, str] = {
    F.scaled_dot_product_attention: "sdpa",
    torch.matmul: "matmul", torch.Tensor.matmul: "matmul", torch.Tensor.__matmul__: "matmul",
    torch.bmm: "matmul", torch.Tensor.bmm: "matmul",
    F.linear: "linear",
    F.conv2d: "conv",
    torch.add: "add", torch.Tensor.add: "add", torch.Tensor.__add__: "add", torch.Tensor.__radd__: "add",
    torch.cat: "cat", torch.concat: "cat",
    F.layer_norm: "norm", F.group_norm: "norm",
}
HANDLERS = "vq_handlers"  # the ModuleDict attribute of an owner


class _State(threading.local):
    def __init__(self) -> None:
        self.stack: list[tuple[nn.Module, Counter, bool]] = []
        self.mode: _Dispatch | None = None
        self.quiet = 0


_state = _State()


@contextmanager
def quiet():
    """Calls made inside are not the model's own: they are neither counted nor intercepted."""
    _state.quiet += 1
    try:
        yield
    finally:
        _state.quiet -= 1


class _Dispatch(TorchFunctionMode):
    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        kind = INTERCEPT.get(func)
        if kind is None or _state.quiet:
            return func(*args, **kwargs)
        for owner, counts, counting in reversed(_state.stack):
            if counting:
                index = counts[kind]
                counts[kind] += 1
                handler = getattr(owner, HANDLERS)._modules.get(f"{kind}{index}")
                if handler is not None:
                    return handler(func, args, kwargs)
                break
        return func(*args, **kwargs)


def _enter(module: nn.Module, args: Any) -> None:
    if not _state.stack:
        _state.mode = _Dispatch()
        _state.mode.__enter__()
    _state.stack.append((module, Counter(), hasattr(module, HANDLERS)))


def _exit(module: nn.Module, args: Any, output: Any) -> None:
    if _state.stack and _state.stack[-1][0] is module:
        _state.stack.pop()
    if not _state.stack and _state.mode is not None:
        mode, _state.mode = _state.mode, None
        mode.__exit__(None, None, None)


def make_owner(module: nn.Module, handlers: dict[str, nn.Module] | None) -> None:
    """Let `module`'s forward run under the dispatch mode; with `handlers`, it counts its calls and hands
    the named ones to them. Hooks are module-level functions, so `copy.deepcopy` keeps them valid."""
    if handlers:
        module.add_module(HANDLERS, nn.ModuleDict(handlers))
    if getattr(module, "_vq_owner", False):
        return
    module.register_forward_pre_hook(_enter)
    module.register_forward_hook(_exit, always_call=True)
    module._vq_owner = True


def handlers_of(module: nn.Module) -> dict[str, nn.Module]:
    return dict(getattr(module, HANDLERS, {}).items()) if hasattr(module, HANDLERS) else {}


def current_owner_counts() -> tuple[nn.Module, Counter] | None:
    """The innermost counting owner (for the tracer's consistency check)."""
    for owner, counts, counting in reversed(_state.stack):
        if counting:
            return owner, counts
    return None
