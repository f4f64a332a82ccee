"""A tripwire for a cmaes upgrade: the private layout HAZero's state codec and backends rely on.

cmaes has no public state API, so ``tuners/_cmaes_codec.py`` writes every private attribute of
its optimizers to the tuner state, and ``tuners/_hazero_backends.py`` reads a few of them by
name. Both were written for cmaes 0.13.1, the pinned version (0.13.0 already laid CMAwM out
differently). These tests record that layout and fail, naming the installed cmaes version and
the attribute, when another version lays it out otherwise. After such a failure: read the new
version's ``CMA``, ``CMAwM`` and ``CatCMAwM``, adapt the codec and the backends, then update the
tables below and the cmaes pin in pyproject.toml (saved states of the old layout are refused).
"""

from __future__ import annotations

import inspect
import json
import math

import cmaes
import numpy as np
import pytest
from cmaes import CMA, CatCMAwM, CMAwM

from tuners import SearchSpace, make_tuner
from tuners import _cmaes_codec as codec

CMAES = getattr(cmaes, "__version__", "?")
FIX = ("tuners/_cmaes_codec.py and tuners/_hazero_backends.py were written for cmaes 0.13.1: adapt them "
       "to this version, then this file's tables and the cmaes pin in pyproject.toml")

# --- the layout of cmaes 0.13.1: every instance attribute, by the axes the space has -------

CMA_ATTRIBUTES = frozenset({
    "_B", "_C", "_D", "_ESigma", "_Emean", "_VSigma", "_Vmean", "_alpha", "_beta_Sigma", "_beta_mean",
    "_bounds", "_c1", "_c_sigma", "_cc", "_chi_n", "_cm", "_cmu", "_d_sigma", "_eta_Sigma", "_eta_mean",
    "_funhist_term", "_funhist_values", "_g", "_gamma", "_lr_adapt", "_mean", "_mu", "_mu_eff", "_n_dim",
    "_n_max_resampling", "_p_sigma", "_pc", "_popsize", "_rng", "_sigma", "_tolconditioncov", "_tolfun",
    "_tolx", "_tolxup", "_weights"})
CMAWM_ATTRIBUTES = frozenset({
    "_cma", "_continuous_idx", "_continuous_space", "_discrete_idx", "_discrete_space_low",
    "_discrete_space_size", "_discrete_space_step", "_n_max_resampling", "_n_zdim"})
CMAWM_DISCRETE_ATTRIBUTES = frozenset({"_A", "m_z_lim_low", "m_z_lim_up", "margin"})  # with int axes
CATCMAWM_ATTRIBUTES = frozenset({
    "_Delta", "_Delta_max", "_K", "_Kmax", "_Nca", "_Nco", "_Nin", "_Nmi", "_alpha_snr", "_c1", "_cmu",
    "_continuous_idx", "_delta", "_delta_init", "_discrete_idx", "_eps", "_g", "_gamma", "_mu", "_mu_eff",
    "_param_sum", "_popsize", "_q", "_qmin", "_rng", "_s", "_use_categorical", "_use_continuous",
    "_use_gaussian", "_use_integer", "_weights"})
CATCMAWM_GAUSSIAN_ATTRIBUTES = frozenset({  # with float or int axes
    "_A", "_B", "_C", "_D", "_c_sigma", "_cc", "_chi_n", "_cm", "_d_sigma", "_funhist_term",
    "_funhist_values", "_iqhist_term", "_iqhist_values", "_mean", "_min_eigenvalue", "_p_sigma", "_pc",
    "_sigma", "_tolconditioncov", "_tolfun", "_tolx", "_tolxup"})
CATCMAWM_CONTINUOUS_ATTRIBUTES = frozenset({"_x_space"})  # with float axes
CATCMAWM_INTEGER_ATTRIBUTES = frozenset({"_alpha", "_int_succ", "_pmut", "_z_lim", "_z_space"})  # with int axes

_F = {"name": "f", "type": "float", "init_value": 0.5, "greater_than": 0.0, "lower_than": 1.0}
_I = {"name": "i", "type": "int", "init_value": 3, "greater_than": 1, "lower_than": 9}
_L = {"name": "l", "type": "int", "log": True, "init_value": 8, "greater_than": 2, "lower_than": 512}
_C = {"name": "c", "type": "choice", "init_value": "a", "values": ["a", "b", "c"]}
_D = {"name": "d", "type": "choice", "init_value": 1, "values": [1, 2, 3, 4, 5]}

