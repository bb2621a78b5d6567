"""ISA detection and scheme choice, with faked CPU flags (the machine running the tests does not matter)."""
from __future__ import annotations

import pytest

from vitquant.errors import VitquantError
from vitquant.export.isa import CpuInfo, choose_scheme, parse_cpuinfo, u8s8_can_saturate


def cpu(*flags: str, arch: str = "x86_64", saturates: bool | None = None) -> CpuInfo:
    return CpuInfo(arch, "fake", frozenset(flags), 2, saturates)


AVX2 = ("sse4_1", "avx2", "fma")
ZEN4 = (*AVX2, "avx512f", "avx512bw", "avx512_vnni")


@pytest.mark.parametrize("flags, isa", [(AVX2, "AVX2"), (ZEN4, "AVX512-VNNI"), ((*AVX2, "avx_vnni"), "AVX-VNNI"),
                                        ((*AVX2, "avx512f", "avx512bw"), "AVX512BW"), ((), "unknown")])
def test_isa_names(flags, isa):
    assert cpu(*flags).isa == isa


def test_vnni_picks_full_8_bit_u8s8():
    s = choose_scheme(cpu(*ZEN4), weight_bits=8)
    assert (s.name, s.weight_dtype, s.weight_bits) == ("u8s8", "int8", 8)
    assert "VNNI" in s.reason


def test_avx2_without_vnni_never_picks_saturating_u8s8_for_8_bit_weights():
    s = choose_scheme(cpu(*AVX2), weight_bits=8)
    assert (s.name, s.weight_dtype, s.weight_bits) == ("u8u8", "uint8", 8)
    assert "saturate" in s.reason


def test_avx2_with_7_bit_weights_is_safe_u8s8():
    # 2·255·63 = 32130 ≤ 32767: the int16 pair sum of vpmaddubsw cannot overflow
    s = choose_scheme(cpu(*AVX2), weight_bits=7)
    assert (s.name, s.weight_bits) == ("u8s8", 7)


def test_requested_reduce_range_requantizes_8_bit_weights_to_7():
    s = choose_scheme(cpu(*AVX2), weight_bits=8, requested="u8s8-w7")
    assert (s.name, s.weight_dtype, s.weight_bits) == ("u8s8-w7", "int8", 7)
    assert any("7 bits" in n for n in s.notes)


def test_requested_u8s8_on_a_saturating_cpu_says_so():
    assert choose_scheme(cpu(*AVX2), 8, "u8s8").notes


def test_probe_overrides_flags():
    assert not u8s8_can_saturate(cpu(*AVX2, saturates=False))
    assert u8s8_can_saturate(cpu(*ZEN4, saturates=True))
    assert choose_scheme(cpu(*AVX2, saturates=False), 8).name == "u8s8"


def test_arm_dot_product_kernels_do_not_saturate():
    c = cpu("fp", "asimd", "asimddp", arch="aarch64")
    assert c.isa == "arm64-dotprod" and choose_scheme(c, 8).name == "u8s8"


def test_unknown_scheme_is_a_user_error():
    with pytest.raises(VitquantError, match="u8u8"):
        choose_scheme(cpu(*ZEN4), 8, "s8s8")


def test_parse_cpuinfo_counts_physical_cores_not_threads():
    text = "".join(f"processor\t: {i}\nmodel name\t: Fake CPU\nphysical id\t: 0\ncore id\t: {i // 2}\n"
                   f"flags\t\t: fpu avx2 avx512_vnni\n\n" for i in range(4))
    model, flags, cores = parse_cpuinfo(text)
    assert (model, cores) == ("Fake CPU", 2) and {"avx2", "avx512_vnni"} <= flags


def test_probe_agrees_with_this_machines_flags():
    pytest.importorskip("onnxruntime")
    from vitquant.export.isa import detect_cpu

    here = detect_cpu()
    assert here.u8s8_saturates is not None
    if here.arch == "x86_64" and here.has_vnni:
        assert here.u8s8_saturates is False
