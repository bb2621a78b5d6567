import pytest

from vitquant.config import QuantConfig, parse_bits
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
