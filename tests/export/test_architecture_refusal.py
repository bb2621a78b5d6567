"""ONNX export writes timm VisionTransformer graphs only (so far): any other architecture the core
quantizes is refused in one line before any work, never an AttributeError from the walker."""
import pytest
import torch

import vitquant
from vitquant import QuantConfig, VitquantError
from vitquant.calibration import CalibrationSet
from vitquant.models.zoo import TINY, family

pytest.importorskip("onnx")


@pytest.mark.parametrize("name", ["timm Swin", "HF ViT", "torchvision vit_b_16", "user nn.MultiheadAttention ViT",
                                  "timm BEiT"])
def test_non_timm_vit_export_is_a_one_line_error(name, tmp_path):
    model = family(name).build(TINY)
    size = model.pretrained_cfg["input_size"]
    q = vitquant.quantize(model, QuantConfig.preset("w8a8", method="minmax", calib_size=8),
                          CalibrationSet(torch.randn(8, *size), "random", []), progress=False)
    with pytest.raises(VitquantError) as e:
        vitquant.export(q, tmp_path / "m.onnx")
    assert "\n" not in str(e.value) and "export" in str(e.value)
    assert not (tmp_path / "m.onnx").exists()
