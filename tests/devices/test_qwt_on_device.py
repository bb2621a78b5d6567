"""`<method>+qwt` fits, saves and loads its compensation on a device that is not the CPU (the simulated
device: CUDA's rules, CPU data), bit-identical to the CPU; the `cuda` test does the same on a real GPU."""
from __future__ import annotations

import pytest
import torch
from simulated_device import SIM, SimulatedDevice, off_device

import vitquant
from vitquant.calibration.data import CalibrationSet
from vitquant.config import QuantConfig
from vitquant.methods.qwt import compensation_of


def _calib(n: int = 16) -> CalibrationSet:
    return CalibrationSet(torch.randn(n, 1, 28, 28, generator=torch.Generator().manual_seed(3)), "random", [])


def _quantize(model):
    return vitquant.quantize(model, QuantConfig.preset("w4a4", method="repq-vit+qwt", calib_size=16), _calib(),
                             progress=False)


def test_qwt_on_another_device_equals_the_cpu(tiny_vit_factory, tmp_path):
    model = tiny_vit_factory(depth=2, embed_dim=32)
    for block in model.blocks:
        block.attn.fused_attn = False
    x = _calib(4).images
    cpu = _quantize(model)
    with torch.no_grad():
        ref = cpu(x)
    with SimulatedDevice():
        model.to(SIM)
        try:
            qmodel = _quantize(model)
            assert off_device(qmodel) == [] and compensation_of(qmodel).units == ["blocks.0", "blocks.1"]
            with torch.no_grad():
                out = qmodel(x.to(SIM)).cpu()
            vitquant.save(qmodel, tmp_path / "q")
            loaded = vitquant.load(tmp_path / "q", model=model)  # onto the given model's device
            assert off_device(loaded) == []
            with torch.no_grad():
                assert torch.equal(loaded(x.to(SIM)).cpu(), out)
        finally:
            model.cpu()
    assert torch.equal(out, ref)


@pytest.mark.cuda
def test_qwt_on_cuda(tiny_vit_factory, sqnr, tmp_path):
    model = tiny_vit_factory(depth=2, embed_dim=32)
    x = _calib(4).images
    with torch.no_grad():
        ref = _quantize(model)(x)
        qmodel = _quantize(model.cuda())
        out = qmodel(x.cuda()).cpu()
        assert all(t.is_cuda for t in compensation_of(qmodel).buffers())
        vitquant.save(qmodel, tmp_path / "q")
        loaded = vitquant.load(tmp_path / "q", model=model)
        assert torch.equal(loaded(x.cuda()).cpu(), out)
    assert sqnr(ref, out) > 30
