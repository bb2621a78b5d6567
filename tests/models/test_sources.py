"""Models from every place a user has them — a Hugging Face directory, torchvision, a python factory, a
timm model built at another size — quantize, save and load back to identical outputs, and the input
size comes from the model itself."""
import json
import sys

import numpy as np
import pytest
import torch
from PIL import Image

import vitquant
from vitquant import QuantConfig, VitquantError
from vitquant.calibration import CalibrationSet
from vitquant.calibration.data import data_config_for
from vitquant.cli import main
from vitquant.models.io import logits_of


def _images(folder, n=10, size=32):
    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(0)
    for i in range(n):
        Image.fromarray(rng.integers(0, 255, (size, size, 3), dtype=np.uint8)).save(folder / f"{i}.png")
    return folder


def test_hugging_face_directory_end_to_end(tmp_path, capsys):
    tf = pytest.importorskip("transformers")
    model = tf.ViTForImageClassification(tf.ViTConfig(hidden_size=32, num_hidden_layers=2, num_attention_heads=2,
                                                      intermediate_size=64, image_size=32, patch_size=8, num_labels=3))
    model.save_pretrained(tmp_path / "hf", safe_serialization=True)
    (tmp_path / "hf" / "preprocessor_config.json").write_text(json.dumps(
        {"image_mean": [0.5, 0.5, 0.5], "image_std": [0.5, 0.5, 0.5], "size": {"height": 32, "width": 32},
         "resample": 2, "do_resize": True}))
    loaded = vitquant.load_model(str(tmp_path / "hf"))
    cfg = data_config_for(loaded)
    assert cfg["input_size"] == (3, 32, 32) and cfg["mean"] == (0.5, 0.5, 0.5)
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():  # the saved weights were loaded, not a random init
        assert torch.equal(logits_of(loaded(x)), logits_of(model.eval()(x)))
    out = tmp_path / "q"
    assert main(["quantize", "--model", str(tmp_path / "hf"), "--calib", str(_images(tmp_path / "imgs")),
                 "--calib-size", "8", "--bits", "w8a8", "--out", str(out), "--quiet"]) == 0
    back = vitquant.load(out)  # rebuilt from the recorded HF config, no model= needed
    q = vitquant.quantize(loaded, QuantConfig.preset("w8a8", calib_size=8), str(tmp_path / "imgs"), progress=False)
    with torch.no_grad():
        assert torch.equal(logits_of(back(x)), logits_of(q(x)))


def test_python_factory_end_to_end(tmp_path, monkeypatch):
    (tmp_path / "my_models.py").write_text(
        "from vitquant.models.zoo import MHAViT\n"
        "import torch\n"
        "def build():\n"
        "    torch.manual_seed(0)\n"
        "    return MHAViT()\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    model = vitquant.load_model("python:my_models:build")
    calib = CalibrationSet(torch.randn(8, 3, 32, 32), "random", [])
    q = vitquant.quantize(model, QuantConfig.preset("w8a8", method="repq-vit", calib_size=8), calib, progress=False)
    vitquant.save(q, tmp_path / "q")
    back = vitquant.load(tmp_path / "q")  # the factory is called again
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        assert torch.equal(back(x), q(x))
    sys.modules.pop("my_models", None)
    with pytest.raises(VitquantError, match="cannot import model factory"):
        vitquant.load_model("python:no_such_module_xyz:build")


def test_torchvision_with_a_checkpoint(tmp_path):
    tv = pytest.importorskip("torchvision")
    from safetensors.torch import save_file

    torch.manual_seed(0)
    ref = tv.models.swin_t(num_classes=4).eval()
    save_file({k: v.contiguous() for k, v in ref.state_dict().items()}, str(tmp_path / "swin.safetensors"))
    model = vitquant.load_model("torchvision:swin_t", checkpoint=tmp_path / "swin.safetensors")
    assert data_config_for(model)["input_size"] == (3, 224, 224)
    x = torch.randn(1, 3, 224, 224)
    with torch.no_grad():
        assert torch.equal(model(x), ref(x))
    with pytest.raises(VitquantError, match="torchvision has no model"):
        vitquant.load_model("torchvision:no_such_net")


def test_input_size_comes_from_the_model_not_its_pretrained_config():
    timm = pytest.importorskip("timm")
    m = timm.create_model("vit_tiny_patch16_224", pretrained=False, img_size=64, depth=1, num_classes=3)
    assert m.pretrained_cfg["input_size"] == (3, 224, 224)  # what timm's config says
    assert data_config_for(m)["input_size"] == (3, 64, 64)  # what the model is
    d = timm.create_model("vit_small_patch14_dinov2", pretrained=False, img_size=224, depth=1)
    assert data_config_for(d)["input_size"] == (3, 224, 224)  # DINOv2 built for 224, not its 518 default


def test_plain_module_takes_its_input_size_from_the_images():
    from vitquant.models.zoo import MHAViT

    model = MHAViT()
    del model.pretrained_cfg  # a module that says nothing about its input
    q = vitquant.quantize(model, QuantConfig.preset("w8a8", method="minmax", calib_size=8),
                          torch.randn(8, 3, 32, 32), progress=False)
    assert q.structure.input_shape == (3, 32, 32)


def test_api_refuses_nonfinite_weights_and_bad_sources(tiny_vit, calib_images, tmp_path):
    with torch.no_grad():
        tiny_vit.blocks[0].attn.qkv.weight[0, 0] = float("inf")
    with pytest.raises(VitquantError, match="non-finite .* allow_nonfinite=True"):
        vitquant.quantize(tiny_vit, "w8a8", calib_images, progress=False)
    with pytest.raises(VitquantError, match="not a Hugging Face model directory"):
        vitquant.load_model(str(tmp_path))
    tv = pytest.importorskip("torchvision")
    from safetensors.torch import save_file

    save_file({k: v.contiguous() for k, v in tv.models.resnet18(num_classes=4).state_dict().items()},
              str(tmp_path / "r.safetensors"))
    with pytest.raises(VitquantError, match="does not fit"):  # a checkpoint of another architecture
        vitquant.load_model("torchvision:swin_t", checkpoint=tmp_path / "r.safetensors")
