"""benchmarks/imagenet.py end to end on a generated ImageNet-layout folder (train/ and val/, one subfolder per
class) with a tiny timm ViT model file: the store rows, the rendered tables, the papers' columns, resuming,
and the same rows from 2 gloo ranks under torchrun."""
from __future__ import annotations

import importlib.util
import json
import os
import socket
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from safetensors.torch import save_file

HARNESS = Path(__file__).resolve().parents[2] / "benchmarks" / "imagenet.py"
CLASSES = ("n01440764", "n01443537", "n01484850")
VAL_PER_CLASS = 34  # 102 images: two evaluation batches of 100, so two ranks score one batch each
TINY = dict(img_size=32, patch_size=8, in_chans=3, num_classes=3, embed_dim=32, depth=1, num_heads=2)
ARGS = ["--methods", "minmax,repq-vit", "--bits", "w8a8", "--seeds", "0", "--calib-size", "8", "--device", "cpu"]


def _harness():
    """The script as a module (registered first: its dataclass looks its module up while being defined)."""
    if "imagenet_harness" not in sys.modules:
        spec = importlib.util.spec_from_file_location("imagenet_harness", HARNESS)
        sys.modules[spec.name] = module = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(module)
    return sys.modules["imagenet_harness"]


def _imagenet(root: Path) -> Path:
    rng = np.random.default_rng(0)
    for split, per_class in (("train", 6), ("val", VAL_PER_CLASS)):
        for c, name in enumerate(CLASSES):
            (root / split / name).mkdir(parents=True)
            for i in range(per_class):
                # a class-dependent tint, so the images differ by class as well as by noise
                pixels = rng.integers(0, 160, (40, 48, 3), dtype=np.uint8) + np.uint8(40 * c)
                Image.fromarray(pixels, mode="RGB").save(root / split / name / f"{name}_{i}.png")
    return root


def _model_file(root: Path) -> Path:
    from timm.models.vision_transformer import VisionTransformer

    torch.manual_seed(0)
    path = root / "tiny_vit.safetensors"
    save_file({k: v.contiguous() for k, v in VisionTransformer(**TINY).state_dict().items()}, str(path))
    path.with_suffix(".json").write_text(json.dumps({
        "format": "vitquant-model/1", "architecture": "timm.VisionTransformer", "model_kwargs": TINY,
        "pretrained_cfg": {"input_size": [3, 32, 32], "mean": [0.485, 0.456, 0.406], "std": [0.229, 0.224, 0.225],
                           "crop_pct": 0.875, "interpolation": "bicubic", "num_classes": 3}}))
    return path


@pytest.fixture(scope="module")
def single(tmp_path_factory):
    """One single-process sweep: (root, model file, store records, markdown)."""
    root = tmp_path_factory.mktemp("imagenet")
    data, model = _imagenet(root / "imagenet"), _model_file(root)
    argv = ["--data", str(data), "--models", str(model), *ARGS, "--store", str(root / "runs.jsonl"),
            "--out", str(root / "imagenet.md")]
    assert _harness().main(argv) == 0
    records = [json.loads(line) for line in (root / "runs.jsonl").read_text().splitlines()]
    return root, model, argv, records, (root / "imagenet.md").read_text()


def test_sweep_writes_rows_and_tables(single):
    root, model, _, records, md = single
    assert [(r["method"], r["bits"]) for r in records] == [("float", "FP32"), ("minmax", "W8A8"), ("repq-vit", "W8A8")]
    for r in records:
        assert r["model"] == str(model) and r["variant"] == "natural" and r["calib_size"] == 8
        assert 0 <= r["top1"] <= 100 and f"(102 of {3 * VAL_PER_CLASS} images)" in r["eval"]
        assert str(root / "imagenet" / "val") in r["eval"]  # --data ROOT: ROOT/val scored, ROOT/train calibrates
    assert all(0 <= r["agreement"] <= 100 for r in records[1:])
    assert f"### {model} — natural (calib 8)" in md  # not the papers' 32 images: sections of their own
    assert "| minmax " in md and "| repq-vit " in md and "| float (FP32) " in md
    for r in records[1:]:
        assert f"{r['top1']:.2f}" in md
    assert "paper" not in md.split("## The papers' numbers")[0].split("## Summary")[1]  # no paper for a tiny model
    assert "RepQ-ViT README [R]" in md  # the sources of the swept methods' published numbers


def test_rerun_resumes_and_a_val_subset_is_a_variant_of_its_own(single):
    root, model, argv, records, _ = single
    harness = _harness()
    assert harness.main(argv) == 0
    assert len((root / "runs.jsonl").read_text().splitlines()) == len(records)  # nothing repeated
    assert harness.main([*argv, "--methods", "minmax", "--limit-val", "10"]) == 0
    subset = [json.loads(line) for line in (root / "runs.jsonl").read_text().splitlines()][len(records):]
    assert [r["method"] for r in subset] == ["float", "minmax"]
    assert {r["variant"] for r in subset} == {"natural (val subset 10)"}
    assert all("(10 of 102 images)" in r["eval"] for r in subset)
    assert "— natural (val subset 10, calib 8)" in (root / "imagenet.md").read_text()


