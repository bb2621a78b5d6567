"""Everything around calibration runs on a device that is not the CPU: data-free generation, saving a
model quantized there (the same files as from the CPU), loading onto a device, evaluation, analysis and
mixed precision — each bit-identical to the CPU run on the simulated device (simulated_device.py)."""
from __future__ import annotations

import torch
from simulated_device import SIM, SimulatedDevice, off_device

import vitquant
from vitquant.calibration.data import CalibrationSet, LabeledSet
from vitquant.calibration.datafree import DataFreeConfig, generate_calibration
from vitquant.config import QuantConfig
from vitquant.serialization import META, WEIGHTS, read_meta


def _model(tiny_vit_factory):
    model = tiny_vit_factory(depth=2, embed_dim=32)
    for block in model.blocks:  # no fused SDPA: its kernel is chosen by device type (different last bits)
        block.attn.fused_attn = False
    return model


def _images(n: int, seed: int = 3) -> torch.Tensor:
    return torch.randn(n, 1, 28, 28, generator=torch.Generator().manual_seed(seed))


def _labeled(n: int = 16) -> LabeledSet:
    return LabeledSet(_images(n, seed=4), torch.arange(n) % 10, "random labeled", None, [])


def test_data_free_generation_runs_on_the_device(tiny_vit_factory):
    model = _model(tiny_vit_factory)
    config = DataFreeConfig(n_images=4, steps=4, batch_size=2)
    with SimulatedDevice():
        model.to(SIM)
        try:
            on_device = generate_calibration(model, config=config, progress=False)
        finally:
            model.cpu()
    assert on_device.images.device.type == "cpu"  # a CalibrationSet: the engine moves its batches
    assert torch.equal(on_device.images, generate_calibration(model, config=config, progress=False).images)


def test_a_model_quantized_on_the_device_saves_the_same_files_and_loads_onto_a_device(tiny_vit_factory, tmp_path):
    model = _model(tiny_vit_factory)
    config = QuantConfig.preset("w4a4", method="repq-vit", calib_size=8)
    calib = CalibrationSet(_images(8), "random", [])
    with SimulatedDevice():
        model.to(SIM)
        try:
            vitquant.save(vitquant.quantize(model, config, calib, progress=False), tmp_path / "device")
        finally:
            model.cpu()
    cpu = vitquant.quantize(model, config, calib, progress=False)
    vitquant.save(cpu, tmp_path / "cpu")
    assert (tmp_path / "device" / WEIGHTS).read_bytes() == (tmp_path / "cpu" / WEIGHTS).read_bytes()
    assert read_meta(tmp_path / "device")["quantizers"] == read_meta(tmp_path / "cpu")["quantizers"]
    assert (tmp_path / "device" / META).is_file()

    # loaded on the CPU (a hand-built model: its float architecture is passed); .to(device) moves all of it
    loaded = vitquant.load(tmp_path / "device", model=_model(tiny_vit_factory))
    reference = vitquant.evaluate(cpu, _labeled(), float_model=model, progress=False)
    with SimulatedDevice():
        loaded.to(SIM)
        model.to(SIM)
        try:
            assert off_device(loaded) == []
            result = vitquant.evaluate(loaded, _labeled(), float_model=model, progress=False)
            # a float architecture on the device: the quantized model is loaded there
            onto = vitquant.load(tmp_path / "device", model=_model(tiny_vit_factory).to(SIM))
            assert off_device(onto) == []
            with torch.no_grad():
                out = onto(_images(4).to(SIM)).cpu()
        finally:
            model.cpu()
    assert (result.top1, result.top5, result.agreement) == (reference.top1, reference.top5, reference.agreement)
    with torch.no_grad():
        assert torch.equal(out, cpu(_images(4)))


def test_analysis_and_mixed_precision_run_on_the_device(tiny_vit_factory):
    from vitquant.analysis.analyzer import analyze
    from vitquant.mixed.tables import build_table
    from vitquant.mixed.target import meet_target

    model = _model(tiny_vit_factory)
    config = QuantConfig.preset("w4a4", method="minmax", calib_size=8)
    calib = CalibrationSet(_images(8), "random", [])

    def run():
        analysis = analyze(model, config, calib, eval_data=_labeled(), progress=False)
        table = build_table(model, config, calib, w_levels=(4, 8), a_levels=(4, None), measured=False)
        target = meet_target(model, config, calib, _labeled(), max_drop=50.0)
        return analysis.overall, analysis.points, table.costs, table.relevance, target.to_dict()

    with SimulatedDevice():
        model.to(SIM)
        try:
            on_device = run()
        finally:
            model.cpu()
    assert on_device == run()