# (space, CMA-ES class, expected attributes of the optimizer); n floats, m ints, k choices
LAYOUTS = {
    "cmawm-floats": ([_F], CMAwM, CMAWM_ATTRIBUTES),
    "cmawm-floats-ints": ([_F, _I, _L], CMAwM, CMAWM_ATTRIBUTES | CMAWM_DISCRETE_ATTRIBUTES),
    "catcmawm-choices": ([_C, _D], CatCMAwM, CATCMAWM_ATTRIBUTES),
    "catcmawm-floats-choices": ([_F, _L, _C], CatCMAwM,
                                CATCMAWM_ATTRIBUTES | CATCMAWM_GAUSSIAN_ATTRIBUTES
                                | CATCMAWM_CONTINUOUS_ATTRIBUTES),
    "catcmawm-ints-choices": ([_I, _C], CatCMAwM,
                              CATCMAWM_ATTRIBUTES | CATCMAWM_GAUSSIAN_ATTRIBUTES | CATCMAWM_INTEGER_ATTRIBUTES),
    "catcmawm-all": ([_F, _I, _C, _D], CatCMAwM,
                     CATCMAWM_ATTRIBUTES | CATCMAWM_GAUSSIAN_ATTRIBUTES | CATCMAWM_CONTINUOUS_ATTRIBUTES
                     | CATCMAWM_INTEGER_ATTRIBUTES),
}


def _space(params) -> SearchSpace:
    return SearchSpace.from_dict({"param_list": params}, source="layout")


def _score(params: dict) -> float:
    return -sum((float(v) if not isinstance(v, str) else "abc".index(v)) ** 2 for v in params.values())


def _run(key: str, rounds: int = 4):
    """A HAZero on the layout's space after ``rounds`` rounds (B, D, histories filled)."""
    params, _, _ = LAYOUTS[key]
    tuner = make_tuner("hazero", _space(params), popsize=5, seed=0)
    for _ in range(rounds):
        candidates = tuner.ask()
        tuner.tell([_score(c) for c in candidates])
    return tuner


def _layout_failure(owner: str, key: str, actual: set[str], expected: frozenset[str]) -> str | None:
    new, gone = sorted(actual - expected), sorted(expected - actual)
    if not new and not gone:
        return None
    return (f"cmaes {CMAES} lays {owner} out otherwise than cmaes 0.13.1 ({key}): new attributes {new}, "
            f"gone {gone}; the codec writes every attribute to the state; {FIX}")


@pytest.mark.parametrize("key", LAYOUTS)
def test_cmaes_attributes_are_the_ones_the_codec_was_written_for(key):
    _, kind, expected = LAYOUTS[key]
    optimizer = _run(key)._backend.optimizer
    assert isinstance(optimizer, kind)
    failures = [_layout_failure(type(optimizer).__name__, key, set(vars(optimizer)), expected)]
    if kind is CMAwM:
        failures.append(_layout_failure("CMA (CMAwM._cma)", key, set(vars(optimizer._cma)), CMA_ATTRIBUTES))
    failures = [f for f in failures if f]
    if failures:
        pytest.fail("\n".join(failures))


def _check(obj, owner: str, name: str, kind, shape: tuple[int, ...] | None = None) -> None:
    """Fail, naming the cmaes version and the attribute, unless obj.name is a ``kind`` (of ``shape``)."""
    if name not in vars(obj):
        pytest.fail(f"cmaes {CMAES}: {owner}.{name} is gone; {FIX}")
    value = vars(obj)[name]
    if not isinstance(value, kind):
        pytest.fail(f"cmaes {CMAES}: {owner}.{name} is a {type(value).__name__}, not a {kind}; {FIX}")
    if shape is not None and value.shape != shape:
        pytest.fail(f"cmaes {CMAES}: {owner}.{name} has shape {value.shape}, not {shape}; {FIX}")


_REAL = (float, np.floating)
_INT = (int, np.integer)


def test_cma_with_margin_attributes_read_by_name():
    # CMAwM over a float, an int and a log-scale int: n = 3, λ = 5
    optimizer = _run("cmawm-floats-ints")._backend.optimizer
    _check(optimizer, "CMAwM", "_cma", CMA)
    cma, n = optimizer._cma, 3
    for name, kind, shape in [("_mean", np.ndarray, (n,)), ("_C", np.ndarray, (n, n)),
                              ("_p_sigma", np.ndarray, (n,)), ("_pc", np.ndarray, (n,)),
                              ("_sigma", _REAL, None), ("_popsize", _INT, None), ("_n_dim", _INT, None),
                              ("_rng", np.random.RandomState, None), ("_funhist_values", np.ndarray, None)]:
        _check(cma, "CMA", name, kind, shape)
    assert (cma._popsize, cma._n_dim) == (5, n)
    assert callable(optimizer.should_stop)


