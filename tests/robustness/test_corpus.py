"""The bad-input corpus: every CLI verb against inputs a new user (or a damaged disk) produces.

Each case must end with exit code 2 and exactly one `vitquant: error: …` line on stderr naming the thing
and the fix, must leave the workspace byte-for-byte as it was (nothing written, nothing deleted), and
must be caught before the expensive work: calibration, evaluation, export and sweeps are tripwires, and
for cases marked `before_model` so is loading any model.
"""
from __future__ import annotations

import json
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import onnx
import pytest
import torch
from badinput import snapshot, write_images, write_model_file
from onnx import TensorProto, helper


@dataclass
class Case:
    verb: str
    build: Callable[[Path, Path], list]  # (workspace, unwritable dir) -> argv
    expect: tuple[str, ...]  # substrings of the error line
    before_model: bool = False  # must fail before any model is loaded


def q(ws: Path, *extra, model=None, calib=None, out=None) -> list:
    return ["quantize", "--model", model or ws / "tiny.safetensors", "--calib", calib or ws / "calib",
            "--method", "minmax", "--out", out or ws / "out", "--quiet", *extra]


def edit_meta(qdir: Path, edit: Callable[[dict], None], rehash: bool) -> Path:
    """Edit quant_config.json; `rehash` also updates its checksums, so the validation behind them is
    what answers (a file written by another tool, or by hand with care)."""
    from vitquant.serialization import meta_digest, sha256_file

    meta = json.loads((qdir / "quant_config.json").read_text())
    edit(meta)
    if rehash:
        meta["integrity"] = {"model.safetensors_sha256": sha256_file(qdir / "model.safetensors"),
                             "meta_sha256": meta_digest(meta)}
    (qdir / "quant_config.json").write_text(json.dumps(meta))
    return qdir


def truncate(path: Path, keep: float = 0.5) -> Path:
    data = path.read_bytes()
    path.write_bytes(data[: int(len(data) * keep)])
    return path


def first_weight_spec(meta: dict) -> dict:
    return next(v["quantizer"] for k, v in meta["quantizers"].items() if k.endswith(".weight") and v["quantizer"])


def nan_model(ws: Path, value: float) -> Path:
    def poison(state):
        state["blocks.0.attn.qkv.weight"][0, :3] = value
    return write_model_file(ws / "poisoned.safetensors", tamper=poison)


def wrong_size_checkpoint(ws: Path) -> Path:
    import timm
    from safetensors.torch import save_file

    state = {k: v.contiguous() for k, v in timm.create_model("test_vit").state_dict().items()}
    state["blocks.0.mlp.fc1.weight"] = state["blocks.0.mlp.fc1.weight"][:10].contiguous()
    save_file(state, str(ws / "wrong.safetensors"))
    return ws / "wrong.safetensors"


def evil_pickle(ws: Path) -> Path:
    class Evil:
        def __reduce__(self):
            return (os.system, ("touch pwned",))
    torch.save({"weights": Evil()}, ws / "evil.pth")
    return ws / "evil.pth"


def foreign_onnx(ws: Path) -> Path:
    node = helper.make_node("Relu", ["x"], ["y"])
    graph = helper.make_graph([node], "g", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1])])
    onnx.save(helper.make_model(graph), ws / "foreign.onnx")
    return ws / "foreign.onnx"


def user_photos(folder: Path) -> Path:
    write_images(folder, 3)
    return folder


def drop_site(meta):
    del meta["quantizers"][next(k for k in meta["quantizers"] if not k.endswith(".weight"))]


def vitquant_dir_with_user_file(ws: Path) -> Path:
    (ws / "q" / "my_notes.txt").write_text("mine")
    return ws / "q"


def nonstore(ws: Path) -> Path:
    (ws / "notes.txt").write_text("my notes\nnot json\n")
    return ws / "notes.txt"


