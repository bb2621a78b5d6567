"""A `<method>+qwt` model exports its compensation as a float MatMul + Add per block, and ONNX Runtime then
computes what the simulation does (the bundled 6-block model)."""
from __future__ import annotations

import numpy as np
import pytest
import torch

pytest.importorskip("onnxruntime")

import vitquant  # noqa: E402
from vitquant.export.onnx_qdq import export  # noqa: E402
from vitquant.export.parity import check_parity  # noqa: E402
from vitquant.export.runtime import OrtModel  # noqa: E402
from vitquant.methods.qwt import compensation_of, uninstall  # noqa: E402


@pytest.fixture(scope="module")
def bundled_qwt():
    model = vitquant.load_model("bundled")
    config = vitquant.QuantConfig.preset("w4a4", method="repq-vit+qwt", deployable=True)
    return vitquant.quantize(model, config, "bundled", progress=False)


def test_the_compensation_is_in_the_graph_and_the_export_matches_the_simulation(bundled_qwt):
    report = export(bundled_qwt)
    nodes = {n.name for n in report.model.graph.node}
    assert {f"blocks.{i}.qwt" for i in range(6)} <= nodes and {f"blocks.{i}.qwt.matmul" for i in range(6)} <= nodes
    assert not report.approximations() and report.int8_gemms == len(report.gemms)
    par = check_parity(bundled_qwt, "bundled", limit=200)
    assert par.agreement == 100.0 and par.identical >= 95.0 and par.logits_sqnr > 50
    assert par.sim_top1 == par.deployed_top1


def test_without_its_compensation_the_graph_would_differ(bundled_qwt):
    x = torch.randn(8, 1, 28, 28, generator=torch.Generator().manual_seed(0))
    ort = OrtModel(export(bundled_qwt, validate=False).model)(x).numpy()
    with torch.no_grad():
        sim = bundled_qwt(x).numpy()
        comp = compensation_of(bundled_qwt)
        uninstall(bundled_qwt)
        try:
            plain = bundled_qwt(x).numpy()
        finally:
            comp.install(bundled_qwt)
    gap = np.abs(sim - plain).max()
    assert gap > 1e-2 and np.abs(ort - sim).max() < 1e-3 * gap
