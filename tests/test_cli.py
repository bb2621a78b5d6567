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
    stdout = capsys.readouterr().out
    assert "generated calibration images" in stdout
    # regression: the line said "in 2.0 s", the calibration time alone, after minutes of generation
    assert "8 images generated in" in stdout and "calibrated in" in stdout
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


def _quantize(tmp_path, model, *extra, out="out"):
    calib = tmp_path / "calib"
    if not calib.exists():
        _images(calib, 10)
    return main(["quantize", "--model", str(model), "--calib", str(calib), "--method", "minmax", "--out",
                 str(tmp_path / out), "--quiet", *extra])


def test_force_replaces_vitquant_output_and_report_describes_it(tmp_path, capsys):
    model = _model_file(tmp_path)
    evald = _images(tmp_path / "val", 6, classes=["a", "b", "c"])
    assert _quantize(tmp_path, model, "--eval", str(evald)) == 0
    report = (tmp_path / "out" / "report.md").read_text()
    for part in ("minmax W8A8", "## Accuracy", "agreement with float", "## Size", "calibration time",
                 "model.safetensors"):
        assert part in report
    assert "report: " in capsys.readouterr().out
    assert _quantize(tmp_path, model, "--bits", "w4a4", "--force") == 0  # its own output: replaced
    meta = json.loads((tmp_path / "out" / "quant_config.json").read_text())
    assert meta["config"]["w_bits"] == 4


def test_boolean_option_false_is_false(tmp_path):
    # regression: `--opt reparam_head=False` was stored as the string "False", which is truthy
    assert main(["quantize", "--model", str(_model_file(tmp_path)), "--calib", str(_images(tmp_path / "c", 10)),
                 "--method", "repq-vit", "--opt", "reparam_head=False", "--out", str(tmp_path / "o"), "--quiet"]) == 0
    options = json.loads((tmp_path / "o" / "quant_config.json").read_text())["config"]["options"]
    assert options["reparam_head"] is False


def test_nonfinite_weights_opt_out_still_never_writes_nan_json(tmp_path, capsys):
    from safetensors.torch import load_file

    model = _model_file(tmp_path)
    state = load_file(str(model))
    state["blocks.0.attn.qkv.weight"][0, 0] = float("nan")
    save_file(state, str(model))
    # regression: this quantized with rc 0 and wrote bare NaN tokens into quant_config.json
    msg = _run_error(capsys, ["quantize", "--model", str(model), "--calib", str(_images(tmp_path / "c", 10)),
                              "--method", "minmax", "--out", str(tmp_path / "o"), "--quiet", "--allow-nonfinite"])
    assert "non-finite number at quantizers." in msg and not (tmp_path / "o").exists()


def test_a_quantized_directory_evaluates_from_anywhere_and_after_its_checkpoint_moves(tmp_path, capsys, monkeypatch):
    work, elsewhere = tmp_path / "work", tmp_path / "elsewhere"
    work.mkdir(), elsewhere.mkdir()
    _model_file(work)
    evald = _images(tmp_path / "val", 6, classes=["a", "b", "c"])
    monkeypatch.chdir(work)  # the model given as a relative path, as typed
    assert _quantize(work, "tiny.safetensors") == 0
    monkeypatch.chdir(elsewhere)
    capsys.readouterr()
    # regression: the relative path was stored as typed, so eval failed from any other directory
    assert main(["eval", str(work / "out"), "--data", str(evald), "--quiet"]) == 0
    assert "agreement with float" in capsys.readouterr().out
    moved = elsewhere / "renamed.safetensors"
    (work / "tiny.safetensors").rename(moved)
    (work / "tiny.json").rename(moved.with_suffix(".json"))
    assert main(["eval", str(work / "out"), "--data", str(evald), "--quiet"]) == 0
    out = capsys.readouterr().out
    assert "top-1" in out and "is gone" in out and "--float-checkpoint" in out
    assert main(["eval", str(work / "out"), "--data", str(evald), "--float-checkpoint", str(moved), "--quiet"]) == 0
    assert "agreement with float" in capsys.readouterr().out


def test_eval_of_an_onnx_file_needs_no_backend_flag_and_warns_on_a_class_count_mismatch(tmp_path, capsys):
    pytest.importorskip("onnxruntime")
    model = _model_file(tmp_path)
    assert _quantize(tmp_path, model, "--deployable") == 0
    export = ["export", str(tmp_path / "out"), "--out", str(tmp_path / "m.onnx"), "--report", str(tmp_path / "r.md"),
              "--quiet"]
    assert main(export) == 0
    assert main([*export, "--force"]) == 0  # its own .onnx and report are replaced
    two = _images(tmp_path / "two", 4, classes=["a", "b"])
    capsys.readouterr()
    with pytest.warns(UserWarning, match="3 output classes but the evaluation folder 2"):
        assert main(["eval", str(tmp_path / "m.onnx"), "--data", str(two), "--quiet"]) == 0
    assert "[onnxruntime, " in capsys.readouterr().out


