"""A mixed per-site plan exports as planned: quantized GEMMs on integer kernels (sub-8-bit grids in 8-bit
containers with a Clip), float sites and weights as float GEMMs, and the ONNX model computes what the
simulation does (deployable, so every grid is affine)."""
import pytest
import torch

pytest.importorskip("onnxruntime")

import vitquant  # noqa: E402
from vitquant.export.parity import check_parity  # noqa: E402
from vitquant.plan import with_point_bits  # noqa: E402


def test_mixed_plan_exports_as_planned(tiny_vit_factory, calib_images):
    base = vitquant.QuantConfig.preset("w8a8", method="minmax", deployable=True)
    plan = {"blocks.0.attn.qkv.input": 4, "blocks.0.attn.qkv.weight": 3,  # low bits: still integer kernels
            "blocks.1.mlp.fc1.input": None,  # float input: fc1 runs as a float GEMM
            "blocks.0.mlp.fc2.weight": None,  # float weight: fc2 too
            "blocks.1.attn.softmax": None}
    qmodel = vitquant.quantize(tiny_vit_factory(), with_point_bits(base, plan), calib_images, progress=False)
    par = check_parity(qmodel, torch.randn(32, 1, 28, 28, generator=torch.Generator().manual_seed(3)))
    gemms = par.export.gemms
    # qkv is written as three GEMMs (q, k, v), all integer at a 4-bit input and 3-bit weights
    assert all(gemms[f"blocks.0.attn.{p}"] == "int8" for p in "qkv") and gemms["blocks.0.mlp.fc1"] == "int8"
    assert gemms["blocks.1.mlp.fc1"].startswith("float (float input")
    assert gemms["blocks.0.mlp.fc2"].startswith("float (weight quantizer")
    assert par.export.int8_gemms == len(gemms) - 2
    sites = {s.site: s.exported for s in par.export.sites}
    assert sites["blocks.1.attn.softmax"].startswith("float") and sites["blocks.1.mlp.fc1.input"].startswith("float")
    graph = par.export.model.graph
    clips = [n.name for n in graph.node if n.op_type == "Clip"]
    assert any(c.startswith("blocks.0.attn.qkv.input") for c in clips), clips
    assert par.agreement == 100.0 and par.logits_sqnr > 40  # the ONNX model is the simulated one
