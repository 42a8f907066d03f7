"""Every spec parser and the YAML config loader, fed arbitrary strings: each value either
parses or raises SpecError (a one-line message for the CLI), never another exception."""

import pytest
import yaml

hypothesis = pytest.importorskip("hypothesis")
from hypothesis import HealthCheck, given, settings  # noqa: E402
from hypothesis import strategies as st  # noqa: E402

from reslab.build import init_options  # noqa: E402
from reslab.config import TrainConfig, config_from_dict, load_config_file  # noqa: E402
from reslab.convs import conv_names, resolve_conv  # noqa: E402
from reslab.datasets import dataset_names, parse_dataset_spec  # noqa: E402
from reslab.errors import SpecError  # noqa: E402
from reslab.inits import (  # noqa: E402
    init_names,
    model_init_names,  # noqa: E402
    parse_policy,
    resolve_init,
)
from reslab.norms import make_norm, norm_names  # noqa: E402
from reslab.optim import SCHEDULES, parse_schedule  # noqa: E402
from reslab.specs import split_nonempty_list  # noqa: E402
from reslab.verdict import parse_check  # noqa: E402

SETTINGS = settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])

# Characters the spec languages give meaning to, so the examples reach the argument parsers
# and not only the name lookup; plus anything at all.
SYNTAX = st.sampled_from(list(":=,./-_ {}[]'\"\\\n\t0123456789eE+"))
WORDS = st.sampled_from(["nan", "inf", "-inf", "true", "None", "1e999", "0", "-1", "0.5", "1/2"])
noise = st.lists(st.one_of(st.text(alphabet=st.one_of(SYNTAX, st.characters()), max_size=6), WORDS),
                 max_size=6).map("".join)


def after(names):
    """A valid name, then anything: ``gn:`` + noise reaches the argument binding."""
    return st.builds(lambda name, sep, rest: name + sep + rest, st.sampled_from(sorted(names)),
                     st.sampled_from([":", ":groups=", ":eps=", ",", "=", ":tol=", ":max_iter=", ":alpha=",
                                  ":gamma=", ":cpg=", ":r_max="]), noise)


def parses_or_spec_error(parse, value):
    try:
        parse(value)
    except SpecError as exc:
        assert str(exc).strip() and "\n" not in str(exc).strip(), repr(str(exc))


@SETTINGS
@given(st.one_of(noise, after(norm_names())))
def test_norm_specs(text):
    parses_or_spec_error(lambda t: make_norm(t, 64), text)


@SETTINGS
@given(st.one_of(noise, after(init_names())))
def test_init_specs(text):
    parses_or_spec_error(resolve_init, text)


@SETTINGS
@given(st.one_of(noise, after(init_names()), st.dictionaries(
    st.sampled_from(["conv", "linear", "bias", "norm", "zero_init_residual", "model", "other"]),
    st.one_of(noise, st.booleans(), st.integers(), st.none(), st.floats()), max_size=4)))
def test_init_policies(value):
    parses_or_spec_error(parse_policy, value)


@SETTINGS
@given(st.one_of(noise, after(conv_names())))
def test_conv_specs(text):
    parses_or_spec_error(resolve_conv, text)


@SETTINGS
@given(st.one_of(noise, after(model_init_names())), st.sampled_from(["cifar_resnet20", "plain20", "mlp"]))
def test_whole_model_init_specs(text, model):
    parses_or_spec_error(lambda t: init_options(model, t), text)


@SETTINGS
@given(st.one_of(noise, after(SCHEDULES)))
def test_schedule_specs(text):
    parses_or_spec_error(parse_schedule, text)


@SETTINGS
@given(st.one_of(noise, after(dataset_names())))
def test_dataset_specs(text):
    parses_or_spec_error(parse_dataset_spec, text)


@SETTINGS
@given(noise)
def test_sweep_lists(text):
    parses_or_spec_error(lambda t: split_nonempty_list(t, "--norm"), text)


@SETTINGS
@given(noise)
def test_verdict_checks(text):
    parses_or_spec_error(lambda t: parse_check(t, grid_fields=["norm"]), text)


FIELDS = [f for f in TrainConfig.__dataclass_fields__]
yaml_values = st.recursive(st.one_of(st.none(), st.booleans(), st.integers(), st.floats(), noise),
                           lambda inner: st.one_of(st.lists(inner, max_size=3),
                                                   st.dictionaries(noise, inner, max_size=3)), max_leaves=6)


@SETTINGS
@given(st.one_of(noise, st.dictionaries(st.one_of(st.sampled_from(FIELDS), noise), yaml_values, max_size=4)
                 .map(lambda d: yaml.safe_dump(d, allow_unicode=True)))
       .filter(lambda t: not any("\ud800" <= c <= "\udfff" for c in t)))  # a UTF-8 file holds no lone surrogate
def test_yaml_config_files(tmp_path_factory, text):
    path = tmp_path_factory.mktemp("cfg") / "config.yaml"
    path.write_text(text, encoding="utf-8")

    def load(_):
        data = load_config_file(path)
        config_from_dict(data).validate()

    parses_or_spec_error(load, None)