R = "save or quantize the model again"
CASES = {
    # -- quantize: inputs ------------------------------------------------------------------------------
    "q-calib-missing": Case("quantize", lambda ws, ro: q(ws, calib=ws / "nope"), ("does not exist",), True),
    "q-calib-empty": Case("quantize", lambda ws, ro: (ws / "e").mkdir() or q(ws, calib=ws / "e"), ("no image files",)),
    "q-calib-corrupt": Case("quantize", lambda ws, ro: q(ws, calib=write_images(ws / "c2", 0, corrupt=9)),
                            ("0 readable", "replace them")),
    "q-calib-too-few": Case("quantize", lambda ws, ro: q(ws, calib=write_images(ws / "c3", 3)),
                            ("at least 8", "--min-calib"), True),
    "q-calib-too-few-readable": Case("quantize", lambda ws, ro: q(ws, calib=write_images(ws / "c4", 6, corrupt=3)),
                                     ("only 6 readable", "3 more could not be decoded", "--min-calib")),
    "q-calib-is-file": Case("quantize", lambda ws, ro: q(ws, calib=ws / "tiny.json"), ("is a file",), True),
    "q-bits-range": Case("quantize", lambda ws, ro: q(ws, "--bits", "w0a4"), ("weight bits",), True),
    "q-bits-form": Case("quantize", lambda ws, ro: q(ws, "--bits", "4/4"), ("wXaY",), True),
    "q-unknown-model": Case("quantize", lambda ws, ro: q(ws, model="no_such_model_xyz"), ("unknown model",)),
    "q-unknown-method": Case("quantize", lambda ws, ro: q(ws, "--method", "nope"), ("unknown method",), True),
    "q-opt-unknown": Case("quantize", lambda ws, ro: q(ws, "--opt", "bogus=1"), ("no option",), True),
    "q-opt-bool-maybe": Case("quantize", lambda ws, ro: q(ws, "--method", "repq-vit", "--opt", "reparam_head=maybe"),
                             ("reparam_head", "true, false, 'auto'"), True),
    "q-opt-list-abc": Case("quantize", lambda ws, ro: q(ws, "--method", "repq-vit", "--opt", "candidates=abc"),
                           ("candidates", "list of numbers"), True),
    "q-opt-number-abc": Case("quantize", lambda ws, ro: q(ws, "--method", "percentile", "--opt", "percentile=abc"),
                             ("percentile", "must be a number"), True),
    "q-opt-infinity": Case("quantize", lambda ws, ro: q(ws, "--method", "erq", "--opt", "coe=Infinity"),
                           ("coe", "must be a number"), True),
    "q-opt-no-equals": Case("quantize", lambda ws, ro: q(ws, "--opt", "novalue"), ("key=value",), True),
    "q-calib-size-zero": Case("quantize", lambda ws, ro: q(ws, "--calib-size", "0"), ("calib_size",), True),
    "q-calib-size-below-min": Case("quantize", lambda ws, ro: q(ws, "--calib-size", "4"), ("--min-calib",), True),
    "q-min-calib-zero": Case("quantize", lambda ws, ro: q(ws, "--min-calib", "0"), ("--min-calib", "at least 1"), True),
    "q-steps-without-data-free": Case("quantize", lambda ws, ro: q(ws, "--data-free-steps", "4"),
                                      ("only applies",), True),
    "q-site-bits-form": Case("quantize", lambda ws, ro: q(ws, "--site-bits", "head"), ("GLOB=BITS",), True),
    "q-seed-overflow": Case("quantize", lambda ws, ro: q(ws, "--seed", str(2**70)), ("seed",), True),
    "q-eval-missing": Case("quantize", lambda ws, ro: q(ws, "--eval", ws / "nope"), ("does not exist",), True),
    "q-eval-no-classes": Case("quantize", lambda ws, ro: q(ws, "--eval", ws / "calib"), ("no class subfolders",), True),
    "q-argparse-choice": Case("quantize", lambda ws, ro: q(ws, "--unknown-layers", "bogus"), ("invalid choice",), True),
    "q-argparse-int": Case("quantize", lambda ws, ro: q(ws, "--calib-size", "abc"), ("invalid int",), True),
    "q-argparse-missing-out": Case("quantize", lambda ws, ro: ["quantize", "--model", "bundled"], ("--out",), True),
    "q-argparse-unknown-flag": Case("quantize", lambda ws, ro: q(ws, "--bogus"), ("unrecognized",), True),
    # -- quantize: outputs, checked before anything is loaded --------------------------------------------
    "q-out-exists": Case("quantize", lambda ws, ro: q(ws, out=ws / "q"), ("already exists", "--force"), True),
    "q-force-user-folder": Case("quantize", lambda ws, ro: q(ws, "--force", out=user_photos(ws / "photos")),
                                ("not written by vitquant", "choose another"), True),
    "q-force-user-file-inside": Case("quantize", lambda ws, ro: q(ws, "--force", out=vitquant_dir_with_user_file(ws)),
                                     ("did not write", "my_notes.txt"), True),
    "q-force-on-a-file": Case("quantize", lambda ws, ro: q(ws, "--force", out=ws / "tiny.json"),
                              ("not a directory",), True),
    "q-out-unwritable": Case("quantize", lambda ws, ro: q(ws, out=ro / "out"), ("does not accept new files",), True),
    # -- quantize: models and checkpoints -------------------------------------------------------------
    "q-model-truncated": Case("quantize", lambda ws, ro: q(ws, model=truncate(ws / "tiny.safetensors")),
                              ("not a readable safetensors", "truncated")),
    "q-model-no-sidecar": Case("quantize", lambda ws, ro: (ws / "tiny.json").unlink() or q(ws),
                               ("tiny.json", "describing its architecture")),
    "q-model-sidecar-json": Case("quantize", lambda ws, ro: truncate(ws / "tiny.json") and q(ws),
                                 ("not valid JSON",)),
    "q-model-wrong-shape": Case("quantize", lambda ws, ro: q(ws, model=write_model_file(
        ws / "w.safetensors", tamper=lambda s: s.update({"head.weight": torch.zeros(5, 32)}))),
        ("does not fit", "head.weight (5, 32) vs (3, 32)")),
    "q-model-nan": Case("quantize", lambda ws, ro: q(ws, model=nan_model(ws, float("nan"))),
                        ("non-finite", "blocks.0.attn.qkv.weight (3)", "--allow-nonfinite")),
    "q-model-inf": Case("quantize", lambda ws, ro: q(ws, model=nan_model(ws, float("-inf"))), ("non-finite",)),
    "q-checkpoint-wrong-size": Case("quantize", lambda ws, ro: q(ws, "--checkpoint", wrong_size_checkpoint(ws),
                                                                 model="test_vit"),
                                    ("does not fit", "blocks.0.mlp.fc1.weight (10, 64) vs (192, 64)")),
    "q-checkpoint-pickle": Case("quantize", lambda ws, ro: q(ws, "--checkpoint", evil_pickle(ws), model="test_vit"),
                                ("refuses to run code", "posix.system")),
    "q-checkpoint-truncated": Case("quantize", lambda ws, ro: q(ws, "--checkpoint", truncate(evil_pickle(ws)),
                                                                model="test_vit"), ("truncated",)),
    "q-checkpoint-missing": Case("quantize", lambda ws, ro: q(ws, "--checkpoint", ws / "nope.pth", model="test_vit"),
                                 ("does not exist",)),
    # -- eval ------------------------------------------------------------------------------------------
    "e-unknown-model": Case("eval", lambda ws, ro: ["eval", "no_such_model_xyz"], ("unknown model",)),
    "e-plain-directory": Case("eval", lambda ws, ro: ["eval", ws / "calib"], ("neither a saved quantized",), True),
    "e-data-missing": Case("eval", lambda ws, ro: ["eval", ws / "q", "--data", ws / "nope"], ("does not exist",), True),
    "e-data-flat": Case("eval", lambda ws, ro: ["eval", ws / "q", "--data", ws / "calib"], ("class subfolders",), True),
    "e-limit-zero": Case("eval", lambda ws, ro: ["eval", ws / "q", "--limit", "0"], ("--limit",), True),
    "e-meta-site-lost": Case("eval", lambda ws, ro: ["eval", edit_meta(ws / "q", drop_site, False)],
                             ("quant_config.json", "checksum", R)),
    "e-meta-site-lost-rehashed": Case("eval", lambda ws, ro: ["eval", edit_meta(ws / "q", drop_site, True)],
                                      ("other quantization sites", "damaged")),
    "e-meta-config-lost": Case("eval", lambda ws, ro: ["eval", edit_meta(ws / "q", lambda m: m.pop("config"), True)],
                               ("no 'config'", R)),
    "e-meta-scale-string": Case("eval", lambda ws, ro: ["eval", edit_meta(
        ws / "q", lambda m: first_weight_spec(m).update(scale="0.1"), True)], ("is invalid", R)),
    "e-meta-bits-99": Case("eval", lambda ws, ro: ["eval", edit_meta(
        ws / "q", lambda m: first_weight_spec(m).update(bits=99), True)], ("bits", R)),
    "e-meta-truncated": Case("eval", lambda ws, ro: ["eval", truncate(ws / "q" / "quant_config.json").parent],
                             ("not valid JSON", "truncated")),
    "e-meta-nan-token": Case("eval", lambda ws, ro: ["eval", edit_meta(
        ws / "q", lambda m: first_weight_spec(m).update(scale=float("nan")), False)], ("not valid JSON",)),
    "e-meta-no-checksums": Case("eval", lambda ws, ro: ["eval", edit_meta(
        ws / "q", lambda m: m.pop("integrity"), False)], ("integrity checksums",)),
    "e-meta-format": Case("eval", lambda ws, ro: ["eval", edit_meta(ws / "q", lambda m: m.update(format="x/9"), False)],
                          ("has format 'x/9'",)),
    "e-weights-truncated": Case("eval", lambda ws, ro: ["eval", truncate(ws / "q" / "model.safetensors").parent],
                                ("model.safetensors", "checksum")),
    "e-weights-truncated-rehashed": Case("eval", lambda ws, ro: truncate(ws / "q" / "model.safetensors") and [
        "eval", edit_meta(ws / "q", lambda m: None, True)], ("not a readable safetensors",)),
    "e-weights-missing": Case("eval", lambda ws, ro: (ws / "q" / "model.safetensors").unlink() or ["eval", ws / "q"],
                              ("not a saved vitquant model",)),
    "e-float-checkpoint-other": Case("eval", lambda ws, ro: ["eval", ws / "q", "--float-checkpoint",
                                                             nan_model(ws, 1.0)], ("not the checkpoint", "sha256")),
    "e-float-checkpoint-on-model": Case("eval", lambda ws, ro: ["eval", "bundled", "--float-checkpoint", ws / "x"],
                                        ("applies to a saved",)),
    "e-checkpoint-on-quantized": Case("eval", lambda ws, ro: ["eval", ws / "q", "--checkpoint", ws / "tiny.json"],
                                      ("does not apply", "--float-checkpoint"), True),
    "e-onnx-truncated": Case("eval", lambda ws, ro: ["eval", truncate(ws / "q.onnx")], ("not a loadable ONNX",)),
    "e-onnx-missing": Case("eval", lambda ws, ro: ["eval", ws / "nope.onnx"], ("does not exist",)),
    "e-onnx-foreign": Case("eval", lambda ws, ro: ["eval", foreign_onnx(ws)], ("not exported by vitquant",)),
    "e-onnx-threads": Case("eval", lambda ws, ro: ["eval", ws / "q.onnx", "--threads", "0"], ("--threads",)),
    # -- export ----------------------------------------------------------------------------------------
    "x-out-unwritable": Case("export", lambda ws, ro: ["export", ws / "q", "--out", ro / "m.onnx"],
                             ("does not accept new files",), True),
    "x-out-exists": Case("export", lambda ws, ro: ["export", ws / "q", "--out", ws / "q.onnx"],
                         ("already exists", "--force"), True),
    "x-force-user-file": Case("export", lambda ws, ro: ["export", ws / "q", "--out", ws / "tiny.json", "--force"],
                              ("not written by vitquant",), True),
    "x-format": Case("export", lambda ws, ro: ["export", ws / "q", "--out", ws / "m.tfl", "--format", "tflite"],
                     ("not supported", "--format onnx"), True),
    "x-not-quantized": Case("export", lambda ws, ro: ["export", ws / "calib", "--out", ws / "m.onnx"],
                            ("not a saved quantized model directory",), True),
    "x-damaged": Case("export", lambda ws, ro: ["export", edit_meta(ws / "q", drop_site, False), "--out",
                                                ws / "m.onnx"], ("checksum",)),
    "x-report-user-file": Case("export", lambda ws, ro: ["export", ws / "q", "--out", ws / "m.onnx", "--report",
                                                         ws / "tiny.json"], ("not written by vitquant",), True),
    "x-report-unwritable": Case("export", lambda ws, ro: ["export", ws / "q", "--out", ws / "m.onnx", "--report",
                                                          ro / "r.md"], ("does not accept new files",), True),
    "x-parity-missing": Case("export", lambda ws, ro: ["export", ws / "q", "--out", ws / "m.onnx", "--parity",
                                                       ws / "nope"], ("does not exist",), True),
    "x-scheme": Case("export", lambda ws, ro: ["export", ws / "q", "--out", ws / "m.onnx", "--scheme", "s4"],
                     ("invalid choice",), True),
    "x-limit": Case("export", lambda ws, ro: ["export", ws / "q", "--out", ws / "m.onnx", "--limit", "0"],
                    ("--limit",), True),
    # -- bench -----------------------------------------------------------------------------------------
    "b-seeds": Case("bench", lambda ws, ro: ["bench", "--seeds", "a,b", "--store", ws / "s.jsonl"], ("--seeds",), True),
    "b-bits": Case("bench", lambda ws, ro: ["bench", "--bits", "w9a9", "--store", ws / "s.jsonl"],
                   ("weight bits",), True),
    "b-method": Case("bench", lambda ws, ro: ["bench", "--methods", "nope", "--store", ws / "s.jsonl"],
                     ("unknown method",), True),
    "b-method-option": Case("bench", lambda ws, ro: ["bench", "--methods", "repq-vit:reparam_head=maybe", "--store",
                                                     ws / "s.jsonl"], ("true, false, 'auto'",), True),
    "b-store-dir": Case("bench", lambda ws, ro: ["bench", "--store", ws / "calib"], ("is a directory",), True),
    "b-store-not-a-store": Case("bench", lambda ws, ro: ["bench", "--store", nonstore(ws)],
                                ("not a vitquant results store",), True),
    "b-store-unwritable": Case("bench", lambda ws, ro: ["bench", "--store", ro / "s.jsonl"],
                               ("does not accept new files",), True),
    "b-markdown-user-file": Case("bench", lambda ws, ro: ["bench", "--store", ws / "s.jsonl", "--markdown",
                                                          ws / "tiny.json"], ("not written by vitquant",), True),
    "b-markdown-unwritable": Case("bench", lambda ws, ro: ["bench", "--store", ws / "s.jsonl", "--markdown",
                                                           ro / "t.md"], ("does not accept new files",), True),
    "b-calib-missing": Case("bench", lambda ws, ro: ["bench", "--calib", ws / "nope", "--store", ws / "s.jsonl"],
                            ("does not exist",), True),
    "b-data-flat": Case("bench", lambda ws, ro: ["bench", "--data", ws / "calib", "--store", ws / "s.jsonl"],
                        ("class subfolders",), True),
    "b-model-file-missing": Case("bench", lambda ws, ro: ["bench", "--models", ws / "nope.safetensors", "--store",
                                                          ws / "s.jsonl"], ("does not exist",), True),
    # -- list, cpu, demo, and no verb -------------------------------------------------------------------
    "l-extra-argument": Case("list", lambda ws, ro: ["list", "extra"], ("unrecognized arguments",), True),
    "c-extra-argument": Case("cpu", lambda ws, ro: ["cpu", "--fast"], ("unrecognized arguments",), True),
    "d-bits": Case("demo", lambda ws, ro: ["demo", "--bits", "w1a1"], ("weight bits",), True),
    "d-method": Case("demo", lambda ws, ro: ["demo", "--method", "nope"], ("unknown method",), True),
    "v-unknown-verb": Case("(none)", lambda ws, ro: ["quantise"], ("invalid choice",), True),
    "v-no-verb": Case("(none)", lambda ws, ro: [], ("required",), True),
}


