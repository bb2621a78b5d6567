"""The float ONNX graph must equal PyTorch before anything is quantized (deployment.md: exports that
already differ in float are a known failure of the usual tools)."""
from __future__ import annotations

from functools import partial

import numpy as np
import pytest
import torch
from torch import nn

pytest.importorskip("onnxruntime")

from vitquant.errors import VitquantError  # noqa: E402
from vitquant.export.onnx_qdq import export  # noqa: E402
from vitquant.export.runtime import OrtModel  # noqa: E402

VARIANTS = {
    "deit": {},
    "avg_pool_fc_norm_no_cls": dict(class_token=False, global_pool="avg", fc_norm=True),
    "register_tokens": dict(reg_tokens=2),
    "no_embed_class": dict(no_embed_class=True),
    "layer_scale": dict(init_values=0.5),
    "no_qkv_bias": dict(qkv_bias=False),
    "qk_norm": dict(qk_norm=True),
    "gelu_tanh": dict(act_layer=partial(nn.GELU, approximate="tanh")),
    "pre_norm_max_pool": dict(pre_norm=True, global_pool="max"),
    "avgmax_pool": dict(global_pool="avgmax"),
}


def _randomize_affines(model: nn.Module) -> None:
    """timm initializes LayerNorm/LayerScale to 1/0 and biases to 0: make every parameter matter."""
    g = torch.Generator().manual_seed(3)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if p.dim() == 1:
                p.add_(0.1 * torch.randn(p.shape, generator=g))


@pytest.mark.parametrize("variant", sorted(VARIANTS))
def test_float_onnx_equals_pytorch(variant, tiny_vit_factory):
    model = tiny_vit_factory(**VARIANTS[variant])
    _randomize_affines(model)
    report = export(model)  # validates internally and raises on mismatch
    assert report.float_check["max_abs_err"] <= 1e-5 * max(report.float_check["max_abs_ref"], 1.0)
    x = torch.randn(5, 1, 28, 28, generator=torch.Generator().manual_seed(7))
    out = OrtModel(report.model)(x)
    np.testing.assert_allclose(out.numpy(), model(x).detach().numpy(), rtol=1e-4, atol=1e-5)


def test_distilled_deit_averages_both_heads():
    from timm.models.deit import VisionTransformerDistilled

    torch.manual_seed(0)
    model = VisionTransformerDistilled(img_size=28, patch_size=7, in_chans=1, num_classes=10, embed_dim=32,
                                       depth=1, num_heads=2).eval()
    _randomize_affines(model)
    x = torch.randn(3, 1, 28, 28)
    np.testing.assert_allclose(OrtModel(export(model).model)(x).numpy(), model(x).detach().numpy(), rtol=1e-4, atol=1e-5)


def test_unsupported_activation_is_named(tiny_vit_factory):
    model = tiny_vit_factory(act_layer=nn.ReLU)
    with pytest.raises(VitquantError, match=r"blocks\.0\.mlp\.act is ReLU; only nn\.GELU"):
        export(model)


def test_unsupported_norm_in_a_quantized_model_is_named(tiny_vit_factory, calib_images):
    import vitquant

    qmodel = vitquant.quantize(tiny_vit_factory(), "w8a8", calib_images, progress=False)
    qmodel.model.blocks[1].norm2 = nn.GroupNorm(1, 64)
    with pytest.raises(VitquantError, match=r"blocks\.1\.norm2 is a GroupNorm"):
        export(qmodel)


def test_export_writes_a_loadable_file_with_preprocessing(tmp_path, tiny_vit_factory):
    path = tmp_path / "float.onnx"
    export(tiny_vit_factory(), path)
    loaded = OrtModel(str(path))
    assert loaded.pretrained_cfg["mean"] == [0.1307] and loaded.scheme is None
