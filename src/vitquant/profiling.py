"""Wall time and peak resident memory of a block of work (for calibration reports)."""
from __future__ import annotations

import os
import resource
import threading
import time
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Iterator

_PAGE = os.sysconf("SC_PAGE_SIZE") if hasattr(os, "sysconf") else 4096


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
