"""Resumable accuracy sweeps: models × variants × methods × bit widths × seeds.

Each finished run is appended to a JSON-lines store (one line, flushed and fsynced), so an interrupted
sweep resumes where it stopped and a finished run is never repeated. Several processes may sweep into one
store: each run is claimed before it starts (a lock that dies with its process), so none is done twice,
and summaries count every run once even in a store merged by hand. Tables are rendered from the store.

Evaluation goes through `vitquant.evaluate`, so an ImageNet-size folder is streamed, and under `torchrun`
every rank of one sweep scores its shard of each run (and calibrates data-parallel, see `quantize`): rank 0
claims each run and tells the others, and only rank 0 writes the store.
"""
from __future__ import annotations

import errno
import hashlib
import json
import os
import platform
import statistics
import sys
from contextlib import contextmanager
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from typing import Any, Callable, Iterator

import torch

try:
    import fcntl
except ImportError:  # Windows
    fcntl = None

from vitquant import distributed
from vitquant.api import quantize
from vitquant.calibration.data import data_config_for, load_calibration
from vitquant.config import QuantConfig, parse_bits, parse_method_spec
from vitquant.errors import VitquantError
from vitquant.evaluate import EvalResult, evaluate
from vitquant.methods import available_methods
from vitquant.models.loading import load_model
from vitquant.models.outliers import inject_ln_outliers
from vitquant.profiling import measure

STRESS = {"n_channels": 6, "factor": 30.0, "seed": 0}


@dataclass
class SweepSpec:
    """methods: names, or name:key=value[:key=value] for a method with options (its own row)."""

    models: list[str]
    methods: list[str]
    bits: list[str] = field(default_factory=lambda: ["w8a8", "w6a6", "w4a4", "w3a3"])
    seeds: list[int] = field(default_factory=lambda: [0, 1, 2])
    stress: bool = True
    natural: bool = True  # False: the stress variants only
    calib: str = "bundled"  # 'bundled' or an image folder (flat or ImageFolder, searched recursively)
    eval_data: str = "bundled"  # 'bundled' or an ImageFolder folder (streamed; sharded across torchrun ranks)
    calib_size: int = 32
    eval_limit: int | None = None  # score the first N images of a seed-0 shuffle (a variant of its own)
    device: str | None = None  # where models run ('cpu', 'cuda'); None: where load_model put them
    agreement: bool = True  # top-1 agreement with the float model (a float forward per evaluated batch)

    def __post_init__(self) -> None:
        if self.methods == ["all"]:
            self.methods = list(available_methods())
        for m in self.methods:
            name, options = parse_method_spec(m)
            QuantConfig(method=name, options=options)  # validates the name and the options
        for b in self.bits:
            parse_bits(b)
        if not self.models:
            raise VitquantError("a sweep needs at least one model")
        if not (self.natural or self.stress):
            raise VitquantError("a sweep needs the natural or the stress variants (or both)")
        if self.eval_limit is not None and self.eval_limit < 1:
            raise VitquantError(f"eval_limit={self.eval_limit} keeps no evaluation images; pass a positive number "
                                "or None for all")


KEY_FIELDS = ("model", "variant", "method", "bits", "seed")


def _key(rec: dict[str, Any]) -> tuple:
    return (rec["model"], rec["variant"], rec["method"], rec["bits"], rec["seed"], rec.get("calib_size"))


_LOCK_FDS: dict[str, int] = {}


def _lock_fd(path: Path) -> int:
    """One descriptor per lock file per process: POSIX record locks belong to the process and are all
    dropped when any descriptor of the file is closed, so it is opened once and never closed."""
    key = str(path.resolve())
    if key not in _LOCK_FDS:
        _LOCK_FDS[key] = os.open(key, os.O_RDWR | os.O_CREAT, 0o644)
    return _LOCK_FDS[key]


