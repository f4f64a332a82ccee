"""SearchSpace: hparam.yaml parsing and validation, the box maps, the canonical dict."""

from __future__ import annotations

import json
import math
import os
import re
import textwrap

import numpy as np
import pytest
import yaml
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import tuners.space as space_module
from tuners import ChoiceParam, FloatParam, IntParam, SearchSpace, SearchSpaceError

# --- the original's format ---------------------------------------------------------------

# PaddleHub's tutorial hparam.yaml (autofinetune-cv.md), spacing and key order as published.
ORIGINAL_YAML = """\
param_list:
- name : learning_rate
  init_value : 0.001
  type : float
  lower_than : 0.05
  greater_than : 0.00005
- name : batch_size
  init_value : 16
  type : int
  lower_than : 32
  greater_than : 8
"""


def write(tmp_path, text: str, name: str = "hparam.yaml"):
    path = tmp_path / name
    path.write_text(textwrap.dedent(text))
    return path


def test_original_example_means_the_same(tmp_path):
    space = SearchSpace.from_yaml(write(tmp_path, ORIGINAL_YAML))
    assert space.names == ("learning_rate", "batch_size")
    assert space.params == (FloatParam(name="learning_rate", init_value=0.001, low=0.00005, high=0.05),
                            IntParam(name="batch_size", init_value=16, low=8, high=32))
    init = space.init_params()
    assert init == {"learning_rate": 0.001, "batch_size": 16}
    assert type(init["learning_rate"]) is float and type(init["batch_size"]) is int
    # the original's normalization: x = 2 (v - lo) / (hi - lo) - 1
    np.testing.assert_allclose(space.init_vector(), [2 * (0.001 - 5e-5) / (0.05 - 5e-5) - 1, 2 * 8 / 24 - 1])
    # both bounds inclusive and reachable (the original truncated ints: 32 only at x = 1 exactly)
    assert space.denormalize([-1, -1]) == {"learning_rate": 5e-05, "batch_size": 8}
    assert space.denormalize([1, 1]) == {"learning_rate": 0.05, "batch_size": 32}
    assert space.denormalize([0, 0.99])["batch_size"] == 32
    # the flags the original wrote: --learning_rate=0.001 --batch_size=16
    assert [space.format_value(n, init[n]) for n in space.names] == ["0.001", "16"]


def test_yaml11_exponent_strings_are_numbers(tmp_path):
    # YAML 1.1 reads 5e-5 (no dot) as a string; the original's float() accepted it
    space = SearchSpace.from_yaml(write(tmp_path, """\
        param_list:
          - {name: lr, init_value: 1e-3, type: float, greater_than: 5e-5, lower_than: "0.05"}
          - {name: bs, init_value: "16", type: int, greater_than: 8.0, lower_than: 3.2e1}
        """))
    assert space.params == (FloatParam(name="lr", init_value=1e-3, low=5e-5, high=0.05),
                            IntParam(name="bs", init_value=16, low=8, high=32))


@pytest.mark.parametrize("spelling", ["int", "INT", "Int", " int "])
def test_type_is_case_insensitive(spelling):
    space = SearchSpace.from_dict({"param_list": [
        {"name": "n", "type": spelling, "init_value": 2, "greater_than": 1, "lower_than": 5}]})
    assert isinstance(space.params[0], IntParam)


def test_extensions_log_and_choice(tmp_path):
    space = SearchSpace.from_yaml(write(tmp_path, """\
        param_list:
          - {name: lr, type: float, log: true, init_value: 0.001, greater_than: 1.0e-6, lower_than: 1}
          - {name: units, type: int, log: true, init_value: 64, greater_than: 8, lower_than: 512}
          - {name: opt, type: Choice, init_value: adam, values: [adam, sgd, 0.5, 3, true]}
        """))
    lr, units, opt = space.params
    assert lr == FloatParam(name="lr", init_value=0.001, low=1e-6, high=1.0, log=True)
    assert units == IntParam(name="units", init_value=64, low=8, high=512, log=True)
    # choice values as the YAML spells them: they reach the script exactly as written
    assert opt == ChoiceParam(name="opt", init_value="adam", values=("adam", "sgd", "0.5", "3", "true"))
    # log scale: the geometric middle sits at the box centre
    assert space.denormalize([0, 0, 0])["lr"] == pytest.approx(1e-3)
    assert space.denormalize([0, 0, 0])["units"] == 64
    # choice: five equal bins of the box
    assert [opt.denormalize(x) for x in (-1, -0.5, 0.0, 0.4, 0.8, 1)] == ["adam", "sgd", "0.5", "3", "true", "true"]
    assert [space.format_value("opt", v) for v in opt.values] == ["adam", "sgd", "0.5", "3", "true"]


