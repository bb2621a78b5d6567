"""`best`: it runs its recipe, records it, and the recipe meets its condition over the committed results store."""
import json
import math
from collections import defaultdict
from pathlib import Path

import pytest
import torch

import vitquant
from vitquant import QuantConfig
from vitquant.calibration import CalibrationSet
from vitquant.errors import VitquantError
from vitquant.methods.best import RECIPES, recipe_for, resolve

STORE = Path(__file__).resolve().parents[2] / "benchmarks" / "results" / "accuracy_runs.jsonl"
TEST_IMAGES = 1000  # the MNIST-5k test split every stored run is scored on
# (model, variant) cells the recipe must cover with 3 seeds at W4A4 and W3A3; the store's other models (the
# old 12-block file and the Swin, whose weights were not kept) are checked wherever the recipe has 3 seeds
REQUIRED = {("bundled", "natural"), ("bundled", "stress S=30")}


def _means(rows):
    """(model, variant, bits) → {method spec: [top-1 per seed]}"""
    cells = defaultdict(lambda: defaultdict(dict))
    for r in rows:
        if r.get("bits") in ("W4A4", "W3A3") and "top1" in r:
            cells[r["model"], r["variant"], r["bits"]][r["method"]][r["seed"]] = r["top1"]
    return cells


def test_recipes_cover_every_bit_width_in_order():
    assert [most for most, _ in RECIPES] == sorted(most for most, _ in RECIPES) and RECIPES[-1][0] >= 8
    for bits in range(2, 9):
        assert recipe_for(bits, 8) == recipe_for(8, bits)


def test_best_is_within_one_standard_error_of_the_best_method_in_the_store():
    rows = [json.loads(line) for line in STORE.read_text().splitlines() if line.strip()]
    cells = _means(rows)
    checked = set()
    for (model, variant, bits), methods in sorted(cells.items()):
        w = a = int(bits[1])
        spec = recipe_for(w, a)
        mine = methods.get(spec, {})
        if len(mine) < 3:
            assert (model, variant) not in REQUIRED, f"{spec} lacks 3 seeds on {model} {variant} {bits}"
            continue
        # every stored single method (registered name, default options or not, +qwt or not), mean over its seeds
        others = {m: sum(v.values()) / len(v) for m, v in methods.items() if m != spec}
        top, top_mean = max(others.items(), key=lambda kv: kv[1])
        p = top_mean / 100
        se = 100 * math.sqrt(p * (1 - p) / TEST_IMAGES)
        mean = sum(mine.values()) / len(mine)
        assert mean >= top_mean - se, f"{model} {variant} {bits}: {spec} {mean:.2f} < {top} {top_mean:.2f} − {se:.2f}"
        checked.add((model, variant))
    assert REQUIRED <= checked


def test_best_runs_its_recipe_and_records_it(tiny_vit_factory, calib_images, tmp_path, monkeypatch):
    """The mechanism, on a cheap table (the real recipes reconstruct; their quality is the store test's)."""
    import vitquant.methods.best as best

    monkeypatch.setattr(best, "RECIPES", ((4, "repq-vit+qwt:reparam_head=true"), (8, "minmax")))
    model = tiny_vit_factory(depth=1, embed_dim=32)
    calib = CalibrationSet(calib_images[:8], "random", [])
    x = torch.randn(4, 1, 28, 28, generator=torch.Generator().manual_seed(3))
    for bits, method in (("w4a4", "repq-vit+qwt"), ("w8a8", "minmax")):
        config = QuantConfig.preset(bits, method="best")
        resolved = resolve(config)
        assert resolved.method == method and resolve(resolved) is resolved
        q = vitquant.quantize(model, config, calib, progress=False)
        ref = vitquant.quantize(model, resolved, calib, progress=False)
        assert q.config.method == method and q.stats["recipe"] == f"best → {method}"
        assert q.config.options == ref.config.options
        with torch.no_grad():
            assert torch.equal(q(x), ref(x))
        vitquant.save(q, tmp_path / bits)
        with torch.no_grad():
            assert torch.equal(vitquant.load(tmp_path / bits, model=model)(x), q(x))


def test_best_takes_no_options():
    with pytest.raises(VitquantError, match="no option"):
        QuantConfig.preset("w4a4", method="best", options={"iters": 3})
