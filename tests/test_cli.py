"""The command line: happy paths on a tiny model file, and one clear error line for each bad input."""
import json
import subprocess
import sys

import numpy as np
import pytest
from PIL import Image
from safetensors.torch import save_file

from vitquant.cli import main

TINY_KWARGS = dict(img_size=28, patch_size=7, in_chans=1, num_classes=3, embed_dim=32, depth=1, num_heads=2)
MNIST_CFG = {"input_size": [1, 28, 28], "mean": [0.1307], "std": [0.3081], "crop_pct": 1.0,
             "interpolation": "bilinear", "num_classes": 3}


def _model_file(tmp_path, **overrides):
    from timm.models.vision_transformer import VisionTransformer

    kwargs = {**TINY_KWARGS, **overrides}
    m = VisionTransformer(**kwargs)
    path = tmp_path / "tiny.safetensors"
    save_file({k: v.contiguous() for k, v in m.state_dict().items()}, str(path))
    path.with_suffix(".json").write_text(json.dumps({
        "format": "vitquant-model/1", "architecture": "timm.VisionTransformer", "model_kwargs": kwargs,
        "pretrained_cfg": MNIST_CFG}))
    return path


def _images(folder, n, classes=None, corrupt=0):
    rng = np.random.default_rng(0)
    for i in range(n):
        sub = folder / (classes[i % len(classes)] if classes else "")
        sub.mkdir(parents=True, exist_ok=True)
        Image.fromarray(rng.integers(0, 255, (28, 28), dtype=np.uint8)).save(sub / f"img{i}.png")
    for i in range(corrupt):
        (folder / f"broken{i}.png").write_bytes(b"not an image at all")
    return folder


def _run_error(capsys, argv):
    rc = main(argv)
    err = capsys.readouterr().err.strip().splitlines()
    assert rc == 2
    assert len(err) == 1 and err[0].startswith("vitquant: error: "), err
    return err[0]


def test_list(capsys):
    assert main(["list"]) == 0
    out = capsys.readouterr().out
    assert "repq-vit" in out and "minmax" in out and "w4a4" in out


def test_quantize_then_eval(tmp_path, capsys):
    model = _model_file(tmp_path)
    calib = _images(tmp_path / "calib", 10, corrupt=1)
    evald = _images(tmp_path / "val", 12, classes=["a", "b", "c"])
    out = tmp_path / "out"
    with pytest.warns(UserWarning, match="skipped 1 unreadable image file.*broken0.png"):
        rc = main(["quantize", "--model", str(model), "--calib", str(calib), "--bits", "w4a4", "--method",
                   "minmax", "--out", str(out), "--eval", str(evald), "--quiet"])
    stdout = capsys.readouterr().out
    assert rc == 0
    assert "1 unreadable skipped" in stdout and "top-1" in stdout
    assert (out / "model.safetensors").is_file() and (out / "quant_config.json").is_file()
    assert main(["eval", str(out), "--data", str(evald), "--quiet"]) == 0
    assert "agreement with float" in capsys.readouterr().out
    # an existing result is never overwritten without --force
    assert "already exists" in _run_error(capsys, ["quantize", "--model", str(model), "--calib", str(calib),
                                                   "--out", str(out), "--quiet"])


@pytest.mark.parametrize("case", ["missing", "empty", "corrupt_only", "too_few", "bits", "unknown_model",
                                  "bad_option"])
def test_bad_input_gives_one_error_line_and_writes_nothing(tmp_path, capsys, case):
    model, calib, bits, opts = str(_model_file(tmp_path)), tmp_path / "calib", "w4a4", []
    if case == "missing":
        calib = tmp_path / "does-not-exist"
    elif case == "empty":
        calib.mkdir()
    elif case == "corrupt_only":
        calib.mkdir()
        _images(calib, 0, corrupt=9)
    elif case == "too_few":
        _images(calib, 3)
    else:
        _images(calib, 10)
    if case == "bits":
        bits = "w0a4"
    if case == "unknown_model":
        model = "no_such_model_xyz"
    if case == "bad_option":
        opts = ["--opt", "bogus=1"]
    out = tmp_path / "out"
    msg = _run_error(capsys, ["quantize", "--model", model, "--calib", str(calib), "--bits", bits, "--out", str(out),
                              "--quiet", *opts])
    expected = {"missing": "does not exist", "empty": "no image files", "corrupt_only": "0 readable",
                "too_few": "at least 8", "bits": "weight bits", "unknown_model": "unknown model",
                "bad_option": "no option"}[case]
    assert expected in msg
    assert not out.exists()
    assert sorted(p.name for p in tmp_path.iterdir() if p.name.startswith(".")) == []  # no temp dirs left


def test_console_entry_point_runs():
    r = subprocess.run([sys.executable, "-m", "vitquant.cli", "quantize", "--bits", "w9a9", "--out", "x"],
                       capture_output=True, text=True)
    assert r.returncode == 2 and r.stderr.strip() == "vitquant: error: bits preset 'w9a9': weight bits must be between 2 and 8, got 9"


def test_quantize_data_free_keeps_the_generated_images(tmp_path, capsys):
    model = _model_file(tmp_path)
    out = tmp_path / "df"
    rc = main(["quantize", "--model", str(model), "--calib", "data-free", "--calib-size", "8", "--bits", "w8a8",
               "--method", "minmax", "--out", str(out), "--quiet"])
    assert rc == 0, capsys.readouterr().err
    assert "generated calibration images" in capsys.readouterr().out
    png = out / "calibration_images.png"
    assert png.is_file() and Image.open(png).size[0] >= 28
    meta = json.loads((out / "quant_config.json").read_text())
    assert meta["stats"]["calibration_grid"] == "calibration_images.png"
    assert "generation_seconds" in meta["stats"]


def test_data_free_steps_reach_the_generator_and_are_validated(tmp_path, capsys):
    model = _model_file(tmp_path)
    out = tmp_path / "df"
    assert main(["quantize", "--model", str(model), "--calib", "data-free", "--data-free-steps", "4",
                 "--calib-size", "8", "--method", "minmax", "--out", str(out), "--quiet"]) == 0
    meta = json.loads((out / "quant_config.json").read_text())
    assert "4 steps" in meta["stats"]["calibration_source"]
    capsys.readouterr()
    assert "only applies to --calib data-free" in _run_error(
        capsys, ["quantize", "--model", str(model), "--data-free-steps", "4", "--out", str(tmp_path / "x")])
    assert "steps=1" in _run_error(capsys, ["quantize", "--model", str(model), "--calib", "data-free",
                                            "--data-free-steps", "1", "--out", str(tmp_path / "y")])
    assert not (tmp_path / "x").exists() and not (tmp_path / "y").exists()
