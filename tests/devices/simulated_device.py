"""A second device on a CPU-only machine, so the CPU suite can catch what breaks on CUDA.

`SimulatedDevice` is a dispatch mode under which `.to(SIM)` (`SIM` is the `meta` device) gives an
`Elsewhere` tensor: real CPU data that reports `device == SIM`. Every aten op is checked the way CUDA
checks it and then computed on the CPU data, so whole calibrations run and produce real numbers, while
the CUDA pitfalls fail loudly with the op that hit them:
- a tensor on the device combined with a CPU tensor of one or more dimensions (CUDA accepts only 0-dim
  CPU tensors as scalars; `copy_`/`.to()` move data and CPU index tensors may index a device tensor);
- a CPU `torch.Generator` drawing numbers for a tensor on the device;
- `.numpy()` of a device tensor (`.tolist()`, `.item()` and `float()` work, as on CUDA).
What it cannot see: code that asks `torch.cuda` itself, or CUDA's numerics (kernels may differ in the
last bits, which is why the CUDA-marked tests compare by SQNR and agreement, not bit-exactly).
"""
from __future__ import annotations

import torch
from torch.overrides import TorchFunctionMode
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_flatten, tree_map

SIM = torch.device("meta")
# ops that move data between devices, read one number back, or only alias their input
_MOVING = {"_to_copy", "copy_", "copy", "_local_scalar_dense", "detach", "alias", "lift_fresh"}
_INDEXING = {"index", "index_put_", "index_put", "_index_put_impl_"}  # CPU indices are fine on CUDA


class DeviceMismatch(AssertionError):
    """What CUDA would have refused."""


class Elsewhere(torch.Tensor):
    """CPU data that says it lives on SIM (only usable under SimulatedDevice)."""

    @staticmethod
    def __new__(cls, data: torch.Tensor) -> "Elsewhere":
        t = torch.Tensor._make_wrapper_subclass(cls, data.shape, strides=data.stride(),
                                                storage_offset=data.storage_offset(), dtype=data.dtype,
                                                layout=data.layout, device=SIM, requires_grad=data.requires_grad)
        t.data_ = data
        return t

    def __repr__(self) -> str:
        return f"Elsewhere({self.data_!r})"

    @property
    def is_meta(self) -> bool:  # it holds data (nn.Module.load_state_dict skips copying into meta tensors)
        return False

    @classmethod
    def __torch_function__(cls, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        with torch._C.DisableTorchFunctionSubclass():
            if func is torch.Tensor.tolist:  # a CUDA tensor has it; a tensor subclass does not
                return args[0].cpu().tolist()
            if func is torch.Tensor.numpy:
                raise DeviceMismatch("numpy() of a tensor on the device (CUDA: 'can't convert cuda:0 device type "
                                     "tensor to numpy'); call .cpu() first")
            return func(*args, **kwargs)

    @classmethod
    def __torch_dispatch__(cls, func, types, args=(), kwargs=None):
        raise RuntimeError(f"an Elsewhere tensor was used outside SimulatedDevice ({func})")


def _check(func, args, kwargs, on_device: list, to_device: bool, tensors: list) -> None:
    name = func.overloadpacket.__name__
    gen = kwargs.get("generator")
    if (on_device or to_device) and gen is not None and gen.device.type == "cpu":
        raise DeviceMismatch(f"{func}: a CPU torch.Generator draws numbers for a tensor on the device (CUDA: "
                             "\"Expected a 'cuda' device type for generator\")")
    if not on_device or name in _MOVING:
        return
    plain = [t for t in tensors if not isinstance(t, Elsewhere) and t.dim() > 0]
    if name in _INDEXING:
        if not isinstance(args[0], Elsewhere):
            raise DeviceMismatch(f"{func}: a CPU tensor indexed with indices on the device")
        indices = {id(i) for i in (args[1] if len(args) > 1 else kwargs.get("indices")) or [] if i is not None}
        plain = [t for t in plain if id(t) not in indices]
    if plain:
        raise DeviceMismatch(f"{func}: combines tensors on the device with CPU tensors of shape "
                             f"{[tuple(t.shape) for t in plain]} (CUDA: 'Expected all tensors to be on the same "
                             "device')")


class _FromData(TorchFunctionMode):
    """torch.tensor(data, device=SIM) builds its tensor below the dispatcher (a real, empty meta tensor):
    build it on the CPU and move it."""

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        device = kwargs.get("device")
        if func in (torch.tensor, torch.as_tensor) and device is not None and torch.device(device) == SIM:
            return func(*args, **{**kwargs, "device": "cpu"}).to(SIM)
        return func(*args, **kwargs)


class SimulatedDevice(TorchDispatchMode):
    """Inside the block, SIM behaves like a CUDA device whose tensors hold CPU data (see the module)."""

    def __enter__(self):
        self._from_data = _FromData()
        self._from_data.__enter__()
        self._autocast_init = torch.autocast.__init__

        def autocast_init(ac, device_type, *args, **kwargs):  # autocast knows no 'meta': the data is on the CPU
            self._autocast_init(ac, "cpu" if device_type == SIM.type else device_type, *args, **kwargs)

        torch.autocast.__init__ = autocast_init
        return super().__enter__()

    def __exit__(self, *exc):
        try:
            return super().__exit__(*exc)
        finally:
            torch.autocast.__init__ = self._autocast_init
            self._from_data.__exit__(*exc)

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        tensors = [t for t in tree_flatten((args, kwargs))[0] if isinstance(t, torch.Tensor)]
        if any(t.device == SIM and not isinstance(t, Elsewhere) for t in tensors):
            raise RuntimeError(f"{func}: a real (data-less) meta tensor reached the simulated device; the test "
                               "harness does not know how it was made")
        on_device = [t for t in tensors if isinstance(t, Elsewhere)]
        device = kwargs.get("device")
        to_device = device is not None and torch.device(device).type == SIM.type
        _check(func, args, kwargs, on_device, to_device, tensors)
        if to_device:
            kwargs = dict(kwargs, device=torch.device("cpu"))
        unwrap = lambda t: t.data_ if isinstance(t, Elsewhere) else t  # noqa: E731
        out = func(*tree_map(unwrap, args), **tree_map(unwrap, kwargs))
        if device is not None and not to_device:  # a factory or .to() for the CPU
            return out
        if not (on_device or to_device):
            return out
        mutated = {id(t.data_): t for t in on_device} if func._schema.is_mutable else {}  # in place: the same

        def wrap(t):
            if not isinstance(t, torch.Tensor) or isinstance(t, Elsewhere):
                return t
            return mutated[id(t)] if id(t) in mutated else Elsewhere(t)

        return tree_map(wrap, out)


def off_device(module: torch.nn.Module) -> list[str]:
    """Names of `module`'s parameters and buffers that are not on the simulated device."""
    return [n for n, t in (*module.named_parameters(), *module.named_buffers()) if not isinstance(t, Elsewhere)]
