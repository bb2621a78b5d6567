"""`python -m vitquant.export` (export / eval / cpu), the entry points the main CLI mounts."""
from __future__ import annotations

import pytest

pytest.importorskip("onnxruntime")

import vitquant  # noqa: E402
from vitquant.export.cli import main  # noqa: E402


@pytest.fixture
def saved(tmp_path, tiny_vit_factory, calib_images):
    model = tiny_vit_factory()
    # what load_model records, so that `vitquant.load` can rebuild the architecture
    model.vitquant_source = {"type": "timm.VisionTransformer", "pretrained_cfg": model.pretrained_cfg,
                             "kwargs": dict(img_size=28, patch_size=7, in_chans=1, num_classes=10, embed_dim=64,
                                            depth=2, num_heads=2)}
    qmodel = vitquant.quantize(model, vitquant.QuantConfig(deployable=True), calib_images, progress=False)
    return vitquant.save(qmodel, tmp_path / "q")


def test_export_then_eval_from_the_command_line(saved, tmp_path, capsys):
    out, report = tmp_path / "m.onnx", tmp_path / "report.md"
    assert main(["export", str(saved), "--out", str(out), "--parity", "bundled", "--limit", "40",
                 "--report", str(report), "--quiet"]) == 0
    text = report.read_text()
    assert "integer scheme" in text and "top-1 agreement: 100.00%" in text and "| blocks.1.mlp.fc2 |" in text
    assert main(["eval", str(out), "--limit", "40", "--quiet"]) == 0
    assert "[onnxruntime, u8" in capsys.readouterr().out
    assert main(["export", str(saved), "--out", str(out)]) == 2  # exists, no --force


def test_eval_a_quantized_directory_exports_on_the_fly(saved, capsys):
    assert main(["eval", str(saved), "--limit", "20", "--quiet"]) == 0
    assert "top-1" in capsys.readouterr().out


def test_a_float_model_directory_is_a_clear_error(tmp_path, capsys):
    assert main(["export", str(tmp_path), "--out", str(tmp_path / "x.onnx")]) == 2
    assert "not a saved quantized model directory" in capsys.readouterr().err


def test_cpu_prints_the_scheme(capsys):
    assert main(["cpu"]) == 0
    assert "8-bit weights ->" in capsys.readouterr().out
