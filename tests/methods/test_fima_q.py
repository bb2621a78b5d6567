"""FIMA-Q end to end on a tiny random ViT: the DPLR Fisher loss in the shared reconstruction."""
import pytest
import torch

import vitquant
from vitquant import QuantConfig
from vitquant.calibration import CalibrationSet
from vitquant.errors import VitquantError
from vitquant.methods import get_method
from vitquant.methods.fima_q import FIMAQOptions, FisherDPLRObjective
from vitquant.methods.reconstruction import float_teacher, reconstruct_blocks
from vitquant.models import prepare

W4A4 = QuantConfig.preset("w4a4", method="repq-vit")


@pytest.fixture
def small_vit(tiny_vit_factory):
    return tiny_vit_factory(depth=2, embed_dim=32)


def test_end_to_end_quality_probes_and_exact_reload(small_vit, calib_images, sqnr, tmp_path, monkeypatch):
    probes = []
    real = FisherDPLRObjective.probe

    def counting(self):
        probes.append(self.job.name)
        real(self)

    monkeypatch.setattr(FisherDPLRObjective, "probe", counting)
    config = QuantConfig.preset("w4a4", method="fima-q", options={"iters": 20, "rank": 3})
    q = vitquant.quantize(small_vit, config, CalibrationSet(calib_images, "random", []), progress=False)
    # 3 probes per non-head unit (before optimisation, then at iterations 6 and 13); the head uses KL
    assert probes == [n for n in ("patch_embed.proj", "blocks.0", "blocks.1") for _ in range(3)]
    x = torch.randn(16, 1, 28, 28, generator=torch.Generator().manual_seed(5))
    with torch.no_grad():
        ref, out = small_vit(x), q(x)
    assert sqnr(ref, out) > 8
    vitquant.save(q, tmp_path / "q")
    with torch.no_grad():
        assert torch.equal(vitquant.load(tmp_path / "q", model=small_vit)(x), out)


def test_fisher_reconstruction_lowers_each_blocks_metric(small_vit, calib_images):
    qmodel = prepare(small_vit)
    calib = CalibrationSet(calib_images, "random", [])
    get_method("repq-vit")().fit(qmodel, calib, W4A4, progress=False)
    opts = FIMAQOptions(act_lr=1e-3).reconstruction(30, 16, 0)
    results = reconstruct_blocks(qmodel, calib, opts, progress=False, teacher=float_teacher(qmodel, small_vit))
    assert [r.objective for r in results.values()] == ["fisher-dplr"] * 3 + ["kl"]
    # blocks.0 −4 % (a random ViT's first block mostly passes the patch embedding's error on), blocks.1 more
    assert results["blocks.0"].loss_after < 0.99 * results["blocks.0"].loss_before
    assert results["blocks.1"].loss_after < 0.9 * results["blocks.1"].loss_before


def test_options():
    assert get_method("fima-q").validate_options({})["rank"] == 5
    assert "probe" not in get_method("fima-q").validate_options({})  # APH's options are APHQ-ViT's only
    for bad in ({"rank": 0}, {"p1": 0, "p2": 0}, {"damping": -1}, {"objective": "aph"}):
        with pytest.raises(VitquantError):
            get_method("fima-q").validate_options(bad)