class ResultsStore:
    """An append-only JSON-lines file of finished runs, safe to share between processes.

    key: what makes two records the same run (default: model, variant, method, bits, seed, calib size).
    Concurrency (two `vitquant bench` on one store): appends hold a lock on byte 0 of `<store>.lock`;
    a run is claimed by a non-blocking lock on a byte picked by the hash of its key, held while it runs,
    so a second process skips it, and the kernel releases it if the process dies (no stale claims).
    """

    def __init__(self, path: str | Path, key: Callable[[dict[str, Any]], tuple] | None = None) -> None:
        self.path = Path(path)
        self.key = key or _key
        self.records: list[dict[str, Any]] = []
        self._done: set[tuple] = set()
        self._offset = 0  # bytes of the file already read (whole lines only)
        self._lines_read = 0
        if self.path.is_dir():
            raise VitquantError(f"results store '{self.path}' is a directory; pass a .jsonl file path")
        if self.path.exists():
            unreadable = self._read_new()
            if unreadable and not self.records:
                raise VitquantError(f"'{self.path}' is not a vitquant results store (line {unreadable[0]} is not a "
                                    "run record); pass a new file or an existing store as --store")

    @property
    def lock_path(self) -> Path:
        return self.path.with_name(self.path.name + ".lock")

    def _read_new(self) -> list[int]:
        """Read the whole lines appended since the last read; returns the numbers of unreadable lines.
        A line without its newline is a write in progress (or cut by a crash): left for later."""
        try:
            with open(self.path, "rb") as f:
                f.seek(self._offset)
                data = f.read()
        except FileNotFoundError:
            return []
        except OSError as e:
            raise VitquantError(f"cannot read results store '{self.path}': {e.strerror}") from None
        end = data.rfind(b"\n") + 1
        first = self._lines_read
        unreadable = []
        for i, line in enumerate(data[:end].splitlines()):
            self._lines_read += 1
            if not line.strip():
                continue
            try:
                rec = json.loads(line)
                # a custom key says itself what a record needs (its KeyError below)
                if not isinstance(rec, dict) or (self.key is _key and not all(k in rec for k in KEY_FIELDS)):
                    raise ValueError("not a run record")
                key = self.key(rec)
                hash(key)
            except (ValueError, KeyError, TypeError):
                unreadable.append(first + i + 1)
                continue
            self.records.append(rec)
            self._done.add(key)
        self._offset += end
        if unreadable and self.records:
            print(f"warning: ignoring unreadable line(s) {unreadable[:5]} of {self.path}", file=sys.stderr)
        return unreadable

    def done(self, rec: dict[str, Any]) -> bool:
        return self.key(rec) in self._done

    @contextmanager
    def _locked(self, offset: int = 0, wait: bool = True) -> Iterator[bool]:
        """Hold the lock on byte `offset` of the lock file (True), or yield False when it is held
        elsewhere and `wait` is False."""
        if fcntl is None:  # no POSIX locks (Windows): one process per store
            yield True
            return
        fd = _lock_fd(self.lock_path)
        try:
            fcntl.lockf(fd, fcntl.LOCK_EX | (0 if wait else fcntl.LOCK_NB), 1, offset)
        except OSError as e:
            if wait or e.errno not in (errno.EACCES, errno.EAGAIN):
                raise
            yield False
            return
        try:
            yield True
        finally:
            fcntl.lockf(fd, fcntl.LOCK_UN, 1, offset)

    @contextmanager
    def claim(self, rec: dict[str, Any]) -> Iterator[bool]:
        """True while this process owns run `rec` (not finished, not running elsewhere); run it, then
        append it before leaving the block."""
        if self.done(rec):
            yield False
            return
        digest = hashlib.sha256(json.dumps(list(self.key(rec)), default=str).encode()).digest()
        with self._locked(1 + int.from_bytes(digest[:7], "big"), wait=False) as mine:
            if mine:
                with self._locked():
                    self._read_new()  # another process may have finished it since we looked
            yield mine and not self.done(rec)

    def append(self, rec: dict[str, Any]) -> None:
        line = (json.dumps(rec, sort_keys=True, allow_nan=False) + "\n").encode()
        self.path.parent.mkdir(parents=True, exist_ok=True)
        with self._locked():
            self._read_new()
            with open(self.path, "ab") as f:
                if f.tell() > self._offset:  # a line cut by a crash: every live writer holds this lock
                    f.truncate(self._offset)
                f.write(line)
                f.flush()
                os.fsync(f.fileno())
            self._offset += len(line)
            self._lines_read += 1
        self.records.append(rec)
        self._done.add(self.key(rec))


def _variants(model_name: str, stress: bool, natural: bool = True) -> Iterator[tuple[str, torch.nn.Module]]:
    model = load_model(model_name)
    if natural:
        yield "natural", model
    if stress:
        yield f"stress S={STRESS['factor']:g}", inject_ln_outliers(model, **STRESS)


def _percent(result: EvalResult, of: float) -> float:
    """A percentage of `result.n` images as the sweep has always recorded it: the float32 mean of a 0/1
    tensor, times 100 (stores are compared value for value with older runs, e.g. benchmarks/regression.py)."""
    count = round(of * result.n / 100)
    return float(torch.tensor(float(count), dtype=torch.float32) / result.n) * 100


@contextmanager
def _claim(store: ResultsStore, rec: dict[str, Any]) -> Iterator[bool]:
    """store.claim(rec), taken by rank 0 alone under torchrun and broadcast, so every rank runs the same
    runs (they meet in collectives) and the others never lock or write the store."""
    if not distributed.is_distributed():
        with store.claim(rec) as mine:
            yield mine
        return
    if distributed.is_main():
        with store.claim(rec) as mine:
            yield bool(distributed.broadcast_from_main(torch.tensor([int(mine)])).item())
    else:
        yield bool(distributed.broadcast_from_main(torch.tensor([0])).item())


def _record(store: ResultsStore, rec: dict[str, Any]) -> None:
    if distributed.is_main():
        store.append(rec)