def test_papers_numbers_sit_beside_known_models():
    harness = _harness()
    base = {"model": "deit_small_patch16_224", "variant": "natural", "seed": 0, "calib_size": 32}
    recs = [{**base, "method": "float", "bits": "FP32", "top1": 79.8},
            {**base, "method": "repq-vit", "bits": "W4A4", "top1": 68.0, "agreement": 80.0},
            {**base, "method": "repq-vit:reparam_head=false", "bits": "W4A4", "top1": 67.0, "agreement": 80.0},
            {**base, "method": "noisyquant", "bits": "W4A4", "top1": 50.0, "agreement": 60.0},
            {**base, "variant": "stress S=30", "method": "repq-vit", "bits": "W4A4", "top1": 60.0, "agreement": 70.0},
            {**base, "model": "tiny.safetensors", "method": "repq-vit", "bits": "W4A4", "top1": 40.0,
             "agreement": 50.0}]
    md = harness.render(recs, "runs.jsonl")
    deit = md.split("### deit_small_patch16_224 (DeiT-S) — natural")[1].split("###")[0]
    header = next(line for line in deit.splitlines() if line.startswith("| method"))
    assert [c.strip() for c in header.strip("|").split("|")] == ["method", "W4A4", "W4A4 paper"]
    assert "69.03" in deit and "79.85" in deit  # RepQ-ViT's README, the papers' FP32
    assert deit.count("69.03") == 2  # repq-vit and its published recipe (reparam_head=false) share the row
    noisy = next(line for line in deit.splitlines() if line.startswith("| noisyquant "))
    assert noisy.rstrip(" |").endswith("–")  # the paper's NoisyQuant keeps matmuls float: no like-for-like number
    for other in ("### deit_small_patch16_224 (DeiT-S) — stress S=30", "### tiny.safetensors — natural"):
        assert "paper" not in md.split(other)[1].split("###")[0].split("Calibration wall time")[0]
    assert "DeiT-S W4A4 paper" in md.split("## Per model")[0]  # the summary has the column too
    assert harness.paper_top1("deit_small_patch16_224.fb_in1k", "natural", "adalog:reconstruct=true", "W4A4") == 76.36
    assert harness.paper_top1("deit_small_patch16_224", "natural", "adalog:reconstruct=true", "W6A6") is None
    assert harness.paper_top1("hf:microsoft/swin-tiny-patch4-window7-224", "natural", "repq-vit", "W4A4") == 72.31
    assert harness.checkpoint_note("deit_small_patch16_224") is None
    assert "augreg_in21k_ft_in1k" in harness.checkpoint_note("vit_base_patch16_224")
    assert harness.checkpoint_note("vit_base_patch16_224.augreg_in21k_ft_in1k") is None


def test_a_missing_calibration_folder_is_one_error_line(tmp_path, capsys):
    (tmp_path / "val" / "a").mkdir(parents=True)
    rc = _harness().main(["--data", str(tmp_path), "--store", str(tmp_path / "r.jsonl"),
                          "--out", str(tmp_path / "o.md")])
    err = capsys.readouterr().err.strip().splitlines()
    assert rc == 2 and len(err) == 1 and "no train/ folder" in err[0] and "--calib" in err[0]


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.mark.skipif(importlib.util.find_spec("torch.distributed.run") is None or not torch.distributed.is_available()
                    or not torch.distributed.is_gloo_available(), reason="torch.distributed.run with gloo unavailable")
def test_two_gloo_ranks_write_the_single_process_rows(single, tmp_path):
    _, _, argv, records, _ = single
    argv = [*argv[:argv.index("--store")], "--store", str(tmp_path / "runs.jsonl"), "--out", str(tmp_path / "o.md")]
    env = {k: v for k, v in os.environ.items() if k not in ("WORLD_SIZE", "RANK", "LOCAL_RANK")}
    done = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_addr",
                           "127.0.0.1", "--master_port", str(_free_port()), str(HARNESS), *argv],
                          capture_output=True, text=True, timeout=300, env={**env, "OMP_NUM_THREADS": "1"})
    assert done.returncode == 0, done.stderr[-3000:]
    two = [json.loads(line) for line in (tmp_path / "runs.jsonl").read_text().splitlines()]
    assert len(two) == len(records)  # rank 0 alone wrote, each run once
    fields = ("model", "variant", "method", "bits", "seed", "top1", "agreement", "eval", "size_bytes")
    assert [{k: r.get(k) for k in fields} for r in two] == [{k: r.get(k) for k in fields} for r in records]
    assert all(r["machine"].endswith("2 ranks") for r in two[1:])
    assert done.stdout.count("wrote ") == 1
