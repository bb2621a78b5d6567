import pytest

from vitquant.config import QuantConfig, parse_bits, parse_method_spec, parse_options
from vitquant.errors import VitquantError


def test_parse_bits():
    assert parse_bits("w4a8") == (4, 8)
    assert parse_bits(" W6A6 ") == (6, 6)


@pytest.mark.parametrize("bad", ["w0a4", "w4a1", "w9a8", "4/4", "w4", "wXa4"])
def test_bad_bits_are_refused(bad):
    with pytest.raises(VitquantError, match="bits"):
        parse_bits(bad)


def test_json_round_trip():
    c = QuantConfig.preset("w4a4", method="percentile", options={"percentile": 0.999}, seed=3)
    assert QuantConfig.from_dict(c.to_dict()) == c
    assert c.bits_name == "W4A4"


def test_validation():
    with pytest.raises(VitquantError, match="unknown method"):
        QuantConfig(method="nope")
    with pytest.raises(VitquantError, match="calib_size"):
        QuantConfig(calib_size=0)
    with pytest.raises(VitquantError, match="unknown quantization config keys"):
        QuantConfig.from_dict({"bits": 4})


def test_parse_options_reads_json_values_and_keeps_strings():
    assert parse_options(["a=true", "b=3", "c=0.5", "d=[1, 2]", "e=mse", "f=x=y"]) == {
        "a": True, "b": 3, "c": 0.5, "d": [1, 2], "e": "mse", "f": "x=y"}


@pytest.mark.parametrize("bad", ["novalue", "=3"])
def test_parse_options_refuses_pairs_without_key_or_value_sign(bad):
    with pytest.raises(VitquantError, match="key=value"):
        parse_options([bad])


def test_parse_method_spec():
    assert parse_method_spec("repq-vit") == ("repq-vit", {})
    assert parse_method_spec("repq-vit:reparam_head=true:percentile=99") == (
        "repq-vit", {"reparam_head": True, "percentile": 99})
    with pytest.raises(VitquantError, match="repq-vit:oops"):
        parse_method_spec("repq-vit:oops")
