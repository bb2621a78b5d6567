"""--max-drop: the search finds the fewest raises, on a validation half the calibration never saw."""
import pytest
import torch

import vitquant
from vitquant.bench import STRESS
from vitquant.calibration.data import LabeledSet, data_config_for, load_calibration, load_labeled
from vitquant.config import QuantConfig
from vitquant.errors import VitquantError
from vitquant.mixed.target import Trial, _search, meet_target, split_holdout
from vitquant.models.outliers import inject_ln_outliers


def test_holdout_halves_are_disjoint():
    data = LabeledSet(torch.arange(10).float().view(10, 1, 1, 1), torch.arange(10), "ten", None, [])
    val, rep = split_holdout(data)
    assert val.labels.tolist() == [0, 2, 4, 6, 8] and rep.labels.tolist() == [1, 3, 5, 7, 9]
    with pytest.raises(VitquantError, match="validation and a reporting half"):
        split_holdout(LabeledSet(data.images[:1], data.labels[:1], "one", None, []))


@pytest.mark.parametrize("n,threshold", [(1, 1), (5, 5), (13, 13), (40, 7), (40, 1), (64, 33), (9, None)])
def test_search_finds_the_smallest_k(n, threshold):
    """With a monotone target (met from k = threshold on), doubling + bisection returns exactly the
    threshold, in O(log n) trials, and None when even k = n misses."""
    tried = []

    def trial(k):
        tried.append(k)
        return Trial("8-bit", k, k, 0.0, 0.0, 0, threshold is not None and k >= threshold)

    found = _search(n, trial)
    if threshold is None:
        assert found is None and n in tried
    else:
        assert found.k == threshold and (threshold == 1 or threshold - 1 in tried)
        assert len(tried) <= 2 * max(1, n).bit_length() + 1


def test_stress_model_meets_the_target_with_one_site():
    """RepQ-ViT W4A4 (published recipe: reparam_head=false) on the stress model loses ~80 points through the head input alone: the search
    raises exactly that site to 8 bits, and the reporting half (unseen by the search) agrees."""
    model = inject_ln_outliers(vitquant.load_model("bundled"), **STRESS)
    cfg = data_config_for(model)
    calib = load_calibration("bundled", cfg, n=16, seed=0, min_images=8)
    holdout = load_labeled("bundled", cfg, limit=300)
    config = QuantConfig.preset("w4a4", method="repq-vit", calib_size=16, options={"reparam_head": False})
    res = meet_target(model, config, calib, holdout, 1.0)
    assert res.path[0].phase == "start" and res.path[0].drop > 50
    assert res.met and res.changes == {"head.input": 8}
    assert res.report["drop"] < 3.0  # 150 unseen images: one image is 0.67 points
    assert res.config.site_bits == {"head.input": 8}
    d = res.to_dict()
    assert d["final"]["k"] == 1 and d["changed_points"] == 1 and len(d["path"]) == len(res.path)
    with pytest.raises(VitquantError, match="max_drop"):
        meet_target(model, QuantConfig.preset("w4a4", method="repq-vit"), calib, holdout, -1)
