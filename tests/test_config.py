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


def test_parse_options_keeps_nan_and_infinity_as_text():
    # strict JSON: NaN/Infinity are not JSON values, so they stay strings for the Options types to refuse
    assert parse_options(["a=NaN", "b=Infinity", "c=-Infinity"]) == {"a": "NaN", "b": "Infinity", "c": "-Infinity"}
    assert "NaN" not in QuantConfig().to_json()


@pytest.mark.parametrize("text, expected", [("true", True), ("TRUE", True), ("False", False), ("false", False),
                                            ("auto", "auto")])
def test_boolean_options_from_the_command_line(text, expected):
    # regression: "False" (not JSON) was kept as a string, and a non-empty string is truthy
    options = QuantConfig(method="repq-vit", options=parse_options([f"reparam_head={text}"])).options
    assert options["reparam_head"] == expected and type(options["reparam_head"]) is type(expected)


@pytest.mark.parametrize("method, option, value, message", [
    ("repq-vit", "reparam_head", "maybe", "must be one of true, false, 'auto', got 'maybe'"),
    ("repq-vit", "reparam_head", 1, "must be one of true, false, 'auto', got 1"),
    ("adalog", "reparam_post_ln", "maybe", "must be true or false, got 'maybe'"),
    ("repq-vit", "candidates", "abc", r"must be a list of numbers, e\.g\. \[0\.99, 0\.999\], got 'abc'"),
    ("percentile", "percentile", "abc", "must be a number, got 'abc'"),
    ("percentile", "percentile", "NaN", "must be a number"),
    ("erq", "max_flips", 2.5, "must be an integer"),
    ("adalog", "q_range", [1, 2, 3], "list of 2 integers"),
    ("ias-vit", "stage1_inputs", "both", r"one of \['float', 'quantized'\]"),
    ("fq-vit", "observer", "bogus", "observer must be one of"),  # enums: the Options' own check
])
def test_option_values_are_checked_against_their_declared_types(method, option, value, message):
    with pytest.raises(VitquantError, match=message) as e:
        QuantConfig(method=method, options={option: value})
    assert "object is not iterable" not in str(e.value) and "not supported between" not in str(e.value)


def test_option_values_are_coerced_to_their_declared_types():
    assert QuantConfig(method="repq-vit", options={"candidates": "0.99, 0.999"}).options["candidates"] == (0.99, 0.999)
    assert QuantConfig(method="repq-vit", options={"candidates": 0.99}).options["candidates"] == (0.99,)
    assert QuantConfig(method="percentile", options={"percentile": 1}).options["percentile"] == 1.0
    assert QuantConfig(method="ias-vit", options={"iters": "none"}).options["iters"] is None
    assert QuantConfig(method="adalog", options={"q_range": [2, 9]}).options["q_range"] == (2, 9)


@pytest.mark.parametrize("bad", [[], "x", {"method": ["repq-vit"]}, {"options": [1]}, {"seed": 2**70},
                                 {"calib_size": True}])
def test_a_damaged_config_is_a_vitquant_error(bad):
    with pytest.raises(VitquantError):
        QuantConfig.from_dict(bad)