def test_choice_values_reach_the_command_line_exactly_as_written(tmp_path):
    space = SearchSpace.from_yaml(write(tmp_path, """\
        param_list:
          - {name: flag, type: choice, init_value: yes, values: [true, False, yes, off, 1e-3, 0x10, "1.50"]}
        """))
    (flag,) = space.params
    assert flag.init_value == "yes"
    assert [space.format_value("flag", v) for v in flag.values] == ["true", "False", "yes", "off", "1e-3",
                                                                   "0x10", "1.50"]
    # the same spelling twice (true / "true") is one value on a command line: refused
    with pytest.raises(SearchSpaceError, match=r"values\[1\]='true' repeats values\[0\]='true'"):
        SearchSpace.from_yaml(write(tmp_path, """\
            param_list:
              - {name: flag, type: choice, init_value: true, values: [true, "true"]}
            """))


def test_steps_in_the_box():
    space = SearchSpace.from_dict({"param_list": [
        {"name": "a", "type": "float", "init_value": 0.5, "greater_than": 0, "lower_than": 1},
        {"name": "b", "type": "int", "init_value": 10, "greater_than": 8, "lower_than": 32},
        {"name": "c", "type": "int", "log": True, "init_value": 10, "greater_than": 8, "lower_than": 32},
        {"name": "d", "type": "choice", "init_value": "x", "values": ["x", "y", "z", "w"]}]})
    assert [p.step for p in space.params] == [None, 2 / 24, None, 0.5]
    assert [p.grid_bounds for p in space.params] == [(-1.0, 1.0), (-1.0, 1.0), (-1.0, 1.0), (-0.75, 0.75)]


def test_values_are_python_types_and_format_round_trips():
    space = SearchSpace.from_dict({"param_list": [
        {"name": "lr", "type": "float", "init_value": 0.1, "greater_than": 0, "lower_than": 1},
        {"name": "n", "type": "int", "init_value": 3, "greater_than": 1, "lower_than": 100}]})
    for x in np.random.default_rng(0).uniform(-1.2, 1.2, size=(50, 2)):
        params = space.denormalize(x)
        assert type(params["lr"]) is float and type(params["n"]) is int
        assert float(space.format_value("lr", params["lr"])) == params["lr"]
        assert space.format_value("n", params["n"]) == str(params["n"])


def test_normalize_rejects_illegal_values():
    space = SearchSpace.from_dict({"param_list": [
        {"name": "n", "type": "int", "init_value": 3, "greater_than": 1, "lower_than": 5},
        {"name": "c", "type": "choice", "init_value": "a", "values": ["a", "b"]}]})
    with pytest.raises(ValueError, match=r"n: 6 is outside \[1, 5\]"):
        space.normalize({"n": 6, "c": "a"})
    with pytest.raises(ValueError, match="whole number"):
        space.normalize({"n": 2.5, "c": "a"})
    with pytest.raises(ValueError, match="not one of"):
        space.normalize({"n": 2, "c": "z"})
    with pytest.raises(ValueError, match=r"missing \['c'\]"):
        space.normalize({"n": 2})
    with pytest.raises(ValueError, match="shape"):
        space.denormalize([0.0])
    with pytest.raises(ValueError, match="non-finite"):
        space.denormalize([0.0, math.nan])


def test_equality_ignores_source_and_is_type_aware():
    d = {"param_list": [{"name": "c", "type": "choice", "init_value": 1, "values": [1, 2]}]}
    assert SearchSpace.from_dict(d, source="a.yaml") == SearchSpace.from_dict(d, source="b.yaml")
    floats = {"param_list": [{"name": "c", "type": "choice", "init_value": 1.0, "values": [1.0, 2.0]}]}
    assert SearchSpace.from_dict(d) != SearchSpace.from_dict(floats)  # "--c=1" is not "--c=1.0"


def test_direct_construction_validates():
    with pytest.raises(SearchSpaceError, match=r"parameter 'lr': lower_than=0.0 must be greater"):
        FloatParam(name="lr", init_value=0.5, low=1.0, high=0.0)
    with pytest.raises(SearchSpaceError, match=r"params\[1\] \(a\): name='a' is already used by params\[0\]"):
        SearchSpace(params=[IntParam(name="a", init_value=1, low=0, high=2)] * 2)


