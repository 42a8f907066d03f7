"""The spec grammar shared by norms, inits, datasets and schedules."""

import pytest

from reslab.errors import SpecError
from reslab.specs import bind, one_of, parse_spec, split_list, to_bool, to_float, to_int


def test_parse_name_positional_and_keywords():
    spec = parse_spec("kaiming_normal:mode=fan_out,nonlinearity=relu")
    assert spec.name == "kaiming_normal"
    assert spec.positional == ()
    assert dict(spec.kwargs) == {"mode": "fan_out", "nonlinearity": "relu"}
    assert parse_spec("gn:8").positional == ("8",)
    assert parse_spec("bn").kwargs == {}


@pytest.mark.parametrize(
    "text, items",
    [
        ("bn,gn,ln", ["bn", "gn", "ln"]),
        ("gn:8,bn", ["gn:8", "bn"]),
        ("zeros,uniform:a=-0.5,b=0.5,kaiming_normal", ["zeros", "uniform:a=-0.5,b=0.5", "kaiming_normal"]),
        (
            "kaiming_normal:mode=fan_out,nonlinearity=relu,xavier_normal:gain=relu",
            ["kaiming_normal:mode=fan_out,nonlinearity=relu", "xavier_normal:gain=relu"],
        ),
        ("0.1,0.01", ["0.1", "0.01"]),
        ("step:every=20,gamma=0.3333", ["step:every=20,gamma=0.3333"]),
    ],
)
def test_split_list_at_top_level_only(text, items):
    assert split_list(text) == items


@pytest.mark.parametrize("text", ["", ":x", "a b", "gn:", "x:a=1,a=2", "x:a=1,2", "x:1,,2", "x:=3"])
def test_malformed_specs_are_spec_errors(text):
    with pytest.raises(SpecError, match="malformed"):
        parse_spec(text)


def test_bind_converts_in_declaration_order():
    params = {"a": to_float, "n": to_int, "flag": to_bool, "mode": one_of("x", "y")}
    assert bind(parse_spec("s:1.5,3"), params, "thing") == {"a": 1.5, "n": 3}
    assert bind(parse_spec("s:mode=y,flag=true"), params, "thing") == {"mode": "y", "flag": True}


@pytest.mark.parametrize(
    "text, fragment",
    [
        ("s:zzz=1", "unknown argument 'zzz'"),
        ("s:1,2,3,4,5", "takes 4 argument(s)"),
        ("s:a=abc", "bad value 'abc'"),
        ("s:a=nan", "bad value 'nan'"),
        ("s:mode=z", "expected one of x, y"),
        ("s:1,a=2", "given twice"),
    ],
)
def test_bind_errors_name_the_bad_value(text, fragment):
    params = {"a": to_float, "n": to_int, "flag": to_bool, "mode": one_of("x", "y")}
    with pytest.raises(SpecError) as info:
        bind(parse_spec(text), params, "thing")
    assert fragment in str(info.value)