def test_cat_cma_with_margin_attributes_read_by_name():
    # CatCMAwM over a float, an int, and choices of 3 and 5 values: 2 Gaussian axes, q of shape (2, 5)
    optimizer = _run("catcmawm-all")._backend.optimizer
    m = 2
    for name, kind, shape in [("_q", np.ndarray, (2, 5)), ("_mean", np.ndarray, (m,)),
                              ("_C", np.ndarray, (m, m)), ("_p_sigma", np.ndarray, (m,)),
                              ("_pc", np.ndarray, (m,)), ("_A", np.ndarray, (m,)),
                              ("_sigma", _REAL, None), ("_popsize", _INT, None), ("_Nmi", _INT, None),
                              ("_Nca", _INT, None), ("_rng", np.random.RandomState, None),
                              ("_funhist_values", np.ndarray, None), ("_iqhist_values", list, None),
                              ("_z_space", np.ndarray, None), ("_z_lim", np.ndarray, None)]:
        _check(optimizer, "CatCMAwM", name, kind, shape)
    assert (optimizer._popsize, optimizer._Nmi, optimizer._Nca) == (5, m, 2)
    assert codec.CAT_DERIVED <= set(vars(optimizer)), \
        f"cmaes {CMAES}: CatCMAwM lacks some of {sorted(codec.CAT_DERIVED)}; {FIX}"
    # what the backend reads of a sample and builds to tell one
    sample = optimizer.ask()
    for field in ("x", "z", "c", "_v_raw"):
        assert hasattr(sample, field), f"cmaes {CMAES}: a CatCMAwM sample has no {field!r}; {FIX}"
    assert sample.c.shape == (2, 5) and sample._v_raw.shape == (m,)
    CatCMAwM.Solution(c=sample.c, _v_raw=sample._v_raw)
    # HAZero's CatCMAwM overrides this method (no box penalty before the score scale is known)
    parameters = list(inspect.signature(CatCMAwM._calc_continuous_penalty).parameters)
    assert parameters == ["self", "v_raw", "sorted_fvals"], \
        f"cmaes {CMAES}: CatCMAwM._calc_continuous_penalty{parameters} changed; {FIX}"


@pytest.mark.parametrize("key", LAYOUTS)
def test_no_saved_attribute_is_a_class_descriptor(key):
    # the codec restores attributes with setattr: a property of the same name would swallow it
    optimizer = _run(key, rounds=1)._backend.optimizer
    objects = [optimizer] + ([optimizer._cma] if isinstance(optimizer, CMAwM) else [])
    for obj in objects:
        for name in vars(obj):
            static = inspect.getattr_static(type(obj), name, None)
            assert not hasattr(static, "__set__") and not isinstance(static, property), \
                f"cmaes {CMAES}: {type(obj).__name__}.{name} is also a class descriptor; {FIX}"


def _same(a, b) -> bool:
    """Equal in type, dtype, shape and every value (nan equal to nan)."""
    if type(a) is not type(b):
        return False
    if isinstance(a, np.ndarray):
        return (a.dtype == b.dtype and a.shape == b.shape
                and bool(np.array_equal(a, b, equal_nan=a.dtype.kind in "fc")))
    if isinstance(a, list):
        return len(a) == len(b) and all(_same(x, y) for x, y in zip(a, b))
    if isinstance(a, (float, np.floating)) and math.isnan(a):
        return math.isnan(b)
    if isinstance(a, np.random.RandomState):
        sa, sb = a.get_state(legacy=False), b.get_state(legacy=False)
        return (np.array_equal(sa["state"]["key"], sb["state"]["key"])
                and sa["state"]["pos"] == sb["state"]["pos"]
                and sa["has_gauss"] == sb["has_gauss"] and sa["gauss"] == sb["gauss"])
    if isinstance(a, CMA):
        return vars(a).keys() == vars(b).keys() and all(_same(v, vars(b)[k]) for k, v in vars(a).items())
    return a == b


@pytest.mark.parametrize("key", LAYOUTS)
def test_every_attribute_round_trips_through_the_json_state(key):
    tuner = _run(key)
    tuner.ask()  # mid-round, as the pipeline saves it
    params, _, _ = LAYOUTS[key]
    fresh = make_tuner("hazero", _space(params), popsize=5, seed=99)
    fresh.load_state_dict(json.loads(json.dumps(tuner.state_dict(), allow_nan=False)))
    saved, loaded = tuner._backend.optimizer, fresh._backend.optimizer
    differ = [name for name, value in vars(saved).items() if not _same(value, vars(loaded).get(name))]
    assert not differ, f"cmaes {CMAES}: {type(saved).__name__} attributes {differ} do not round-trip; {FIX}"
    assert vars(saved).keys() == vars(loaded).keys()
    for _ in range(3):  # and the search continues bit-identically
        scores = [_score(c) for c in tuner.pending]
        tuner.tell(scores)
        fresh.tell(scores)
        assert tuner.ask() == fresh.ask()
    assert json.dumps(tuner.state_dict()) == json.dumps(fresh.state_dict())
