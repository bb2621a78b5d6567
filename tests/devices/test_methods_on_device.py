"""Every method calibrates on a device that is not the CPU, and its quantized model lives and computes there.

The CPU suite runs each method on the simulated device (simulated_device.py: CUDA's device rules,
CPU data), where any tensor a method makes on the CPU and combines with the model's, any CPU generator
drawing for a device tensor, any `.numpy()` of a device tensor fails with the op that did it; the
result must be bit-identical to calibrating on the CPU (the same code path, only placed elsewhere).
The `cuda`-marked tests run the same on a real GPU and compare with the CPU by SQNR and agreement.
"""
from __future__ import annotations

import pytest
import torch
from simulated_device import SIM, SimulatedDevice, off_device

import vitquant
from vitquant.calibration.data import CalibrationSet
from vitquant.config import QuantConfig

# the smallest settings that still run every step of each method
FAST = {
    "minmax": {}, "percentile": {}, "repq-vit": {}, "fq-vit": {}, "dopq-vit": {},
    "noisyquant": {"clip_steps": 10, "mean_steps": 4, "range_steps": 4},
    "erq": {"max_flips": 4},
    "ptq4vit": {"candidates": 6, "rounds": 1},
    "adalog": {"candidates": 8, "top_k": 2, "steps": 2, "rounds": 1, "q_range": (1, 41)},
    "ias-vit": {"iters": 3},
}
BRANCHES = [  # options that take another path through a method
    ("noisyquant", {"noise": "code"}), ("ptq4vit", {"matmul_per_head": True, "quantize_image": True}),
    ("adalog", {"reconstruct": True, "reconstruct_iters": 2}), ("dopq-vit", {"reconstruct": True, "reconstruct_iters": 2}),
    # the seeded row and image samples real-size models take (here forced on the tiny model)
    ("adalog", {"max_rows": 32, "whole_rows": 16, "min_rows": 16, "search_macs": 1, "core_macs": 1}),
    ("ptq4vit", {"search_macs": 1}),
    # QuantConfig(deployable=True): uniform stand-ins probed from the fitted quantizers
    ("repq-vit", {"deployable": True}),
]


def _calib(n: int = 8) -> CalibrationSet:
    return CalibrationSet(torch.randn(n, 1, 28, 28, generator=torch.Generator().manual_seed(3)), "random", [])


# needs the model's fused SDPA call (its attention-scores site sits there)
NEEDS_SDPA = {"fq-vit"}


def _model(tiny_vit_factory, method: str):
    """Attention written out where the method allows: a fused SDPA call picks its kernel by device type (the
    CPU's flash kernel, the simulated device's math path, CUDA's own), and kernels differ in the last bits."""
    model = tiny_vit_factory(depth=2, embed_dim=32)
    for block in model.blocks:
        block.attn.fused_attn = method in NEEDS_SDPA
    return model


def _quantize(model, method: str, options: dict):
    bits = "w8a8" if method in NEEDS_SDPA else "w4a4"  # fq-vit's W4A4 outputs of a random tiny model are all 0
    options = dict(options)
    deployable = options.pop("deployable", False)  # a QuantConfig field, listed with the options here
    config = QuantConfig.preset(bits, method=method, options={**FAST[method], **options}, calib_size=8,
                                deployable=deployable)
    return vitquant.quantize(model, config, _calib(), progress=False)


def _on_simulated_device(model, method: str, options: dict):
    x = _calib(4).images
    with SimulatedDevice():
        model.to(SIM)
        try:
            qmodel = _quantize(model, method, options)
            assert off_device(qmodel) == []  # every quantizer, weight and buffer where the model is
            with torch.no_grad():
                out = qmodel(x.to(SIM)).cpu()
            qmodel.cpu()
        finally:
            model.cpu()
    return qmodel, out


@pytest.mark.parametrize("method, options", [(m, {}) for m in FAST] + BRANCHES,
                         ids=[*FAST, *(f"{m}-{'-'.join(o)}" for m, o in BRANCHES)])
def test_a_method_calibrates_on_another_device_exactly_as_on_the_cpu(tiny_vit_factory, sqnr, method, options):
    model = _model(tiny_vit_factory, method)
    qmodel, out = _on_simulated_device(model, method, options)
    cpu = _quantize(model, method, options)
    with torch.no_grad():
        ref = cpu(_calib(4).images)
    if method in NEEDS_SDPA:  # the float pass's attention kernel differs: the same quantizers, to rounding
        assert sqnr(ref, out) > 40
        assert {k: type(s.quantizer) for k, s in qmodel.act_sites().items()} == \
               {k: type(s.quantizer) for k, s in cpu.act_sites().items()}
        return
    assert torch.equal(out, ref)
    assert qmodel.quantizer_specs() == cpu.quantizer_specs()