# --- property tests: generated valid specs -------------------------------------------------

names = st.from_regex(r"[a-z][a-z0-9_]{0,8}", fullmatch=True)
finite = st.floats(min_value=-1e6, max_value=1e6, allow_nan=False, allow_infinity=False)
positive = st.floats(min_value=1e-8, max_value=1e6, allow_nan=False, allow_infinity=False)


@st.composite
def float_entries(draw):
    log = draw(st.booleans())
    lo, hi = sorted(draw(st.lists(positive if log else finite, min_size=2, max_size=2, unique=True)))
    init = draw(st.floats(min_value=lo, max_value=hi))
    entry = {"type": draw(st.sampled_from(["float", "FLOAT"])), "init_value": init,
             "greater_than": lo, "lower_than": hi}
    if log or draw(st.booleans()):
        entry["log"] = log
    return entry


@st.composite
def int_entries(draw):
    log = draw(st.booleans())
    lo = draw(st.integers(min_value=1 if log else -1000, max_value=1000))
    hi = draw(st.integers(min_value=lo + 1, max_value=lo + 5000))
    entry = {"type": "int", "init_value": draw(st.integers(min_value=lo, max_value=hi)),
             "greater_than": lo, "lower_than": hi}
    if log:
        entry["log"] = True
    return entry


scalars = st.one_of(st.text(min_size=1, max_size=6), st.integers(-100, 100), finite, st.booleans())


@st.composite
def choice_entries(draw):
    values = draw(st.lists(scalars, min_size=2, max_size=6,
                           unique_by=lambda v: (type(v).__name__ if isinstance(v, (bool, str)) else "n", v)))
    return {"type": "choice", "init_value": draw(st.sampled_from(values)), "values": values}


@st.composite
def space_dicts(draw):
    kinds = st.one_of(float_entries(), int_entries(), choice_entries())
    entries = draw(st.lists(kinds, min_size=1, max_size=5))
    param_names = draw(st.lists(names, min_size=len(entries), max_size=len(entries), unique=True))
    return {"param_list": [{"name": n, **e} for n, e in zip(param_names, entries)]}


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(space_dicts())
def test_generated_specs_parse_and_round_trip(d):
    space = SearchSpace.from_dict(d)
    assert space.names == tuple(e["name"] for e in d["param_list"])
    canonical = space.to_dict()
    assert json.loads(json.dumps(canonical)) == canonical  # plain JSON types only
    assert SearchSpace.from_dict(json.loads(json.dumps(canonical))) == space
    assert SearchSpace.from_dict(yaml.safe_load(yaml.safe_dump(canonical))) == space
    init = space.init_params()
    for entry, (name, value) in zip(d["param_list"], init.items()):
        assert value == entry["init_value"]


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(space_dicts(), st.data())
def test_normalize_denormalize_round_trip(d, data):
    space = SearchSpace.from_dict(d)
    for p in space.params:
        if isinstance(p, ChoiceParam):
            legal = list(p.values)
        elif isinstance(p, IntParam):
            legal = [p.low, p.high, p.init_value, data.draw(st.integers(p.low, p.high))]
        else:
            legal = [p.low, p.high, p.init_value, data.draw(st.floats(p.low, p.high))]
        for v in legal:
            x = p.normalize(v)
            assert -1.0 <= x <= 1.0
            back = p.denormalize(x)
            if isinstance(p, FloatParam):
                if p.log:
                    assert back == pytest.approx(v, rel=1e-9)
                else:
                    assert back == pytest.approx(v, rel=1e-9, abs=1e-9 * (p.high - p.low))
                assert type(back) is float
            else:  # ints (incl. both bounds) and choices come back exactly, with their type
                assert back == v and type(back) is type(v)


