"""On a real GPU (marked `cuda`, skipped without one): methods calibrate on CUDA to the CPU's result within
the kernels' rounding, evaluation, data-free generation, saving and the CLI work there.

CUDA's kernels differ from the CPU's in the last bits (and cuDNN convolutions may use TF32 by PyTorch's
default), so a range can land on the other side of a rounding boundary: these tests compare by SQNR of
the logits and top-1 agreement with the CPU-calibrated model, not bit for bit (the simulated device
checks the bit-for-bit device handling on every machine).
"""
from __future__ import annotations

import copy

import pytest
import torch

import vitquant
from vitquant.calibration.data import data_config_for, load_calibration, load_labeled
from vitquant.calibration.datafree import DataFreeConfig, generate_calibration, pixel_bounds
from vitquant.cli import main
from vitquant.config import QuantConfig

pytestmark = pytest.mark.cuda
CUDA = torch.device("cuda")
# (method, bits, options, least top-1 agreement with the CPU-calibrated model, least logit SQNR to it in dB)
CASES = [
    ("minmax", "w8a8", {}, 0.98, 25.0),
    ("percentile", "w8a8", {}, 0.98, 25.0),
    ("repq-vit", "w4a4", {}, 0.93, 10.0),
    ("adalog", "w4a4", {"candidates": 8, "top_k": 2, "steps": 2, "rounds": 1, "q_range": (1, 41)}, 0.90, 8.0),
]


@pytest.fixture(scope="module")
def bundled():
    model = vitquant.load_model("bundled")
    cfg = data_config_for(model)
    return model, load_calibration("bundled", cfg, n=32, seed=0), load_labeled("bundled", cfg, limit=256)


def _on_cuda(module: torch.nn.Module) -> list[str]:
    return [n for n, t in (*module.named_parameters(), *module.named_buffers()) if t.device.type != "cuda"]


@pytest.mark.parametrize("method, bits, options, agreement, min_sqnr", CASES, ids=[c[0] for c in CASES])
def test_a_method_on_cuda_gives_the_cpu_quantizers_to_rounding(bundled, sqnr, method, bits, options, agreement,
                                                                min_sqnr):
    model, calib, test = bundled
    config = QuantConfig.preset(bits, method=method, options=options)
    cpu = vitquant.quantize(model, config, calib, progress=False)
    gpu = vitquant.quantize(copy.deepcopy(model).to(CUDA), config, calib, progress=False)
    assert _on_cuda(gpu) == []
    with torch.no_grad():
        ref, out = cpu(test.images), gpu(test.images.to(CUDA)).cpu()
    assert (ref.argmax(1) == out.argmax(1)).double().mean() >= agreement
    assert sqnr(ref, out) > min_sqnr
    accuracy = lambda z: (z.argmax(1) == test.labels).double().mean().item() * 100  # noqa: E731
    assert abs(accuracy(out) - accuracy(ref)) <= 3


def test_a_saved_model_evaluates_on_cuda_as_on_the_cpu(bundled, tmp_path):
    model, calib, test = bundled
    qmodel = vitquant.quantize(copy.deepcopy(model).to(CUDA), QuantConfig.preset("w8a8", method="minmax"), calib,
                               progress=False)
    vitquant.save(qmodel, tmp_path / "q")  # from CUDA: CPU tensors in the file
    loaded = vitquant.load(tmp_path / "q")
    cpu = vitquant.evaluate(loaded, test, float_model=model, progress=False)
    gpu = vitquant.evaluate(loaded.to(CUDA), test, float_model=copy.deepcopy(model).to(CUDA), progress=False)
    assert _on_cuda(loaded) == []
    assert abs(gpu.top1 - cpu.top1) <= 1 and gpu.agreement >= 98


def test_data_free_generation_on_cuda(bundled):
    model, _, test = bundled
    gpu_model = copy.deepcopy(model).to(CUDA)
    generated = generate_calibration(gpu_model, config=DataFreeConfig(n_images=8, steps=20), progress=False)
    low, high = pixel_bounds(data_config_for(model))
    images = generated.images
    assert images.shape == (8, *test.images.shape[1:]) and images.device.type == "cpu"
    assert torch.isfinite(images).all() and (images >= low - 1e-5).all() and (images <= high + 1e-5).all()
    qmodel = vitquant.quantize(gpu_model, QuantConfig.preset("w8a8", method="minmax", calib_size=8), generated,
                               progress=False)
    assert _on_cuda(qmodel) == []


def test_the_cli_quantizes_and_evaluates_on_cuda(tmp_path, capsys):
    out = tmp_path / "q"
    assert main(["quantize", "--bits", "w8a8", "--method", "minmax", "--calib-size", "8", "--device", "cuda",
                 "--out", str(out), "--quiet"]) == 0
    assert main(["eval", str(out), "--limit", "100", "--device", "cuda", "--quiet"]) == 0
    assert "agreement with float" in capsys.readouterr().out
    assert main(["quantize", "--calib", "data-free", "--data-free-steps", "10", "--calib-size", "8", "--bits", "w8a8",
                 "--method", "minmax", "--device", "cuda", "--out", str(tmp_path / "df"), "--quiet"]) == 0
    assert (tmp_path / "df" / "calibration_images.png").is_file()
