"""`--device` on quantize, eval and analyze: resolved and refused before any work, and the commands run on
the device they are given (the simulated one here, the CPU end to end)."""
from __future__ import annotations

import pytest
import torch
from simulated_device import SIM, SimulatedDevice

import vitquant
from vitquant.cli import main, resolve_device
from vitquant.errors import VitquantError

no_cuda = pytest.mark.skipif(torch.cuda.is_available(), reason="needs a machine without CUDA")
COMMANDS = {
    "quantize": ["quantize", "--bits", "w8a8", "--method", "minmax", "--calib-size", "8", "--quiet"],
    "eval": ["eval", "bundled", "--limit", "20", "--quiet"],
    "analyze": ["analyze", "--bits", "w8a8", "--method", "minmax", "--calib-size", "8", "--quiet"],
}


def _argv(command: str, tmp_path, *extra: str, out: str | None = None) -> list[str]:
    where = [] if command == "eval" else ["--out", out or str(tmp_path / f"{command}-out")]
    return [*COMMANDS[command], *where, *extra]


def _one_error_line(capsys) -> str:
    captured = capsys.readouterr()
    err = captured.err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("vitquant: error: "), err
    assert captured.out == ""
    return err[0]


@no_cuda
@pytest.mark.parametrize("command", list(COMMANDS))
@pytest.mark.parametrize("device", ["cuda", "cuda:1"])
def test_cuda_without_cuda_is_one_error_line_before_any_work(command, device, tmp_path, capsys, monkeypatch):
    def never(*_a, **_k):
        raise AssertionError("a model was loaded before --device was checked")

    monkeypatch.setattr(vitquant, "load_model", never)
    monkeypatch.setattr(vitquant, "load", never)
    assert main(_argv(command, tmp_path, "--device", device)) == 2
    line = _one_error_line(capsys)
    assert "no CUDA device" in line and "use --device cpu" in line
    assert not (tmp_path / f"{command}-out").exists()


@pytest.mark.parametrize("device, message", [("gpu0", "is not a device"), ("mps", "'cpu' or 'cuda' devices only")])
def test_a_device_vitquant_cannot_use_is_refused(device, message, tmp_path, capsys):
    assert main(_argv("quantize", tmp_path, "--device", device)) == 2
    assert message in _one_error_line(capsys)


def test_onnxruntime_evaluation_refuses_a_gpu_device(tmp_path, capsys):
    assert main(["eval", str(tmp_path / "model.onnx"), "--device", "cuda:0"]) == 2
    assert "ONNX Runtime runs on the CPU" in _one_error_line(capsys)


@no_cuda
def test_the_default_is_cuda_when_available_else_the_cpu(monkeypatch):
    assert resolve_device(None) == torch.device("cpu")
    assert resolve_device("cpu") == torch.device("cpu")
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 2)
    assert resolve_device(None) == torch.device("cuda", 0)
    assert resolve_device("cuda:1") == torch.device("cuda", 1)
    with pytest.raises(VitquantError, match="2 CUDA device"):
        resolve_device("cuda:2")


def test_device_cpu_end_to_end_on_the_bundled_model(tmp_path, capsys):
    out = tmp_path / "quantize-out"
    assert main(_argv("quantize", tmp_path, "--device", "cpu")) == 0
    assert (out / "model.safetensors").is_file()
    assert main(["eval", str(out), "--limit", "20", "--quiet", "--device", "cpu"]) == 0
    assert "top-1" in capsys.readouterr().out


def test_quantize_and_eval_run_on_the_device_they_are_given(tmp_path, capsys, monkeypatch):
    """The commands move the model to --device (here the simulated one: any CPU tensor they mixed in would
    fail), and a model quantized there is saved as the same files as one quantized on the CPU."""
    assert main(_argv("quantize", tmp_path, "--device", "cpu", out=str(tmp_path / "cpu"))) == 0
    monkeypatch.setattr("vitquant.cli.resolve_device", lambda requested: SIM)
    with SimulatedDevice():
        assert main(_argv("quantize", tmp_path, "--device", "sim", out=str(tmp_path / "sim"))) == 0
        assert main(["eval", str(tmp_path / "sim"), "--limit", "20", "--quiet", "--device", "sim"]) == 0
    assert "top-1" in capsys.readouterr().out
    assert (tmp_path / "sim" / "model.safetensors").read_bytes() == (tmp_path / "cpu" / "model.safetensors").read_bytes()


def test_analyze_hands_the_analysis_a_model_on_its_device(tmp_path, capsys, monkeypatch):
    """(The analysis itself on the device: test_pipeline_on_device.py.)"""
    seen = []

    def analyze(model, *_a, **_k):
        seen.append(next(model.parameters()).device)
        raise VitquantError("stopped after the device check")

    monkeypatch.setattr("vitquant.cli.resolve_device", lambda requested: SIM)
    monkeypatch.setattr("vitquant.analysis.analyzer.analyze", analyze)
    with SimulatedDevice():
        assert main(_argv("analyze", tmp_path, "--device", "sim")) == 2
    assert seen == [SIM] and "stopped after the device check" in capsys.readouterr().err
