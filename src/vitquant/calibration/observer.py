"""Streaming activation statistics with bounded memory.

Each observer keeps the exact running min/max (per channel) and a uniform random sample of rows
(reservoir sampling by random keys: every row of the stream is equally likely to be kept). Range
rules (percentile, MSE search) run on the sample; min-max uses the exact extremes. With the papers'
32 calibration images the sample is usually the whole stream, so results are exact; with thousands of
images memory stays at `max_elements` floats per site instead of growing with the data. A method
that needs only the extremes (min-max ranges) observes with `max_elements=1`: one row is kept.
"""
from __future__ import annotations

import torch

from vitquant.profiling import release_memory
from vitquant.quantizers.ranges import channels_last_2d

# 2 MiB of float32 per observed site. Every site of the reference models fits whole at 32 images (the
# largest, fc2's input, is 32 × 17 × 768 = 417,792 floats), so their results are exact; DeiT-S at 224²
# has ~100 sites of up to 9.7 M floats at 32 images, and 8 MiB each (the previous cap) doubled the
# process's peak memory.
DEFAULT_MAX_ELEMENTS = 2**19


class ReservoirObserver:
    def __init__(self, channel_axis: int | None = -1, max_elements: int = DEFAULT_MAX_ELEMENTS, seed: int = 0):
        # rows are kept along channel_axis so a channel-wise quantizer can be fitted from the same sample
        self.channel_axis = channel_axis
        self.max_elements = max_elements
        self.seed = seed
        self.generator = torch.Generator().manual_seed(seed)
        self.rows: torch.Tensor | None = None
        self.keys: torch.Tensor | None = None
        self.lo: torch.Tensor | None = None
        self.hi: torch.Tensor | None = None
        self.count = 0  # rows seen
        self.shape: tuple[int, ...] | None = None  # shape of the last observed tensor (without batch)

    def start_batch(self, index: int) -> None:
        """The next rows come from batch `index` of the calibration grid: their keys are drawn from a stream
        seeded by (seed, index), so they do not depend on which process observed the batches before it."""
        self.generator.manual_seed(hash((self.seed, index)) & (2**63 - 1))

    def update(self, x: torch.Tensor) -> None:
        x = x.detach()
        self.shape = tuple(x.shape[1:])
        # rows stay where x is (a GPU): only the extremes and the rows the sample keeps come to the CPU
        rows = channels_last_2d(x, self.channel_axis if self.channel_axis is not None else x.dim() - 1)
        lo, hi = rows.amin(dim=0).cpu(), rows.amax(dim=0).cpu()
        self.lo = lo if self.lo is None else torch.minimum(self.lo, lo)
        self.hi = hi if self.hi is None else torch.maximum(self.hi, hi)
        n, old = rows.shape[0], 0 if self.rows is None else self.rows.shape[0]
        self.count += n
        keys = torch.rand(n, generator=self.generator)
        if self.keys is not None:
            keys = torch.cat([self.keys, keys])
        cap = max(1, self.max_elements // rows.shape[1])
        if old + n > cap:  # the rows of the top `cap` keys, in key order, copied once
            keep = keys.topk(cap).indices
            from_old = keep < old
            kept = torch.empty(cap, rows.shape[1], dtype=rows.dtype)
            if old:
                kept[from_old] = self.rows[keep[from_old]]
            kept[~from_old] = rows[(keep[~from_old] - old).to(rows.device)].cpu()
            self.rows, self.keys = kept, keys[keep]
        else:
            self.rows = rows.cpu() if self.rows is None else torch.cat([self.rows, rows.cpu()])
            self.keys = keys
        release_memory()  # the copies above are activation-sized: see profiling.release_memory

    def reduce_across_ranks(self) -> None:
        """Combine this observer with its twins on the other ranks (torch.distributed), in place, into what
        one process observing every rank's batches, in rank order, would hold. Every rank must call it, for
        the same observers in the same order, each having observed at least one batch."""
        from vitquant import distributed

        if not distributed.is_distributed():
            return
        self.lo, self.hi = distributed.all_reduce(self.lo, "min"), distributed.all_reduce(self.hi, "max")
        self.count = int(distributed.all_reduce(torch.tensor([self.count]))[0])
        rows, keys = distributed.all_gather_rows(self.rows), distributed.all_gather_rows(self.keys)
        cap = max(1, self.max_elements // rows.shape[1])
        if rows.shape[0] > cap:  # as update() cuts: the top keys, in key order
            keep = keys.topk(cap).indices
            rows, keys = rows[keep], keys[keep]
        self.rows, self.keys = rows, keys

    @property
    def empty(self) -> bool:
        return self.rows is None and self.count == 0

    def drop_sample(self) -> None:
        """Free the sample once it has been used; the extremes (lo, hi) stay."""
        self.rows = self.keys = None

    def sample(self) -> torch.Tensor:
        """[rows, C] sample (C = size of the channel axis)."""
        if self.rows is None:
            raise RuntimeError("observer saw no data: the calibration forward never reached this site")
        return self.rows

    def tensor_range(self) -> tuple[torch.Tensor, torch.Tensor]:
        return self.lo.min(), self.hi.max()
