"""Evaluation images streamed batch by batch: an ImageFolder of any size (ImageNet's 50,000 validation
images are 30 GB as float tensors) decoded by DataLoader workers, or an in-memory `LabeledSet`.

`labeled_batches` yields (images, labels) for a contiguous range of batches of the whole set's batch grid:
batch b always holds the same images, so a rank of a distributed evaluation that scores batches 5..9
computes exactly what one process computes for them (the same tensors through the same kernels), and the
summed counts equal the single-process ones. Unreadable files are skipped and counted, as when decoding a
folder into memory (`calibration.data`).
"""
from __future__ import annotations

import os
import random
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterator

import torch
from PIL import Image
from torch.utils.data import DataLoader, Dataset

from vitquant.calibration.data import (BUNDLED, LabeledSet, UnsupportedImageMode, _eval_transform, _folder_description,
                                       labeled_files, load_labeled, to_mode)
from vitquant.errors import VitquantError

# below this many images, worker processes cost more to start than they save
_WORKERS_MIN_IMAGES = 256


class _Files(Dataset):
    """(image tensor or None when unreadable, class index, file index) for each file."""

    def __init__(self, files: list[tuple[Path, int]], data_cfg: dict) -> None:
        channels = int(data_cfg["input_size"][0])
        if channels not in (1, 3):
            raise VitquantError(f"image folders can feed models with 1 or 3 input channels, but this model expects "
                                f"{channels}; pass a preprocessed tensor [N, {channels}, H, W] instead")
        self.files, self.mode, self.transform = files, ("L" if channels == 1 else "RGB"), _eval_transform(data_cfg)

    def __len__(self) -> int:
        return len(self.files)

    def __getitem__(self, i: int):
        path, label = self.files[i]
        try:
            with Image.open(path) as image:
                return self.transform(to_mode(image, self.mode)), label, i
        except (OSError, ValueError, SyntaxError, UnsupportedImageMode, Image.DecompressionBombError):
            return None, label, i


def _collate(items):
    kept = [it for it in items if it[0] is not None]
    skipped = [it[2] for it in items if it[0] is None]
    images = torch.stack([it[0] for it in kept]) if kept else None
    return images, torch.tensor([it[1] for it in kept], dtype=torch.int64), skipped


@dataclass
class LabeledStream:
    """Labeled evaluation images, decoded when iterated. n: images listed (unreadable ones included)."""

    n: int
    source: str
    classes: list[str] | None
    _memory: LabeledSet | None = None
    _files: list[tuple[Path, int]] = field(default_factory=list)
    _data_cfg: dict = field(default_factory=dict)
    folder: Path | None = None
    skipped: list[str] = field(default_factory=list)  # unreadable files met so far (this process)

    def n_batches(self, batch_size: int) -> int:
        return -(-self.n // batch_size)

    def batches(self, batch_size: int, first: int = 0, stop: int | None = None,
                workers: int | None = None) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        """Batches first..stop-1 of the grid of `batch_size` images (unreadable images left out of theirs)."""
        stop = self.n_batches(batch_size) if stop is None else stop
        lo, hi = first * batch_size, min(stop * batch_size, self.n)
        if hi <= lo:
            return
        if self._memory is not None:
            yield from zip(self._memory.images[lo:hi].split(batch_size), self._memory.labels[lo:hi].split(batch_size))
            return
        if workers is None:
            workers = 0 if hi - lo < _WORKERS_MIN_IMAGES else min(8, max(1, (os.cpu_count() or 1) - 1))
        part = _Files(self._files[lo:hi], self._data_cfg)
        loader = DataLoader(part, batch_size=batch_size, shuffle=False, num_workers=workers, collate_fn=_collate,
                            persistent_workers=False)
        for images, labels, skipped in loader:
            self.skipped += [str(self._files[lo + i][0]) for i in skipped]
            if images is not None:
                yield images, labels


def labeled_stream(source, data_cfg: dict, limit: int | None = None) -> LabeledStream:
    """'bundled' (in memory: 1000 images), a LabeledSet, or an ImageFolder folder streamed from disk. `limit`
    keeps the first `limit` of a seed-0 shuffle (so a subset mixes the classes); in a folder, unreadable
    files among them are skipped and counted, not replaced."""
    if limit is not None and limit < 1:
        raise VitquantError(f"limit={limit} keeps no evaluation images; pass a positive limit or None for all")
    if isinstance(source, LabeledSet) or (isinstance(source, str) and source == BUNDLED):
        data = source if isinstance(source, LabeledSet) else load_labeled(source, data_cfg, limit=limit)
        return LabeledStream(len(data.labels), data.source, data.classes, _memory=data)
    if not isinstance(source, (str, os.PathLike)):
        raise VitquantError(f"unsupported evaluation source of type {type(source).__name__}; "
                            "pass 'bundled' or an ImageFolder folder (one subfolder per class)")
    folder, classes, files = labeled_files(source)
    total = len(files)
    if limit is not None:
        random.Random(0).shuffle(files)
        files = files[:limit]
    return LabeledStream(len(files), _folder_description(folder, len(files), total, []), classes,
                         _files=files, _data_cfg=data_cfg, folder=folder)
