import json

import pytest
import torch

import vitquant
from vitquant import QuantConfig
from vitquant.calibration import CalibrationSet
from vitquant.errors import VitquantError


@pytest.mark.parametrize("bits", ["w8a8", "w4a4", "w3a3"])
def test_save_load_identical_outputs(tiny_vit, calib_images, tmp_path, bits):
    q = vitquant.quantize(tiny_vit, QuantConfig.preset(bits), CalibrationSet(calib_images, "r", []), progress=False)
    out = vitquant.save(q, tmp_path / "q")
    meta = json.loads((out / "quant_config.json").read_text())
    assert meta["config"]["method"] == "repq-vit"
    assert meta["quantizers"]["blocks.0.attn.softmax"]["quantizer"]["type"] == "log_sqrt2"
    assert isinstance(meta["quantizers"]["blocks.0.attn.qkv.weight"]["quantizer"]["scale"], list)
    r = vitquant.load(out, model=tiny_vit)
    x = torch.randn(5, 1, 28, 28)
    with torch.no_grad():
        assert torch.equal(q(x), r(x))
    # weights are stored as integer codes, so the file is much smaller than fp32
    from safetensors.torch import load_file

    sd = load_file(str(out / "model.safetensors"))
    assert sd["blocks.0.mlp.fc1.weight"].dtype == torch.uint8


def test_save_refuses_to_overwrite_and_force_replaces_only_vitquant_outputs(tiny_vit, calib_images, tmp_path):
    q = vitquant.quantize(tiny_vit, "w8a8", CalibrationSet(calib_images, "r", []), progress=False)
    target = tmp_path / "q"
    target.mkdir()
    (target / "keep.txt").write_text("old result")
    with pytest.raises(VitquantError, match="already exists"):
        vitquant.save(q, target)
    # regression: force=True used to delete any directory, e.g. a folder of the user's own files
    with pytest.raises(VitquantError, match="not written by vitquant"):
        vitquant.save(q, target, force=True)
    assert (target / "keep.txt").read_text() == "old result"
    (target / "keep.txt").unlink()
    vitquant.save(q, target, force=True)  # an empty directory holds nothing to lose
    assert json.loads((target / ".vitquant-output").read_text())["files"] == sorted(
        ["model.safetensors", "quant_config.json", "report.md"])
    vitquant.save(q, target, force=True)  # vitquant's own output is replaced
    (target / "notes.txt").write_text("mine")
    with pytest.raises(VitquantError, match=r"files vitquant did not write \(notes.txt\)"):
        vitquant.save(q, target, force=True)
    assert (target / "notes.txt").read_text() == "mine"
    assert [p.name for p in tmp_path.iterdir()] == ["q"]  # no temporary leftovers


def test_load_rejects_non_model_dir(tmp_path):
    with pytest.raises(VitquantError, match="not a saved vitquant model"):
        vitquant.load(tmp_path)


def test_quantize_leaves_float_model_untouched(tiny_vit, calib_images):
    before = {k: v.clone() for k, v in tiny_vit.state_dict().items()}
    vitquant.quantize(tiny_vit, "w4a4", CalibrationSet(calib_images, "r", []), progress=False)
    assert all(torch.equal(before[k], v) for k, v in tiny_vit.state_dict().items())


def test_saved_record_is_strict_json_with_checksums_and_the_float_checkpoint(tiny_vit, calib_images, tmp_path):
    from safetensors.torch import save_file

    from vitquant.config import strict_json_loads
    from vitquant.serialization import sha256_file

    ckpt = tmp_path / "float.safetensors"
    save_file({k: v.contiguous() for k, v in tiny_vit.state_dict().items()}, str(ckpt))
    tiny_vit.vitquant_source = {"type": "timm.VisionTransformer", "weights": "float.safetensors",
                                "kwargs": dict(img_size=28, patch_size=7, in_chans=1, num_classes=10, embed_dim=64,
                                               depth=2, num_heads=2), "pretrained_cfg": tiny_vit.pretrained_cfg}
    q = vitquant.quantize(tiny_vit, "w8a8", CalibrationSet(calib_images, "r", []), progress=False)
    import os

    cwd = os.getcwd()
    os.chdir(tmp_path)  # the source names the checkpoint relative to here, as a user typed it
    try:
        out = vitquant.save(q, tmp_path / "q")
    finally:
        os.chdir(cwd)
    meta = strict_json_loads((out / "quant_config.json").read_text())
    assert meta["float_weights"] == {"path": str(ckpt.resolve()), "sha256": sha256_file(ckpt),
                                     "bytes": ckpt.stat().st_size}
    assert meta["integrity"]["model.safetensors_sha256"] == sha256_file(out / "model.safetensors")
    assert "# " in (out / "report.md").read_text().splitlines()[0]


