"""The state of a `cmaes` optimizer (CMAwM, CatCMAwM) to and from JSON, exactly.

cmaes has no public state API: an optimizer is a plain object whose private attributes are
its whole state (a pickle would drop its RNG). This codec writes those attributes one by one
as JSON, keeping each numpy value's dtype, so that an optimizer loaded from the JSON samples
and updates bit-identically to the one saved.

Which private attributes it reads and writes, for cmaes 0.13.1 (the version pinned; 0.13.0
already laid CMAwM out differently: ``z_space``, ``z_lim`` where 0.13.1 has
``_discrete_space_low``, ``_discrete_space_size``, ``_discrete_space_step``, so even a patch
release can move them; ``tests/test_tuners_cmaes_layout.py`` fails, naming the version and the
attribute, when the installed cmaes lays them out otherwise):

- ``CMAwM``: every instance attribute but ``_cma``; of the inner ``CMA`` in ``_cma``, every
  instance attribute but ``_rng``; and ``_cma._rng``, a legacy ``numpy.random.RandomState``
  (MT19937), as its ``get_state()``. Read by name to check a loaded state: ``_cma._mean``,
  ``_cma._C``, ``_cma._p_sigma``, ``_cma._pc`` (their shapes), ``_cma._popsize``,
  ``_cma._n_dim``.
- ``CatCMAwM``: every instance attribute but ``_rng``, ``_z_space`` and ``_z_lim`` (fixed
  tables of the integer values, rebuilt from the search space); and ``_rng`` as above. Read
  by name to check a loaded state: ``_q``, and, when the space has float or int axes,
  ``_mean``, ``_C``, ``_p_sigma``, ``_pc``, ``_A`` (their shapes), ``_popsize``, ``_Nmi``,
  ``_Nca``.

A state is loaded into a *reference* optimizer that the caller builds for the same space
and population: the attributes the reference has are exactly the ones the state must hold
(their set depends on the space, e.g. CMAwM has ``margin`` only with integer axes), so a state
written by a cmaes with another layout, or a corrupt one, is refused naming the attributes
missing or unexpected; the reference is set only once the names, shapes and sizes check.

Values: numpy arrays as ``{"ndarray": dtype, "shape": [...], "data": [...]}``, numpy
scalars as ``{"numpy": dtype, "value": v}``, lists as ``{"list": [...]}``, non-finite floats
(CatCMAwM's Δ_max = inf) as the strings "inf", "-inf", "nan"; None, bools, ints, finite
floats and strings as themselves. Python floats round-trip through JSON exactly.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from typing import Any

import cmaes
import numpy as np

from tuners._base import TunerStateError, _check_keys, _get, _matrix

__all__ = ["CMAES_VERSION", "CAT_DERIVED", "dump_cma_with_margin", "load_cma_with_margin",
           "dump_cat_cma_with_margin", "load_cat_cma_with_margin"]

CMAES_VERSION: str | None = getattr(cmaes, "__version__", None)
# CatCMAwM attributes left out of the state: its RNG (written apart) and value tables the space rebuilds.
CAT_DERIVED = frozenset({"_rng", "_z_space", "_z_lim"})
# The keys of a legacy RandomState as written by _rng_to_json, and of its "state".
_RNG_KEYS = ("bit_generator", "state", "has_gauss", "gauss")
_MT19937_KEYS = ("key", "pos")


# --- CMAwM ---------------------------------------------------------------------------------


def dump_cma_with_margin(optimizer: Any) -> dict[str, Any]:
    """A CMAwM as JSON: its own attributes, its inner CMA's, and the inner CMA's RNG."""
    return {
        "cma_with_margin": {k: _encode(v) for k, v in vars(optimizer).items() if k != "_cma"},
        "cma": {k: _encode(v) for k, v in vars(optimizer._cma).items() if k != "_rng"},
        "rng": _rng_to_json(optimizer._cma._rng),
    }


def load_cma_with_margin(reference: Any, d: Any, *, n_dim: int, popsize: int) -> Any:
    """``reference`` (a CMAwM built for the same space and λ) set to the state ``d``; returned.

    Raises TunerStateError for another attribute layout or a missing or unknown key, ValueError
    or KeyError for a corrupt value; ``reference`` is then to be dropped.
    """
    _check_keys(d, ("cma_with_margin", "cma", "rng"), "the CMA-ES state")
    wm = {k: _decode(v) for k, v in _mapping(_get(d, "cma_with_margin"), "cma_with_margin").items()}
    cma = {k: _decode(v) for k, v in _mapping(_get(d, "cma"), "cma").items()}
    _check_layout("CMA-ES", {"CMAwM": (wm, set(vars(reference)) - {"_cma"}),
                             "CMA": (cma, set(vars(reference._cma)) - {"_rng"})})
    for key, shape in (("_mean", (n_dim,)), ("_C", (n_dim, n_dim)), ("_p_sigma", (n_dim,)), ("_pc", (n_dim,))):
        _matrix(cma[key], key, shape)
    if cma["_popsize"] != popsize or cma["_n_dim"] != n_dim:
        raise ValueError(f"CMA-ES has λ={cma['_popsize']!r}, n={cma['_n_dim']!r}; expected {popsize}, {n_dim}")
    _rng_from_json(reference._cma._rng, _get(d, "rng"))
    _set_attributes(reference, wm)
    _set_attributes(reference._cma, cma)
    return reference


# --- CatCMAwM ------------------------------------------------------------------------------


def dump_cat_cma_with_margin(optimizer: Any) -> dict[str, Any]:
    """A CatCMAwM as JSON: its attributes but the derived tables, and its RNG."""
    return {
        "cat_cma_with_margin": {k: _encode(v) for k, v in vars(optimizer).items() if k not in CAT_DERIVED},
        "rng": _rng_to_json(optimizer._rng),
    }


def load_cat_cma_with_margin(reference: Any, d: Any, *, n_numeric: int, q_shape: tuple[int, int],
                             popsize: int) -> Any:
    """``reference`` (a CatCMAwM built for the same space and λ) set to the state ``d``; returned.

    ``n_numeric`` counts the float and int axes (the Gaussian's), ``q_shape`` is (choices, most
    values of a choice). The value tables (``_z_space``, ``_z_lim``) stay the reference's.
    Errors as :func:`load_cma_with_margin`.
    """
    _check_keys(d, ("cat_cma_with_margin", "rng"), "the CatCMA state")
    attrs = {k: _decode(v) for k, v in _mapping(_get(d, "cat_cma_with_margin"), "cat_cma_with_margin").items()}
    _check_layout("CatCMA", {"CatCMAwM": (attrs, set(vars(reference)) - CAT_DERIVED)})
    m, n_choice = n_numeric, q_shape[0]
    shapes = [("_q", q_shape)]
    if m:
        shapes += [("_mean", (m,)), ("_C", (m, m)), ("_p_sigma", (m,)), ("_pc", (m,)), ("_A", (m,))]
    for key, shape in shapes:
        _matrix(attrs[key], key, shape)
    if attrs["_popsize"] != popsize or (attrs["_Nmi"], attrs["_Nca"]) != (m, n_choice):
        raise ValueError(f"CatCMA has λ={attrs['_popsize']!r}, {attrs['_Nmi']!r} numeric and "
                         f"{attrs['_Nca']!r} choice axes; expected {popsize}, {m}, {n_choice}")
    _rng_from_json(reference._rng, _get(d, "rng"))
    _set_attributes(reference, attrs)
    return reference


# --- helpers -------------------------------------------------------------------------------


def _check_layout(what: str, parts: dict[str, tuple[dict[str, Any], set[str]]]) -> None:
    """Refuse saved attributes that are not exactly the reference's, naming those that differ."""
    missing, unexpected = [], []
    for owner, (saved, expected) in parts.items():
        missing += [f"{owner}.{k}" for k in sorted(expected - set(saved))]
        unexpected += [f"{owner}.{k}" for k in sorted(set(saved) - expected)]
    if missing or unexpected:
        raise TunerStateError(
            f"the {what} state does not fit cmaes {CMAES_VERSION or '?'}: attributes missing {missing}, "
            f"unexpected {unexpected}; it was written by another cmaes version, or it is corrupt")


