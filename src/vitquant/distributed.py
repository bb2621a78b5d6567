"""Data parallelism with PyTorch's own engine, `torch.distributed`, launched by `torchrun`.

    torchrun --nproc_per_node 2 -m vitquant eval qmodel/ --data imagenet/val
    torchrun --nproc_per_node 2 -m vitquant quantize --method repq-vit --calib imagenet/train --out q/

Every rank runs the same program on its shard of the images; what depends on all images is reduced
across ranks (`torch.distributed` collectives: NCCL on GPUs, gloo on CPUs), so N ranks compute what one
process computes over the same images:
- evaluation: rank r scores the r-th contiguous shard (every image exactly once: no padding, unlike
  `DistributedSampler`, whose padding repeats images); the correct/agreeing counts are summed (exact);
- calibration: the float observe pass (min/max ranges, percentile and MSE-search samples) runs over
  whole batches of the same calibration grid, split contiguously among ranks; the observers are then
  reduced (min/max: exact; samples: gathered in batch order) — see `Context.observe`.
Only rank 0 writes outputs (`is_main`); the others wait at a barrier so nobody exits first.

Nothing here starts a process group on its own in a plain `python` run: `init()` joins one only when
`torchrun` (or the user) set WORLD_SIZE > 1.
"""
from __future__ import annotations

import os
from datetime import timedelta

import torch
import torch.distributed as dist

from vitquant.errors import VitquantError


def init(backend: str | None = None, device: str | torch.device | None = None) -> bool:
    """Join the process group `torchrun` describes (WORLD_SIZE, RANK, MASTER_ADDR/PORT in the environment);
    True when running distributed. backend: 'gloo' (CPU tensors) or 'nccl' (CUDA); default by device."""
    if dist.is_available() and dist.is_initialized():
        return dist.get_world_size() > 1
    if int(os.environ.get("WORLD_SIZE", "1")) <= 1:
        return False
    if not dist.is_available():
        raise VitquantError("WORLD_SIZE > 1 but this PyTorch build has no torch.distributed")
    missing = [k for k in ("RANK", "MASTER_ADDR", "MASTER_PORT") if k not in os.environ]
    if missing:
        raise VitquantError(f"WORLD_SIZE is set but {', '.join(missing)} are not: launch with `torchrun "
                            "--nproc_per_node N -m vitquant ...` (it sets them)")
    if backend is None:
        backend = "nccl" if local_device(device).type == "cuda" else "gloo"
    if backend == "nccl":  # NCCL needs each rank on its own GPU before the group forms
        torch.cuda.set_device(local_device(device))
    dist.init_process_group(backend, timeout=timedelta(minutes=30))
    return dist.get_world_size() > 1


def finish() -> None:
    """Leave the process group (after a barrier, so rank 0's writes are done before anyone exits)."""
    if is_distributed():
        dist.barrier()
        dist.destroy_process_group()


def is_distributed() -> bool:
    return dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1


def rank() -> int:
    return dist.get_rank() if is_distributed() else 0


def world_size() -> int:
    return dist.get_world_size() if is_distributed() else 1


def is_main() -> bool:
    return rank() == 0


def local_device(requested: str | None = None) -> torch.device:
    """The device this rank computes on: `requested` ('cpu', 'cuda', 'cuda:1'), else CUDA when available;
    under torchrun a plain 'cuda' means this rank's own GPU (LOCAL_RANK)."""
    name = requested or ("cuda" if torch.cuda.is_available() else "cpu")
    device = torch.device(name)
    if device.type == "cuda":
        if not torch.cuda.is_available():
            raise VitquantError(f"--device {name}: this machine has no CUDA device (torch.cuda.is_available() is "
                                "False); use --device cpu")
        if device.index is None:
            device = torch.device("cuda", int(os.environ.get("LOCAL_RANK", "0")) % torch.cuda.device_count())
    return device


def shard(n: int, parts: int | None = None, index: int | None = None) -> range:
    """The contiguous part `index` of range(n) split into `parts` near-equal pieces (the first n % parts
    pieces one longer): every item in exactly one piece, in order, none repeated."""
    parts = world_size() if parts is None else parts
    index = rank() if index is None else index
    base, extra = divmod(n, parts)
    start = index * base + min(index, extra)
    return range(start, start + base + (1 if index < extra else 0))


def _collective_device() -> torch.device:
    return torch.device("cuda", torch.cuda.current_device()) if dist.get_backend() == "nccl" else torch.device("cpu")


def all_reduce(t: torch.Tensor, op: str = "sum") -> torch.Tensor:
    """`t` reduced over ranks (sum, min or max); a new tensor on t's device. Identity when not distributed."""
    if not is_distributed():
        return t.clone()
    ops = {"sum": dist.ReduceOp.SUM, "min": dist.ReduceOp.MIN, "max": dist.ReduceOp.MAX}
    out = t.detach().to(_collective_device()).clone()
    dist.all_reduce(out, ops[op])
    return out.to(t.device)


def all_gather_rows(t: torch.Tensor) -> torch.Tensor:
    """Concatenate each rank's `t` along dim 0 in rank order; the ranks' row counts may differ (and be 0),
    the other dims must agree."""
    if not is_distributed():
        return t
    dev = _collective_device()
    sizes = [torch.zeros(1, dtype=torch.int64, device=dev) for _ in range(world_size())]
    dist.all_gather(sizes, torch.tensor([t.shape[0]], dtype=torch.int64, device=dev))
    sizes = [int(s.item()) for s in sizes]
    longest = max(sizes)
    padded = torch.zeros((longest, *t.shape[1:]), dtype=t.dtype, device=dev)
    padded[:t.shape[0]] = t.to(dev)
    parts = [torch.empty_like(padded) for _ in sizes]
    dist.all_gather(parts, padded)
    return torch.cat([p[:s] for p, s in zip(parts, sizes)]).to(t.device)


def broadcast_from_main(t: torch.Tensor) -> torch.Tensor:
    """Rank 0's `t` on every rank (same shape and dtype everywhere)."""
    if not is_distributed():
        return t
    out = t.detach().to(_collective_device()).clone()
    dist.broadcast(out, 0)
    return out.to(t.device)


def barrier() -> None:
    if is_distributed():
        dist.barrier()