@settings(max_examples=100, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(space_dicts(), st.data())
def test_denormalize_always_legal(d, data):
    space = SearchSpace.from_dict(d)
    x = data.draw(st.lists(st.floats(-3, 3), min_size=space.dim, max_size=space.dim))
    params = space.denormalize(x)
    space.normalize(params)  # raises unless every value is legal
    for p in space.params:
        v = params[p.name]
        if isinstance(p, IntParam):
            assert type(v) is int and p.low <= v <= p.high
        elif isinstance(p, FloatParam):
            assert type(v) is float and p.low <= v <= p.high
        else:
            assert any(v is w for w in p.values)


# --- every validation error: one line naming the file, the entry, the field, the fix -----

OK = {"name": "lr", "type": "float", "init_value": 0.1, "greater_than": 0.0, "lower_than": 1.0}
INT = {"name": "batch_size", "type": "int", "init_value": 16, "greater_than": 8, "lower_than": 32}


def entry(**changes):
    base = dict(INT if changes.pop("int", False) else OK)
    for key, value in changes.items():
        if value is DROP:
            del base[key]
        else:
            base[key] = value
    return base


DROP = object()

ENTRY_ERRORS = [
    # (entries, index, name or None, regex for the field and fix)
    ([entry(), entry(name="batch_size", int=True, lower_than=8, greater_than=16)], 1, "batch_size",
     r"lower_than=8 must be greater than greater_than=16; swap the bounds"),
    ([entry(name=DROP)], 0, None, r"missing key 'name'; add name:"),
    ([entry(type=DROP)], 0, "lr", r"missing key 'type'; add type: float"),
    ([entry(init_value=DROP)], 0, "lr", r"missing key 'init_value'; add init_value:"),
    ([entry(greater_than=DROP)], 0, "lr", r"missing key 'greater_than'; add greater_than: <the lower bound>"),
    ([entry(lower_than=DROP)], 0, "lr", r"missing key 'lower_than'; add lower_than: <the upper bound>"),
    ([entry(lower_bound=1.0)], 0, "lr",
     r"unknown key 'lower_bound' for type float; allowed keys are name, type, init_value, greater_than, "
     r"lower_than, log"),
    ([entry(type="choice", values=["a", "b"], init_value="a")], 0, "lr",
     r"unknown key 'greater_than' for type choice; allowed keys are name, type, init_value, values"),
    ([entry(type="double")], 0, "lr", r"type='double' is not a known type; use one of float, int, choice"),
    ([entry(type=3)], 0, "lr", r"type=3 is not a known type"),
    ([entry(name=5)], 0, None, r"name=5 must be a string"),
    ([entry(log="yes")], 0, "lr", r"log='yes' must be true or false"),
    ([entry(init_value=[0.1])], 0, "lr", r"init_value=\[0.1\] must be a number, got a list"),
    ([entry(init_value=True)], 0, "lr", r"init_value=True must be a number, got a boolean"),
    ([entry(greater_than="abc")], 0, "lr", r"greater_than='abc' is not a number; write a number"),
    ([entry(lower_than=float("inf"))], 0, "lr", r"lower_than=inf is not finite; write a finite number"),
    ([entry(init_value=".nan")], 0, "lr", r"init_value='.nan' is not a number"),
    ([entry(init_value="nan")], 0, "lr", r"init_value='nan' is not finite"),
    ([entry(greater_than=0.5, lower_than=0.5, init_value=0.5)], 0, "lr",
     r"lower_than=0.5 must be greater than greater_than=0.5; widen the range"),
    ([entry(int=True, greater_than=16, lower_than=16, init_value=16)], 0, "batch_size",
     r"the int range \[greater_than=16, lower_than=16\] has fewer than 2 values; widen it"),
    ([entry(int=True, init_value=12.5)], 0, "batch_size",
     r"init_value=12.5 is not a whole number but type is int; use 12 or 13, or type: float"),
    ([entry(int=True, greater_than=7.5)], 0, "batch_size", r"greater_than=7.5 is not a whole number"),
    ([entry(init_value=2.0)], 0, "lr",
     r"init_value=2.0 is outside \[greater_than=0.0, lower_than=1.0\] \(inclusive\); pick a starting value"),
    ([entry(), entry(init_value=0.2)], 1, "lr", r"name='lr' is already used by param_list\[0\]; give each"),
    ([entry(name="-lr")], 0, None, r"name='-lr' cannot be a command-line flag; use letters, digits"),
    ([entry(name="learning rate")], 0, None, r"name='learning rate' cannot be a command-line flag"),
    ([entry(name="")], 0, None, r"name='' cannot be a command-line flag"),
    ([entry(name="model_path")], 0, None, r"name='model_path' is reserved"),
    ([entry(log=True)], 0, "lr", r"log: true needs greater_than > 0, got greater_than=0.0; use a positive"),
    ([entry(int=True, log=True, greater_than=-1)], 0, "batch_size", r"log: true needs greater_than > 0"),
    ([{"name": "c", "type": "choice", "init_value": "a", "values": "a b"}], 0, "c",
     r"values='a b' must be a list, e.g. values: \[adam, sgd\]"),
    ([{"name": "c", "type": "choice", "init_value": "a", "values": ["a"]}], 0, "c",
     r"values=\['a'\] needs at least 2 distinct values"),
    ([{"name": "c", "type": "choice", "init_value": "a", "values": ["a", "b", "a"]}], 0, "c",
     r"values\[2\]='a' repeats values\[0\]='a'; list each value once"),
    ([{"name": "c", "type": "choice", "init_value": "a", "values": ["a", {"b": 1}]}], 0, "c",
     r"values\[1\]=\{'b': 1\} must be a scalar"),
    ([{"name": "c", "type": "choice", "init_value": "z", "values": ["a", "b"]}], 0, "c",
     r"init_value='z' is not one of values=\['a', 'b'\]; pick one of the values"),
    ([{"name": "c", "type": "choice", "init_value": "a"}], 0, "c", r"missing key 'values'"),
    (["lr"], 0, None,
     r"must be a mapping with keys name, type, init_value, greater_than, lower_than; got a string"),
]


@pytest.mark.parametrize("entries, index, name, message", ENTRY_ERRORS)
def test_entry_errors_name_file_entry_field_and_fix(tmp_path, entries, index, name, message):
    path = write(tmp_path, yaml.safe_dump({"param_list": entries}))
    where = rf"param_list\[{index}\]" + (rf" \({name}\)" if name else "")
    with pytest.raises(SearchSpaceError, match=rf"^{re.escape(str(path))}: {where}: {message}") as info:
        SearchSpace.from_yaml(path)
    assert "\n" not in str(info.value)


FILE_ERRORS = [
    ("", r"is empty; write a mapping with the key param_list"),
    ("- a\n- b\n", r"the top level must be a mapping with the key param_list, got a list"),
    ("params: []\n", r"missing key 'param_list' \(found 'params'\); put the parameters under 'param_list:'"),
    ("param_list: []\nrounds: 3\n", r"unknown top-level key 'rounds'; the only allowed key is param_list"),
    ("param_list: {name: lr}\n", r"param_list must be a list of parameters"),
    ("param_list:\n", r"param_list must be a list of parameters .* got nothing \(null\)"),
    ("param_list: []\n", r"param_list is empty; add at least one parameter"),
    ("param_list:\n  - name: lr\n   type: float\n", r"line 3, column 4: invalid YAML \(.*\); fix the syntax"),
    ("param_list:\n  - {name: lr, type: float\n", r"line 3, column 1: invalid YAML"),
]


@pytest.mark.parametrize("text, message", FILE_ERRORS)
def test_file_errors(tmp_path, text, message):
    path = write(tmp_path, text)
    with pytest.raises(SearchSpaceError, match=rf"^{re.escape(str(path))}: {message}") as info:
        SearchSpace.from_yaml(path)
    assert "\n" not in str(info.value)


def test_missing_file(tmp_path):
    path = tmp_path / "nope.yaml"
    with pytest.raises(SearchSpaceError, match=rf"^{re.escape(str(path))}: file not found; check the path"):
        SearchSpace.from_yaml(tmp_path / "nope.yaml")


def test_directory_instead_of_file(tmp_path):
    with pytest.raises(SearchSpaceError, match=rf"^{re.escape(str(tmp_path))}: is a directory, not a file"):
        SearchSpace.from_yaml(tmp_path)


def test_not_utf8(tmp_path):
    path = tmp_path / "hparam.yaml"
    path.write_bytes(b"param_list:\n  - name: \xff\n")
    message = r"not UTF-8 text \(byte 22\); save the file as UTF-8"
    with pytest.raises(SearchSpaceError, match=rf"^{re.escape(str(path))}: {message}"):
        SearchSpace.from_yaml(path)


def test_unreadable_file(tmp_path, monkeypatch):
    path = write(tmp_path, ORIGINAL_YAML)
    path.chmod(0)
    if os.geteuid() == 0:  # root reads any file: make open() fail as it would for a user
        def refuse(*args, **kwargs):
            raise PermissionError(13, "Permission denied", str(path))
        monkeypatch.setattr(space_module, "open", refuse, raising=False)
    message = r"not readable \(permission denied\); fix its permissions"
    with pytest.raises(SearchSpaceError, match=rf"^{re.escape(str(path))}: {message}"):
        SearchSpace.from_yaml(path)


def test_from_dict_names_its_source():
    with pytest.raises(SearchSpaceError, match=r"^<dict>: param_list is empty"):
        SearchSpace.from_dict({"param_list": []})
    with pytest.raises(SearchSpaceError, match=r"^bench:branin: param_list is empty"):
        SearchSpace.from_dict({"param_list": []}, source="bench:branin")
