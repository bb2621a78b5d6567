"""ISA-aware choice of the integer scheme ONNX Runtime runs (activation and weight integer types).

Why it matters (ONNX Runtime's quantization docs, "when to use U8S8 / reduce_range"; deployment.md):
ONNX Runtime's MLAS runs uint8×int8 (u8s8) GEMMs fastest on x86, but without VNNI it multiplies with
`vpmaddubsw`, which adds *pairs* of u8·s8 products into int16 and saturates: 2·255·127 = 64770 >
32767. VNNI (`vpdpbusd`, AVX512-VNNI or AVX-VNNI) and AMX accumulate into int32 and cannot saturate;
ARM's dot-product kernels neither. Fixes where it can saturate:
- weights of ≤ 7 bits: 2·255·63 = 32130 ≤ 32767, so u8s8 is exact (ORT's `reduce_range`);
- u8u8: MLAS widens to int16 and uses `vpmaddwd` (int32 sums), exact for any 8-bit grid, slower.
vitquant never silently changes the simulated numerics, so with 8-bit weights on a saturating CPU the
automatic choice is u8u8 (exact); calibrating at 7-bit weights (W7A8) makes u8s8 exact and fast, and
`scheme="u8s8-w7"` forces the re-quantization to 7-bit weights (its parity cost is in the parity report).

The flags come from /proc/cpuinfo (Linux) and the saturation behavior from a 1 ms probe of ONNX
Runtime itself (`probe_u8s8_saturation`): the probe is the truth about what the runtime does here.
"""
from __future__ import annotations

import os
import platform
from dataclasses import dataclass, field

import numpy as np

from vitquant.errors import VitquantError

SCHEMES = ("auto", "u8s8", "u8u8", "u8s8-w7")
_VNNI_FLAGS = ("avx512_vnni", "avx_vnni", "amx_int8")
_INT16_PAIR_LIMIT = 32767


@dataclass(frozen=True)
class CpuInfo:
    arch: str  # platform.machine(): x86_64, aarch64, ...
    model: str
    flags: frozenset[str]
    physical_cores: int
    u8s8_saturates: bool | None = None  # measured by the probe; None: not probed

    @property
    def isa(self) -> str:
        """The best integer-GEMM ISA level, as the ORT kernels see it."""
        f = self.flags
        if self.arch in ("aarch64", "arm64"):
            return "arm64-dotprod" if ("asimddp" in f or "dotprod" in f) else "arm64"
        for flag, name in (("amx_int8", "AMX-INT8"), ("avx512_vnni", "AVX512-VNNI"), ("avx_vnni", "AVX-VNNI"),
                           ("avx512bw", "AVX512BW"), ("avx2", "AVX2"), ("sse4_1", "SSE4.1")):
            if flag in f:
                return name
        return "unknown"

    @property
    def has_vnni(self) -> bool:
        return any(flag in self.flags for flag in _VNNI_FLAGS)

    def summary(self) -> str:
        shown = [f for f in ("avx2", "fma", "avx512f", "avx512bw", "avx512_vnni", "avx_vnni", "amx_int8")
                 if f in self.flags]
        sat = {None: "not probed", True: "saturates", False: "does not saturate"}[self.u8s8_saturates]
        return (f"{self.model} ({self.arch}, {self.physical_cores} physical cores); ISA {self.isa}; "
                f"flags: {' '.join(shown) or 'none'}; ORT u8s8 GEMM {sat}")


@dataclass(frozen=True)
class Scheme:
    """The integer types the deployed GEMMs use and why."""

    name: str  # "u8s8", "u8u8", "u8s8-w7"
    weight_dtype: str  # "int8" or "uint8"
    weight_bits: int  # 8, or 7 when 8-bit weights are re-quantized
    reason: str
    isa: str = ""
    notes: tuple[str, ...] = field(default_factory=tuple)


def parse_cpuinfo(text: str) -> tuple[str, frozenset[str], int]:
    """(model name, flags, physical cores) from /proc/cpuinfo text (x86 "flags", ARM "Features")."""
    model, flags, cores, phys = "", set(), set(), "0"
    for line in text.splitlines():
        key, _, value = line.partition(":")
        key, value = key.strip(), value.strip()
        if key in ("flags", "Features"):
            flags.update(value.split())
        elif key == "model name" and not model:
            model = value
        elif key == "physical id":
            phys = value
        elif key == "core id":
            cores.add((phys, value))
    return model, frozenset(flags), len(cores)


