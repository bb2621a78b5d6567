"""QuantConfig(deployable=True) and the stand-in rule shared by calibration and export."""
from __future__ import annotations

import pytest
import torch

import vitquant
from vitquant.methods.deployable import exports_exactly, make_deployable, uniform_stand_in
from vitquant.quantizers import Log2Quantizer, LogSqrt2Quantizer, UniformQuantizer


def _uniform(lo: float, hi: float, bits: int = 8, symmetric: bool = False) -> UniformQuantizer:
    q = UniformQuantizer(bits, symmetric=symmetric)
    q.set_range(torch.tensor(lo), torch.tensor(hi))
    return q


def test_which_grids_export_exactly():
    assert exports_exactly(_uniform(-1.0, 3.0))  # s = 4/255, z = round(63.75) = 64
    assert exports_exactly(_uniform(-2.0, 2.0, symmetric=True))  # signed grid, moved to uint8 by +128
    assert exports_exactly(_uniform(-1.0, 3.0, bits=4))  # a 4-bit grid is a clipped uint8 grid
    # all-positive range: z = round(−0.2 / (0.8/255)) = round(−63.75) = −64, not a uint8
    assert not exports_exactly(_uniform(0.2, 1.0))
    assert not exports_exactly(_uniform(-1.0, 3.0, bits=10))
    log = LogSqrt2Quantizer(8)
    log.set_scale(0.5)
    assert not exports_exactly(log) and not exports_exactly(None)


def test_log_stand_in_is_the_uint8_grid_over_zero_to_scale():
    log = Log2Quantizer(4)
    log.set_scale(0.5)  # outputs 0 (underflow) … 0.5 (code 0)
    u = uniform_stand_in(log, 8)
    assert u.scale.item() == pytest.approx(0.5 / 255) and u.zero_point.item() == 0 and u.bits == 8
    assert exports_exactly(u)


def test_stand_in_of_a_grid_without_zero_widens_it_to_hold_zero():
    u = uniform_stand_in(_uniform(0.2, 1.0), 8)
    # the old grid's extremes are (0 − (−64))·s and (255 + 64)·s with s = 0.8/255; the new one is [0, hi]
    hi = (255 + 64) * 0.8 / 255
    assert u.zero_point.item() == 0 and u.scale.item() == pytest.approx(hi / 255, rel=1e-6)


def test_deployable_repq_has_no_log_quantizers_and_exports_exactly(tiny_vit_factory, calib_images):
    qmodel = vitquant.quantize(tiny_vit_factory(), vitquant.QuantConfig(deployable=True), calib_images,
                               progress=False)
    sites = qmodel.act_sites()
    assert all(exports_exactly(s.quantizer) for s in sites.values() if s.enabled)
    assert isinstance(sites["blocks.0.attn.softmax"].quantizer, UniformQuantizer)
    assert "deployable_stand_ins" in qmodel.stats


def test_make_deployable_replaces_what_a_method_left_behind(tiny_vit_factory, calib_images):
    qmodel = vitquant.quantize(tiny_vit_factory(), "w8a8", calib_images, progress=False)  # log√2 softmax
    site = qmodel.act_sites()["blocks.1.attn.softmax"]
    scale = site.quantizer.scale.item()
    changed = make_deployable(qmodel)
    assert len(changed) == 2 and "log_sqrt2 8b → uniform 8b" in changed[1]
    assert site.quantizer.scale.item() == pytest.approx(scale / 255)


def test_config_round_trip_and_validation():
    cfg = vitquant.QuantConfig(deployable=True)
    assert vitquant.QuantConfig.from_dict(cfg.to_dict()).deployable is True
    assert vitquant.QuantConfig.from_dict({k: v for k, v in cfg.to_dict().items() if k != "deployable"}).deployable is False
    with pytest.raises(vitquant.VitquantError, match="deployable"):
        vitquant.QuantConfig(deployable="yes")