def run_sweep(spec: SweepSpec, store: ResultsStore, progress: bool = True) -> int:
    """Run every (model, variant, method, bits, seed) the store has not finished and no other process is
    running; returns how many runs this call added. Under torchrun call it on every rank with the same spec."""
    device = None if spec.device is None else distributed.local_device(spec.device)
    machine = f"{platform.machine()}, {os.cpu_count()} cpus, torch {torch.__version__}"
    if device is not None and device.type != "cpu":
        machine += f", {torch.cuda.get_device_name(device)}"
    if distributed.world_size() > 1:
        machine += f", {distributed.world_size()} ranks"
    progress = progress and distributed.is_main()
    added = 0
    for model_name in spec.models:
        for variant, model in _variants(model_name, spec.stress, spec.natural):
            if device is not None:
                model = model.to(device)
            cfg = data_config_for(model)
            if spec.eval_limit is not None:  # another evaluation set: runs of their own, never mixed with full ones
                variant = f"{variant} (val subset {spec.eval_limit})"
            base = {"model": model_name, "variant": variant, "calib_size": spec.calib_size}
            flt = {**base, "method": "float", "bits": "FP32", "seed": 0}
            with _claim(store, flt) as mine:
                if mine:
                    r = evaluate(model, spec.eval_data, limit=spec.eval_limit, progress=False)
                    _record(store, {**flt, "top1": _percent(r, r.top1), "eval": r.source})
                    added += 1
            for method in spec.methods:
                for bits in spec.bits:
                    for seed in spec.seeds:
                        rec = {**base, "method": method, "bits": bits.upper(), "seed": seed}
                        with _claim(store, rec) as mine:
                            if not mine:
                                continue
                            try:
                                rec = _run(rec, model, spec, cfg, machine)
                            except VitquantError as e:  # a method that refuses this architecture: recorded
                                rec.update(refused=str(e), machine=machine,
                                           finished=datetime.now(timezone.utc).isoformat(timespec="seconds"))
                            _record(store, rec)
                            added += 1
                            if progress and "refused" in rec:
                                print(f"{model_name} [{variant}] {method} {bits} seed {seed}: refused: {rec['refused']}",
                                      flush=True)
                            elif progress:
                                agree = f" (agree {rec['agreement']:.1f}%)" if "agreement" in rec else ""
                                print(f"{model_name} [{variant}] {method} {bits} seed {seed}: top-1 "
                                      f"{rec['top1']:.2f}{agree}, calib {rec['calib_seconds']:.1f} s", flush=True)
    return added


def _run(rec: dict[str, Any], model, spec: SweepSpec, cfg: dict, machine: str) -> dict[str, Any]:
    name, options = parse_method_spec(rec["method"])
    config = QuantConfig.preset(rec["bits"], method=name, options=options, seed=rec["seed"],
                                calib_size=spec.calib_size)
    calib = load_calibration(spec.calib, cfg, n=spec.calib_size, seed=rec["seed"])
    with measure() as m:
        q = quantize(model, config, calib, progress=False)
    r = evaluate(q, spec.eval_data, float_model=model if spec.agreement else None, limit=spec.eval_limit,
                 progress=False)
    rec.update(top1=_percent(r, r.top1))
    if r.agreement is not None:
        rec.update(agreement=_percent(r, r.agreement))
    rec.update(calib_seconds=round(m.seconds, 3), peak_rss_mb=round(m.peak_rss_mb, 1),
               delta_rss_mb=round(m.delta_rss_mb, 1), size_bytes=q.size_bytes(), eval=r.source, calib=calib.source,
               machine=machine, finished=datetime.now(timezone.utc).isoformat(timespec="seconds"))
    return rec


def distinct_runs(records: list[dict[str, Any]], key: Callable[[dict[str, Any]], tuple] = _key) -> list[dict[str, Any]]:
    """The first record of each run key: a store shared by processes without locks (or merged by hand)
    may hold one run twice, and a mean must not weight it double."""
    seen: set[tuple] = set()
    out = []
    for r in records:
        k = key(r)
        if k not in seen:
            seen.add(k)
            out.append(r)
    return out


def summarize(records: list[dict[str, Any]]) -> dict[tuple, dict[str, Any]]:
    """(model, variant, method, bits) -> mean/spread of top-1 over seeds (each run once), mean calib time,
    max peak RSS."""
    groups: dict[tuple, list[dict[str, Any]]] = {}
    for r in distinct_runs(records):
        groups.setdefault((r["model"], r["variant"], r["method"], r["bits"]), []).append(r)
    out = {}
    for k, rs in groups.items():
        if all("refused" in r for r in rs):
            out[k] = {"refused": rs[0]["refused"], "n": 0}
            continue
        rs = [r for r in rs if "refused" not in r]
        top1 = [r["top1"] for r in rs]
        out[k] = {
            "top1": statistics.mean(top1), "min": min(top1), "max": max(top1), "n": len(rs),
            "calib_seconds": statistics.mean(r.get("calib_seconds", 0.0) for r in rs),
            "peak_rss_mb": max(r.get("peak_rss_mb", 0.0) for r in rs),
            "agreement": statistics.mean(r["agreement"] for r in rs) if "agreement" in rs[0] else None,
        }
    return out
