"""Exhaustive search over a grid of candidate quantizer parameters, with bounded memory.

Layer-wise PTQ methods (PTQ4ViT, NoisyQuant, EasyQuant …) evaluate each candidate scale by the error
it causes at a layer's output over the whole calibration set. Evaluating many candidates in one
batched matmul is much faster than one at a time, but a [candidates × rows × channels] tensor does not
fit in memory for real models; `grid_argmin` picks chunk sizes from a float budget.
"""
from __future__ import annotations

from typing import Callable

import torch

# Largest intermediate of one chunk, in floats (16 MiB of float32). It was 2^18 (1 MiB, cache-sized),
# which split an attention search on DeiT-S into one image × one candidate per call (~0.4 ms each):
# measured on random-init DeiT-S with 2 blocks, ptq4vit W4A4, 2 threads, idle machine: 2^18 27.6 CPU-s
# (22.5 wall), 2^20 21.4, 2^22 19.5 (11.7 wall), 2^24 18.4; 1 thread 16.4 → 15.0; the same scales.
CHUNK_FLOATS = 2**22
# A candidate's error costs rows × in × out multiply-adds; on a real ViT (DeiT-S: 6,304 tokens from 32
# images) a grid of ~250 evaluations per layer costs hundreds of forward passes. Searches therefore
# evaluate a seeded sample of rows: as many as make one evaluation cost SEARCH_MACS (at least
# MIN_SEARCH_ROWS). The reference models (≤ 192 × 768 layers, 544 rows at 32 images) stay exact.
SEARCH_MACS = 2**27
MIN_SEARCH_ROWS = 256


def search_rows(in_features: int, out_features: int, macs: int = SEARCH_MACS,
                min_rows: int = MIN_SEARCH_ROWS) -> int | None:
    """Rows of a Linear's input a search evaluates (None: all, when `macs` is 0)."""
    if not macs:
        return None
    return max(min_rows, macs // max(1, in_features * out_features))


def grid_argmin(
    candidates: torch.Tensor, n_items: int, floats_per_item: int,
    error: Callable[[torch.Tensor, slice], torch.Tensor],
) -> torch.Tensor:
    """The best candidate of each group.

    candidates: [K, G], K values for each of G independent groups (output channels, heads, or G = 1).
    n_items: how many items (rows or images) the error is summed over.
    floats_per_item: size of the largest intermediate per item and candidate (for chunking).
    error(c, items): [k, G] error of candidate chunk c ([k, G]) summed over items[items].
    Ties go to the first candidate.
    """
    K, G = candidates.shape
    per_candidate = max(1, n_items * floats_per_item)
    k = max(1, min(K, CHUNK_FLOATS // per_candidate))
    items_per_chunk = n_items if k > 1 else max(1, CHUNK_FLOATS // max(1, floats_per_item))
    total = torch.zeros(K, G, dtype=torch.float64, device=candidates.device)
    with torch.no_grad():
        for c0 in range(0, K, k):
            for i0 in range(0, n_items, items_per_chunk):
                total[c0:c0 + k] += error(candidates[c0:c0 + k], slice(i0, i0 + items_per_chunk)).double()
    best = total.nan_to_num(nan=float("inf")).argmin(dim=0)
    return candidates.gather(0, best[None]).squeeze(0)
