"""Per-point plans written as exact names: any name round-trips, the user's own globs stay pinned."""
import pytest

from vitquant.config import QuantConfig
from vitquant.errors import VitquantError
from vitquant.models import prepare
from vitquant.plan import SitePlan, exact_glob, pinned_points, with_point_bits


@pytest.mark.parametrize("name", ["blocks.0.attn.qkv.input", "layers[0].q*", "x?y", "a[b]c"])
def test_exact_glob_matches_only_its_name(name):
    from fnmatch import fnmatchcase

    g = exact_glob(name)
    assert fnmatchcase(name, g)
    for other in (name + "x", name.replace(".", "_"), "blocks.0.attn.qkv.inputs", "xzy", "abc"):
        if other != name:
            assert not fnmatchcase(other, g)


def test_point_bits_resolve_to_the_plan(tiny_vit):
    s = prepare(tiny_vit).structure
    base = QuantConfig.preset("w4a4", method="minmax", site_bits={"head*": 8})
    bits = {"blocks.0.attn.qkv.input": 6, "blocks.1.mlp.fc2.weight": 3, "blocks.0.attn.softmax": None,
            "blocks.1.attn.proj.weight": None, "blocks.0.mlp.fc1.input": 4}
    config = with_point_bits(base, bits)
    assert "blocks.0.mlp.fc1.input" not in config.site_bits  # at the default already
    plan = SitePlan.resolve(config, s)
    assert plan.act("blocks.0.attn.qkv.input") == 6 and plan.act("blocks.0.attn.softmax") is None
    assert plan.weight("blocks.1.mlp.fc2") == 3 and plan.weight("blocks.1.attn.proj") is None
    assert plan.act("head.input") == 8 and plan.act("blocks.1.attn.q") == 4  # the rest as before
    back = QuantConfig.from_dict(config.to_dict())  # the saved config replays the plan
    assert SitePlan.resolve(back, s) == plan
    assert pinned_points(base, s) == {"head.input", "head.weight", "patch_embed.proj.input"}
    with pytest.raises(VitquantError, match="matches no quantization site"):
        SitePlan.resolve(with_point_bits(base, {"blocks.9.attn.q": 6}), s)