def test_the_corpus_covers_every_verb_with_at_least_40_inputs():
    assert len(CASES) >= 40
    assert {c.verb for c in CASES.values()} >= {"quantize", "eval", "export", "bench", "list", "cpu", "demo"}


@pytest.fixture
def tripwires(monkeypatch):
    """Make the expensive steps fail the test if a bad input reaches them."""
    import vitquant
    import vitquant.bench
    import vitquant.demo
    import vitquant.export.onnx_qdq

    def trip(what):
        def fail(*args, **kwargs):
            raise AssertionError(f"{what} started on a bad input")
        return fail

    monkeypatch.setattr(vitquant, "quantize", trip("calibration"))
    monkeypatch.setattr(vitquant, "evaluate", trip("evaluation"))
    monkeypatch.setattr(vitquant.bench, "run_sweep", trip("a sweep"))
    monkeypatch.setattr(vitquant.export.onnx_qdq, "export", trip("an export"))
    monkeypatch.setattr(vitquant.demo, "run_demo", trip("the demo"))

    def before_model():
        monkeypatch.setattr(vitquant, "load_model", trip("loading a model"))
        monkeypatch.setattr(vitquant, "load", trip("loading a quantized model"))
    return before_model


@pytest.mark.filterwarnings("ignore:skipped .* unreadable image")
@pytest.mark.parametrize("name", sorted(CASES))
def test_bad_input_is_one_error_line_and_changes_nothing(name, ws, unwritable_dir, run_cli, tripwires, monkeypatch):
    import socket

    case = CASES[name]
    monkeypatch.chdir(ws)  # relative leftovers (and the pickle's payload) would land here
    import huggingface_hub.constants

    monkeypatch.setattr(socket, "create_connection", lambda *a, **k: (_ for _ in ()).throw(OSError("offline")))
    monkeypatch.setenv("HF_HUB_OFFLINE", "")  # the CLI switches the hub offline: restored after each case
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", False)
    argv = case.build(ws, unwritable_dir)
    before = snapshot(ws)
    if case.before_model:
        tripwires()
    rc, _, err = run_cli(argv)
    assert rc == 2, err
    assert len(err) == 1 and err[0].startswith("vitquant: error: "), err
    for part in case.expect:
        assert part in err[0], err[0]
    assert "weights_only=False" not in err[0]
    assert snapshot(ws) == before
    assert not (ws / "pwned").exists()
