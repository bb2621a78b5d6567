"""Wall time and peak resident memory of a block of work (for calibration reports), and giving freed
memory back to the operating system."""
from __future__ import annotations

import ctypes
import os
import resource
import threading
import time
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Iterator

_PAGE = os.sysconf("SC_PAGE_SIZE") if hasattr(os, "sysconf") else 4096


def _malloc_trim():
    try:
        return ctypes.CDLL("libc.so.6").malloc_trim
    except (OSError, AttributeError):  # not glibc
        return None


_TRIM = _malloc_trim()


def release_memory() -> None:
    """Return the freed pages of the C heap to the operating system (glibc; a no-op elsewhere).

    glibc serves a large allocation from a fresh mapping, but after such a mapping of size S is freed
    it serves every later allocation below S (up to 32 MiB) from its heap, and keeps pages freed there.
    Calibration frees and allocates activation-sized tensors of many sizes, so the heap fragments: on
    DeiT-S at 32 images, one observed forward left the process 800 MB larger than the tensors alive.
    Calling this after each large transient (one observed site, one unit) keeps the resident size near
    what is alive; the cost is re-faulting pages that are used again."""
    if _TRIM is not None:
        _TRIM(0)


def _rss_bytes() -> int:
    try:
        with open("/proc/self/statm") as f:
            return int(f.read().split()[1]) * _PAGE
    except OSError:  # not Linux: the lifetime peak is the best we can do
        return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


@dataclass
class Measurement:
    seconds: float = 0.0
    peak_rss_mb: float = 0.0  # peak resident memory during the block
    delta_rss_mb: float = 0.0  # peak minus resident memory at the start


@contextmanager
def measure(interval_s: float = 0.01) -> Iterator[Measurement]:
    """Samples RSS in a thread: torch allocations are invisible to tracemalloc."""
    m = Measurement()
    start_rss = peak = _rss_bytes()
    done = threading.Event()

    def sample() -> None:
        nonlocal peak
        while not done.wait(interval_s):
            peak = max(peak, _rss_bytes())

    t = threading.Thread(target=sample, daemon=True)
    t0 = time.perf_counter()
    t.start()
    try:
        yield m
    finally:
        done.set()
        t.join()
        peak = max(peak, _rss_bytes())
        m.seconds = time.perf_counter() - t0
        m.peak_rss_mb = peak / 2**20
        m.delta_rss_mb = (peak - start_rss) / 2**20