def _set_attributes(obj: Any, attrs: dict[str, Any]) -> None:
    # every key was checked against the reference's own attributes by _check_layout
    for key, value in attrs.items():
        setattr(obj, key, value)


def _mapping(v: Any, what: str) -> Mapping[str, Any]:
    if not isinstance(v, Mapping):
        raise TunerStateError(f"corrupt tuner state: {what} must be a mapping, got {type(v).__name__}")
    return v


def _rng_to_json(rng: np.random.RandomState) -> dict[str, Any]:
    """cmaes's legacy RandomState (MT19937) as JSON."""
    state = rng.get_state(legacy=False)
    return {"bit_generator": state["bit_generator"],
            "state": {"key": state["state"]["key"].tolist(), "pos": int(state["state"]["pos"])},
            "has_gauss": int(state["has_gauss"]), "gauss": float(state["gauss"])}


def _rng_from_json(rng: np.random.RandomState, d: Any) -> None:
    _check_keys(d, _RNG_KEYS, "the CMA-ES rng")
    _check_keys(d["state"], _MT19937_KEYS, "the CMA-ES rng's state")
    state = dict(d)
    state["state"] = {"key": np.array(d["state"]["key"], dtype=np.uint32), "pos": int(d["state"]["pos"])}
    rng.set_state(state)


def _encode(v: Any) -> Any:
    """A cmaes attribute as JSON: arrays and numpy scalars keep their dtype, so they come back exact.

    Non-finite floats (CatCMAwM's Δ_max = inf) are written as the strings "inf", "-inf", "nan".
    """
    if v is None or isinstance(v, (bool, str)):
        return v
    if isinstance(v, np.ndarray):
        data = v.ravel().tolist()
        if v.dtype.kind in "fc" and not np.all(np.isfinite(v)):
            data = [_json_float(x) for x in data]
        return {"ndarray": v.dtype.str, "shape": list(v.shape), "data": data}
    if isinstance(v, np.generic):
        value = v.item()
        return {"numpy": v.dtype.str, "value": _json_float(value) if isinstance(value, float) else value}
    if isinstance(v, float):
        return v if math.isfinite(v) else {"float": _json_float(v)}
    if isinstance(v, int):
        return v
    if isinstance(v, list):
        return {"list": [_encode(x) for x in v]}
    raise TypeError(f"cannot write a {type(v).__name__} of the CMA-ES state to JSON")


def _json_float(x: float) -> float | str:
    return x if math.isfinite(x) else repr(float(x))  # 'inf', '-inf', 'nan': float() reads them back


def _decode(v: Any) -> Any:
    if isinstance(v, dict):
        if "ndarray" in v:
            return np.array(v["data"], dtype=np.dtype(v["ndarray"])).reshape(v["shape"])
        if "numpy" in v:
            return np.dtype(v["numpy"]).type(v["value"])
        if "float" in v:
            return float(v["float"])
        if "list" in v:
            return [_decode(x) for x in v["list"]]
        raise ValueError(f"unknown encoded value {sorted(v)!r}")
    if isinstance(v, list):
        raise ValueError("a bare list in the CMA-ES state")
    return v