def test_a_directory_saved_before_checksums_still_loads_and_is_replaceable(tiny_vit, calib_images, tmp_path):
    q = vitquant.quantize(tiny_vit, "w4a4", CalibrationSet(calib_images, "r", []), progress=False)
    out = vitquant.save(q, tmp_path / "q")
    meta = json.loads((out / "quant_config.json").read_text())
    meta["format"] = "vitquant-quantized/1"
    del meta["integrity"], meta["float_weights"]
    (out / "quant_config.json").write_text(json.dumps(meta))
    (out / ".vitquant-output").unlink()
    (out / "report.md").unlink()  # what a version-1 directory held: weights and record only
    x = torch.randn(4, 1, 28, 28)
    with torch.no_grad():
        assert torch.equal(vitquant.load(out, model=tiny_vit)(x), q(x))
    vitquant.save(q, out, force=True)
    assert (out / ".vitquant-output").is_file()


def test_a_record_cannot_make_load_read_other_files(tiny_vit, calib_images, tmp_path):
    from vitquant.serialization import meta_digest, sha256_file

    tiny_vit.vitquant_source = {"type": "timm", "name": "vit_tiny_patch16_224", "kwargs": {}}
    q = vitquant.quantize(tiny_vit, "w8a8", CalibrationSet(calib_images, "r", []), progress=False)
    out = vitquant.save(q, tmp_path / "q")
    meta = json.loads((out / "quant_config.json").read_text())
    meta["source"]["kwargs"] = {"checkpoint_path": str(tmp_path / "elsewhere.pth")}
    meta["integrity"] = {"model.safetensors_sha256": sha256_file(out / "model.safetensors"),
                         "meta_sha256": meta_digest(meta)}
    (out / "quant_config.json").write_text(json.dumps(meta))
    with pytest.raises(VitquantError, match="arguments vitquant never writes"):
        vitquant.load(out)


def test_a_qwt_compensation_is_saved_and_loaded_with_identical_outputs(tiny_vit, calib_images, tmp_path):
    from safetensors.torch import load_file

    from vitquant.methods.qwt import compensation_of

    q = vitquant.quantize(tiny_vit, QuantConfig.preset("w4a4", method="repq-vit+qwt"),
                          CalibrationSet(calib_images, "r", []), progress=False)
    comp = compensation_of(q)
    assert comp.units == ["blocks.0", "blocks.1"]
    out = vitquant.save(q, tmp_path / "q")
    meta = json.loads((out / "quant_config.json").read_text())
    assert meta["config"]["method"] == "repq-vit+qwt" and meta["qwt"]["units"] == comp.units
    assert meta["qwt"]["record"]["head"]["compensated"] is False
    sd = load_file(str(out / "model.safetensors"))
    assert sd["qwt/blocks.0/weight"].shape == (64, 64) and sd["qwt/blocks.1/bias"].dtype == torch.float32
    r = vitquant.load(out, model=tiny_vit)
    x = torch.randn(5, 1, 28, 28)
    with torch.no_grad():
        assert torch.equal(q(x), r(x))
        compensation_of(r).term("blocks.1").bias.zero_()  # the loaded model computes with its compensation
        assert not torch.equal(q(x), r(x))
    assert compensation_of(r).record == comp.record


def test_a_damaged_qwt_record_is_refused(tiny_vit, calib_images, tmp_path):
    from safetensors.torch import load_file, save_file

    from vitquant.serialization import META, WEIGHTS, meta_digest, sha256_file

    q = vitquant.quantize(tiny_vit, QuantConfig.preset("w4a4", method="minmax+qwt"),
                          CalibrationSet(calib_images, "r", []), progress=False)
    out = vitquant.save(q, tmp_path / "q")
    sd = load_file(str(out / WEIGHTS))
    sd.pop("qwt/blocks.1/weight")
    save_file(sd, str(out / WEIGHTS))  # re-signed, as a buggy writer would: the content check must catch it
    meta = json.loads((out / META).read_text())
    meta["integrity"]["model.safetensors_sha256"] = sha256_file(out / WEIGHTS)
    meta["integrity"]["meta_sha256"] = meta_digest(meta)
    (out / META).write_text(json.dumps(meta))
    with pytest.raises(VitquantError, match="QwT compensation of 'blocks.1' is missing"):
        vitquant.load(out, model=tiny_vit)