def _read_cpuinfo() -> tuple[str, frozenset[str], int]:
    try:
        with open("/proc/cpuinfo", encoding="utf-8", errors="replace") as fh:
            model, flags, cores = parse_cpuinfo(fh.read())
    except OSError:  # not Linux: no flags, the probe still tells the truth about saturation
        model, flags, cores = "", frozenset(), 0
    return model or platform.processor() or platform.machine(), flags, cores or (os.cpu_count() or 1)


def probe_u8s8_saturation() -> bool | None:
    """Does ONNX Runtime's u8s8 GEMM saturate on this CPU? A = 255, B = 127 over K = 64 must give
    255·127·64 exactly; a pairwise int16 kernel gives 32767·32 instead. None if ORT is missing."""
    try:
        import onnxruntime as ort
        from onnx import TensorProto, helper, numpy_helper
    except ImportError:
        return None
    from vitquant.export.graph import IR_VERSION

    k = 64
    b = numpy_helper.from_array(np.full((k, 16), 127, np.int8), "B")
    graph = helper.make_graph([helper.make_node("MatMulInteger", ["A", "B"], ["Y"])], "probe",
                              [helper.make_tensor_value_info("A", TensorProto.UINT8, [16, k])],
                              [helper.make_tensor_value_info("Y", TensorProto.INT32, [16, 16])], [b])
    model = helper.make_model(graph, ir_version=IR_VERSION, opset_imports=[helper.make_opsetid("", 13)])
    so = ort.SessionOptions()
    so.intra_op_num_threads = 1
    sess = ort.InferenceSession(model.SerializeToString(), so, providers=["CPUExecutionProvider"])
    y = sess.run(None, {"A": np.full((16, k), 255, np.uint8)})[0]
    return bool(np.any(y != 255 * 127 * k))


_DETECTED: CpuInfo | None = None


def detect_cpu(probe: bool = True) -> CpuInfo:
    """This machine's CPU (cached: flags do not change while a process runs)."""
    global _DETECTED
    if _DETECTED is None or (probe and _DETECTED.u8s8_saturates is None):
        model, flags, cores = _read_cpuinfo()
        _DETECTED = CpuInfo(platform.machine().lower(), model, flags, cores,
                            probe_u8s8_saturation() if probe else None)
    return _DETECTED


def u8s8_can_saturate(cpu: CpuInfo) -> bool:
    """The probe's answer when there is one, else what the flags imply."""
    if cpu.u8s8_saturates is not None:
        return cpu.u8s8_saturates
    if cpu.arch in ("aarch64", "arm64"):
        return False  # udot/sdot accumulate into int32
    return not cpu.has_vnni


def choose_scheme(cpu: CpuInfo, weight_bits: int, requested: str = "auto") -> Scheme:
    """The scheme for a model whose widest quantized weight has `weight_bits` bits."""
    if requested not in SCHEMES:
        raise VitquantError(f"integer scheme must be one of {', '.join(SCHEMES)}, not {requested!r}")
    saturates = u8s8_can_saturate(cpu)
    safe_pairs = 2 * 255 * (2 ** (weight_bits - 1) - 1) <= _INT16_PAIR_LIMIT
    if requested == "u8u8":
        return Scheme("u8u8", "uint8", weight_bits, "requested", cpu.isa)
    if requested == "u8s8-w7":
        bits = min(weight_bits, 7)
        note = () if bits == weight_bits else (f"{weight_bits}-bit weights re-quantized to 7 bits",)
        return Scheme("u8s8-w7", "int8", bits, "requested", cpu.isa, note)
    if requested == "u8s8":
        notes = (("u8s8 products may saturate on this CPU (no VNNI): outputs can differ from the simulation",)
                 if saturates and not safe_pairs else ())
        return Scheme("u8s8", "int8", weight_bits, "requested", cpu.isa, notes)
    if not saturates:
        why = "VNNI/dot-product kernels accumulate in int32: u8s8 cannot saturate"
        return Scheme("u8s8", "int8", weight_bits, f"{cpu.isa}: {why}", cpu.isa)
    if safe_pairs:
        why = f"{weight_bits}-bit weights keep 2·255·{2 ** (weight_bits - 1) - 1} ≤ 32767: u8s8 cannot saturate"
        return Scheme("u8s8", "int8", weight_bits, f"{cpu.isa} without VNNI, but {why}", cpu.isa)
    why = ("u8s8 pairs of 8-bit products can saturate int16 (vpmaddubsw); u8u8 is exact. Calibrate at "
           "W7A8 (or pass scheme='u8s8-w7') for the faster u8s8 kernels")
    return Scheme("u8u8", "uint8", weight_bits, f"{cpu.isa} without VNNI: {why}", cpu.isa)