def test_min_calib_lowers_the_minimum(tmp_path, capsys):
    model, calib = _model_file(tmp_path), _images(tmp_path / "few", 4)
    argv = ["quantize", "--model", str(model), "--calib", str(calib), "--method", "minmax", "--calib-size", "4",
            "--out", str(tmp_path / "o"), "--quiet"]
    assert "--min-calib" in _run_error(capsys, argv)
    assert main([*argv, "--min-calib", "4"]) == 0


def test_list_shows_a_cost_hint_per_method(capsys):
    from vitquant.methods import available_methods

    assert main(["list"]) == 0
    lines = capsys.readouterr().out.splitlines()
    for name in available_methods():
        line = next(x for x in lines if x.strip().startswith(name + " "))
        assert " s " in line or " min " in line, line


def test_list_deit_s_costs_are_the_committed_measurements(capsys):
    from pathlib import Path

    from vitquant.cli import DEIT_S_COST

    store = Path(__file__).resolve().parents[1] / "benchmarks" / "results" / "calibration_cost.jsonl"
    rows = [json.loads(line) for line in store.read_text().splitlines() if line.strip()]
    latest = {r["method"]: r for r in rows if r.get("label") == "after" and r["model"] == "deit_s"
              and r["images"] == 32 and "x_float_cpu" in r}
    assert set(DEIT_S_COST) == set(latest) - {"float"}
    for name, shown in DEIT_S_COST.items():
        assert shown == f"{round(latest[name]['x_float_cpu'])}×", name
    assert main(["list"]) == 0
    out = capsys.readouterr().out.splitlines()
    assert all(any(x.strip().startswith(n + " ") and f"DeiT-S {c}" in x for x in out) for n, c in DEIT_S_COST.items())


def test_help_answers_without_importing_torch():
    # regression: `vitquant --help` imported torch, timm and every method first (~6 s)
    code = "import sys, vitquant.cli; vitquant.cli.build_parser(); print(sorted({'torch', 'timm'} & set(sys.modules)))"
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert r.stdout.strip() == "[]"


def test_offline_timm_name_fails_fast(tmp_path, capsys, monkeypatch):
    import socket
    import time

    import huggingface_hub.constants

    monkeypatch.setenv("HF_HUB_OFFLINE", "")  # restored afterwards, like the module constant below
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", False)
    monkeypatch.setattr(socket, "create_connection", lambda *a, **k: (_ for _ in ()).throw(OSError("offline")))
    start = time.perf_counter()
    # regression: huggingface_hub retried every file for ~50 s before this error
    msg = _run_error(capsys, ["quantize", "--model", "test_vit", "--out", str(tmp_path / "o"), "--quiet"])
    assert time.perf_counter() - start < 25
    assert "--checkpoint" in msg


def test_a_layer_the_core_does_not_understand_is_named(tmp_path, capsys, monkeypatch):
    (tmp_path / "tokenconv.py").write_text(
        "from torch import nn\n\n\n"
        "class TokenConv(nn.Module):\n"
        "    def __init__(self):\n"
        "        super().__init__()\n"
        "        self.embed, self.norm = nn.Conv2d(1, 16, 7, 7), nn.LayerNorm(16)\n"
        "        self.mix, self.head = nn.Conv1d(16, 16, 3, padding=1), nn.Linear(16, 3)\n"
        "        self.pretrained_cfg = dict(input_size=(1, 28, 28), mean=(0.13,), std=(0.31,), crop_pct=1.0,\n"
        "                                   interpolation='bilinear')\n\n"
        "    def forward(self, x):\n"
        "        t = self.norm(self.embed(x).flatten(2).transpose(1, 2))\n"
        "        return self.head(self.mix(t.transpose(1, 2)).mean(-1))\n\n\n"
        "def build():\n"
        "    return TokenConv()\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    argv = ["quantize", "--model", "python:tokenconv:build", "--calib", str(_images(tmp_path / "c", 10)), "--method",
            "minmax", "--quiet"]
    msg = _run_error(capsys, [*argv, "--out", str(tmp_path / "refused")])
    assert "mix" in msg and "conv1d" in msg and "--unknown-layers float" in msg
    assert not (tmp_path / "refused").exists()
    assert main([*argv, "--unknown-layers", "float", "--out", str(tmp_path / "o")]) == 0
    assert "left float" in capsys.readouterr().out


def test_bench_resumes_and_rewrites_only_its_own_markdown(tmp_path, capsys):
    model, images = _model_file(tmp_path), _images(tmp_path / "imgs", 8, classes=["a", "b", "c"])
    argv = ["bench", "--models", str(model), "--methods", "minmax", "--bits", "w8a8", "--seeds", "0", "--no-stress",
            "--calib", str(images), "--data", str(images), "--store", str(tmp_path / "s.jsonl"), "--markdown",
            str(tmp_path / "t.md"), "--quiet"]
    assert main(argv) == 0
    assert "2 new runs" in capsys.readouterr().out
    assert main(argv) == 0
    assert "0 new runs, 2 in" in capsys.readouterr().out
    assert (tmp_path / "t.md").read_text().startswith("<!-- written by vitquant")
    (tmp_path / "t.md").write_text("my edits")
    assert "not written by vitquant" in _run_error(capsys, argv)
    assert (tmp_path / "t.md").read_text() == "my edits"
