"""The search space: hparam.yaml, its validation, and the normalized box [-1, 1]^n.

The file format is PaddleHub AutoDL Finetuner's, extended compatibly::

    param_list:
      - name: learning_rate      # becomes --learning_rate=<value> on train.py's command line
        init_value: 0.001        # where the search starts (the first candidate is exactly this)
        type: float              # float | int | choice   (case-insensitive)
        greater_than: 0.00005    # lower bound, inclusive
        lower_than: 0.05         # upper bound, inclusive
        log: true                # optional extension: search the value's logarithm uniformly
      - name: optimizer          # extension: a categorical parameter
        type: choice
        init_value: adam
        values: [adam, sgd, rmsprop]

Every file the original read correctly means the same thing here: the same parameters, the
same bounds, the same ``--name=value`` flags. Numbers may be ints, floats or numeric strings
(YAML 1.1 reads ``1e-3``, with no dot, as a *string*; we read it with ``float()``), and
``type`` is case-insensitive. What the original silently misread (it clamped an init_value
outside the bounds, ignored unknown keys, took any type other than ``int`` for a float, and
searched nonsense for swapped bounds) we refuse with a one-line :class:`SearchSpaceError` that
names the file, the entry, the field and the fix, e.g. (one line, wrapped here)::

    hparam.yaml: param_list[1] (batch_size): lower_than=8 must be greater than greater_than=16;
    swap the bounds

The tuners search in the normalized box [-1, 1]^n, as the original did. For a parameter with
bounds [lo, hi] (``greater_than``, ``lower_than``) the maps are

    linear:  x = 2 (v - lo) / (hi - lo) - 1                 v = lo + (x + 1) / 2 · (hi - lo)
    log:     x = 2 (ln v - ln lo) / (ln hi - ln lo) - 1     v = exp(ln lo + (x + 1) / 2 · (ln hi - ln lo))
    choice:  k values, the box split into k equal bins;     value i ↔ bin centre x = -1 + (2i + 1) / k

``denormalize`` clips x to the box first. Ints are *rounded* to the nearest value (the
original truncated, so its upper bound was reachable only at x = 1 exactly).
"""

from __future__ import annotations

import math
import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from os import PathLike
from typing import Any, ClassVar, Union

import numpy as np
import yaml

__all__ = ["SearchSpace", "SearchSpaceError", "FloatParam", "IntParam", "ChoiceParam", "Param"]


class SearchSpaceError(ValueError):
    """An invalid search space. The message is one line: file, entry, field, fix."""


class _FieldError(Exception):
    """A problem with one field of one entry; the caller adds where it is."""


# Letters, digits, '_' and '-', not starting with '-': a name that `--<name>=<value>` passes
# through argparse and a shell unchanged.
_NAME_RE = re.compile(r"[A-Za-z0-9_][A-Za-z0-9_-]*\Z")
# Flags the pipeline itself passes to train.py (see DESIGN.md: train.py contract).
_RESERVED_NAMES = frozenset({"saved_params_dir", "model_path"})
_KINDS = ("float", "int", "choice")
_NUMERIC_KEYS = ("name", "type", "init_value", "greater_than", "lower_than", "log")
_CHOICE_KEYS = ("name", "type", "init_value", "values")
_KEY_HINTS = {
    "name": "name: <flag name>",
    "type": "type: float (or int, choice)",
    "init_value": "init_value: <the starting value>",
    "greater_than": "greater_than: <the lower bound>",
    "lower_than": "lower_than: <the upper bound>",
    "values": "values: [a, b, ...]",
}


# --- parameter kinds -----------------------------------------------------------------


@dataclass(frozen=True)
class FloatParam:
    """A real-valued parameter on [low, high] (``greater_than``, ``lower_than``), both inclusive."""

    kind: ClassVar[str] = "float"
    name: str
    init_value: float
    low: float  # greater_than in hparam.yaml
    high: float  # lower_than in hparam.yaml
    log: bool = False  # search ln(value) uniformly instead of value; needs low > 0

    def __post_init__(self) -> None:
        _validated(self.name, lambda: _check_numeric(self.init_value, self.low, self.high, self.log,
                                                     integral=False))
        for field in ("init_value", "low", "high"):  # canonical: 1 -> 1.0, np.float64 -> float
            object.__setattr__(self, field, float(getattr(self, field)))

    @property
    def step(self) -> float | None:
        """Distance between neighbouring values in the box; None: continuous."""
        return None

    @property
    def grid_bounds(self) -> tuple[float, float]:
        """Normalized positions of the first and last value."""
        return (-1.0, 1.0)

    def normalize(self, value: Any) -> float:
        v = _real(self.name, value)
        _check_in_bounds(self, v)
        if self.log:
            x = 2.0 * (math.log(v) - math.log(self.low)) / (math.log(self.high) - math.log(self.low)) - 1.0
        else:
            x = 2.0 * (v - self.low) / (self.high - self.low) - 1.0
        return min(max(x, -1.0), 1.0)

    def denormalize(self, x: float) -> float:
        t = (min(max(float(x), -1.0), 1.0) + 1.0) / 2.0
        if t <= 0.0 or t >= 1.0:  # the bounds exactly (exp(ln lo) need not be lo)
            return self.low if t <= 0.0 else self.high
        if self.log:
            lo, hi = math.log(self.low), math.log(self.high)
            v = math.exp((1.0 - t) * lo + t * hi)
        else:
            v = (1.0 - t) * self.low + t * self.high
        return min(max(v, self.low), self.high)

    def format(self, value: Any) -> str:
        v = _real(self.name, value)
        return repr(v)  # repr round-trips: float(repr(v)) == v

    def to_dict(self) -> dict[str, Any]:
        d: dict[str, Any] = {"name": self.name, "type": "float", "init_value": self.init_value,
                             "greater_than": self.low, "lower_than": self.high}
        if self.log:
            d["log"] = True
        return d


@dataclass(frozen=True)
class IntParam:
    """An integer parameter on [low, high] (``greater_than``, ``lower_than``), both inclusive.

    Values are rounded to the nearest integer, so each interior value owns a bin of width
    ``step`` in the box and both bounds are reachable.
    """

    kind: ClassVar[str] = "int"
    name: str
    init_value: int
    low: int  # greater_than in hparam.yaml
    high: int  # lower_than in hparam.yaml
    log: bool = False  # search ln(value) uniformly; needs low >= 1

    def __post_init__(self) -> None:
        _validated(self.name, lambda: _check_numeric(self.init_value, self.low, self.high, self.log,
                                                     integral=True))
        for field in ("init_value", "low", "high"):  # canonical: np.int64 -> int
            object.__setattr__(self, field, int(getattr(self, field)))

    @property
    def step(self) -> float | None:
        """Distance between neighbouring values in the box; None for log scale (uneven spacing)."""
        return None if self.log else 2.0 / (self.high - self.low)

    @property
    def grid_bounds(self) -> tuple[float, float]:
        """Normalized positions of the first and last value."""
        return (-1.0, 1.0)

    def normalize(self, value: Any) -> float:
        v = _integral(self.name, value)
        _check_in_bounds(self, v)
        if self.log:
            x = 2.0 * (math.log(v) - math.log(self.low)) / (math.log(self.high) - math.log(self.low)) - 1.0
        else:
            x = 2.0 * (v - self.low) / (self.high - self.low) - 1.0
        return min(max(x, -1.0), 1.0)

    def denormalize(self, x: float) -> int:
        t = (min(max(float(x), -1.0), 1.0) + 1.0) / 2.0
        if self.log:
            lo, hi = math.log(self.low), math.log(self.high)
            v = math.exp((1.0 - t) * lo + t * hi)
        else:
            v = (1.0 - t) * self.low + t * self.high
        return min(max(math.floor(v + 0.5), self.low), self.high)  # round half up, stay in bounds

    def format(self, value: Any) -> str:
        return str(_integral(self.name, value))

    def to_dict(self) -> dict[str, Any]:
        d: dict[str, Any] = {"name": self.name, "type": "int", "init_value": self.init_value,
                             "greater_than": self.low, "lower_than": self.high}
        if self.log:
            d["log"] = True
        return d


@dataclass(frozen=True, eq=False)
class ChoiceParam:
    """A categorical parameter: one of ``values`` (str, int, float or bool scalars).

    The box is split into ``len(values)`` equal bins; value i sits at its bin's centre.
    Equality is type-aware (``1``, ``1.0`` and ``True`` are different values on a command line).
    """

    kind: ClassVar[str] = "choice"
    name: str
    init_value: Any
    values: tuple[Any, ...]

    def __post_init__(self) -> None:
        values = self.values
        if isinstance(values, Sequence) and not isinstance(values, str):
            object.__setattr__(self, "values", tuple(values))
        _validated(self.name, lambda: _check_choice(self.init_value, self.values))
        # canonical: the listed object itself (init 1.0 for values [1, 2] -> 1)
        object.__setattr__(self, "init_value", self.values[self.index(self.init_value)])

    def _key(self) -> tuple[Any, ...]:
        return (self.name, _typed(self.init_value), tuple(_typed(v) for v in self.values))

    def __eq__(self, other: object) -> bool:
        if not isinstance(other, ChoiceParam):
            return NotImplemented
        return self._key() == other._key()

    def __hash__(self) -> int:
        return hash(self._key())

    @property
    def step(self) -> float:
        """Distance between neighbouring bin centres in the box."""
        return 2.0 / len(self.values)

    @property
    def grid_bounds(self) -> tuple[float, float]:
        """Normalized positions of the first and last bin centre."""
        k = len(self.values)
        return (-1.0 + 1.0 / k, 1.0 - 1.0 / k)

    def index(self, value: Any) -> int:
        for i, v in enumerate(self.values):
            if _same_scalar(v, value):
                return i
        raise ValueError(f"{self.name}: {value!r} is not one of {list(self.values)!r}")

    def normalize(self, value: Any) -> float:
        return -1.0 + (2 * self.index(value) + 1) / len(self.values)

    def denormalize(self, x: float) -> Any:
        k = len(self.values)
        t = (min(max(float(x), -1.0), 1.0) + 1.0) / 2.0
        return self.values[min(int(t * k), k - 1)]

    def format(self, value: Any) -> str:
        return _format_scalar(self.values[self.index(value)])

    def to_dict(self) -> dict[str, Any]:
        return {"name": self.name, "type": "choice", "init_value": self.init_value,
                "values": list(self.values)}


Param = Union[FloatParam, IntParam, ChoiceParam]


# --- the space -----------------------------------------------------------------------


class SearchSpace:
    """The parameters to search, in file order, and the maps to and from the box [-1, 1]^n.

    Build one with :meth:`from_yaml` or :meth:`from_dict`; ``SearchSpace(params=...)`` takes
    already-built parameters. Equality compares the parameters, not where they came from.
    """

    def __init__(self, *, params: Sequence[Param], source: str = "<params>") -> None:
        params = tuple(params)
        if not params:
            raise SearchSpaceError(f"{source}: no parameters; a search space needs at least one")
        seen: dict[str, int] = {}
        for i, p in enumerate(params):
            if not isinstance(p, (FloatParam, IntParam, ChoiceParam)):
                raise SearchSpaceError(f"{source}: params[{i}]={p!r} is not a FloatParam, IntParam "
                                       "or ChoiceParam")
            if p.name in seen:
                raise SearchSpaceError(f"{source}: params[{i}] ({p.name}): name={p.name!r} is already used "
                                       f"by params[{seen[p.name]}]; give each parameter a unique name")
            seen[p.name] = i
        self._params = params
        self._by_name = {p.name: p for p in params}
        self._source = source

    # -- construction -------------------------------------------------------------------

    @classmethod
    def from_yaml(cls, path: str | PathLike[str]) -> SearchSpace:
        """Read and validate an hparam.yaml; raises :class:`SearchSpaceError`."""
        source = str(path)
        try:
            with open(path, encoding="utf-8") as f:
                text = f.read()
        except FileNotFoundError:
            problem = "file not found; check the path to the search space YAML"
        except IsADirectoryError:
            problem = "is a directory, not a file; pass the hparam.yaml file itself"
        except PermissionError:
            problem = "not readable (permission denied); fix its permissions"
        except UnicodeDecodeError as e:
            problem = f"not UTF-8 text (byte {e.start}); save the file as UTF-8"
        except OSError as e:
            problem = f"cannot be read ({e.strerror or e}); check the path"
        else:
            problem = None
        if problem is not None:
            raise SearchSpaceError(f"{source}: {problem}")
        try:
            data = yaml.safe_load(text)
        except yaml.YAMLError as e:
            mark = getattr(e, "problem_mark", None) or getattr(e, "context_mark", None)
            where = f"line {mark.line + 1}, column {mark.column + 1}: " if mark is not None else ""
            problem = getattr(e, "problem", None) or str(e)
            raise SearchSpaceError(f"{source}: {where}invalid YAML ({_one_line(problem)}); fix the syntax "
                                   "(indentation, 'key: value', '- ' before each entry)") from None
        _choices_as_written(data, yaml.load(text, Loader=yaml.BaseLoader))
        return cls.from_dict(data, source=source)

    @classmethod
    def from_dict(cls, d: Any, *, source: str = "<dict>") -> SearchSpace:
        """Validate a parsed hparam.yaml (``{"param_list": [...]}``); raises :class:`SearchSpaceError`."""
        if d is None:
            raise SearchSpaceError(f"{source}: is empty; write a mapping with the key param_list "
                                   "(a list of parameters)")
        if not isinstance(d, Mapping):
            raise SearchSpaceError(f"{source}: the top level must be a mapping with the key param_list, "
                                   f"got {_kind_of(d)} {_short(d)}; start the file with 'param_list:'")
        if "param_list" not in d:
            raise SearchSpaceError(f"{source}: missing key 'param_list' (found {_keys(d)}); "
                                   "put the parameters under 'param_list:'")
        extra = [k for k in d if k != "param_list"]
        if extra:
            raise SearchSpaceError(f"{source}: unknown top-level key {extra[0]!r}; "
                                   "the only allowed key is param_list")
        entries = d["param_list"]
        if not isinstance(entries, list):
            raise SearchSpaceError(f"{source}: param_list must be a list of parameters "
                                   f"('- name: ...' items), got {_kind_of(entries)} {_short(entries)}")
        if not entries:
            raise SearchSpaceError(f"{source}: param_list is empty; add at least one parameter")
        params: list[Param] = []
        seen: dict[str, int] = {}
        for i, entry in enumerate(entries):
            p = _parse_entry(entry, i, source)
            if p.name in seen:
                raise SearchSpaceError(f"{source}: param_list[{i}] ({p.name}): name={p.name!r} is already "
                                       f"used by param_list[{seen[p.name]}]; give each parameter a unique "
                                       "name")
            seen[p.name] = i
            params.append(p)
        return cls(params=params, source=source)

    # -- description ----------------------------------------------------------------------

    @property
    def params(self) -> tuple[Param, ...]:
        return self._params

    @property
    def names(self) -> tuple[str, ...]:
        """Parameter names in file order (the order of the box's axes)."""
        return tuple(p.name for p in self._params)

    @property
    def dim(self) -> int:
        return len(self._params)

    @property
    def source(self) -> str:
        """Where the space was read from (for messages); not part of equality."""
        return self._source

    def __getitem__(self, name: str) -> Param:
        return self._by_name[name]

    def to_dict(self) -> dict[str, Any]:
        """The canonical, JSON-able description; ``from_dict`` reads it back to an equal space."""
        return {"param_list": [p.to_dict() for p in self._params]}

    def __eq__(self, other: object) -> bool:
        if not isinstance(other, SearchSpace):
            return NotImplemented
        return self._params == other._params

    def __hash__(self) -> int:
        return hash(self._params)

    def __repr__(self) -> str:
        return f"SearchSpace(params={self._params!r}, source={self._source!r})"

    # -- values <-> box -------------------------------------------------------------------

    def init_params(self) -> dict[str, Any]:
        """The user's init_values, exactly (int as int, float as float, choice as written)."""
        return {p.name: p.init_value for p in self._params}

    def init_vector(self) -> np.ndarray:
        return self.normalize(self.init_params())

    def normalize(self, params: Mapping[str, Any]) -> np.ndarray:
        """Legal values ``{name: value}`` -> a point of [-1, 1]^n; ValueError for illegal values."""
        self._check_names(params)
        return np.array([p.normalize(params[p.name]) for p in self._params], dtype=np.float64)

    def denormalize(self, x: Any) -> dict[str, Any]:
        """A point (clipped to [-1, 1]^n first) -> ``{name: value}`` of Python int/float/choice values."""
        arr = np.asarray(x, dtype=np.float64)
        if arr.shape != (self.dim,):
            raise ValueError(f"expected a vector of {self.dim} coordinates, got shape {arr.shape}")
        if not np.all(np.isfinite(arr)):
            raise ValueError(f"cannot denormalize a non-finite point: {arr.tolist()!r}")
        return {p.name: p.denormalize(float(xi)) for p, xi in zip(self._params, arr)}

    def format_value(self, name: str, value: Any) -> str:
        """The command-line text for a value: ``32``, ``0.001`` (repr, round-trips), ``adam``."""
        if name not in self._by_name:
            raise ValueError(f"unknown parameter {name!r}; the space has {list(self.names)!r}")
        return self._by_name[name].format(value)

    def _check_names(self, params: Mapping[str, Any]) -> None:
        missing = [n for n in self.names if n not in params]
        extra = [n for n in params if n not in self._by_name]
        if missing or extra:
            raise ValueError(f"parameters do not match the space: missing {missing!r}, unexpected {extra!r}")


# --- parsing one entry ---------------------------------------------------------------


def _parse_entry(entry: Any, i: int, source: str) -> Param:
    at = f"{source}: param_list[{i}]"
    if not isinstance(entry, Mapping):
        raise SearchSpaceError(f"{at}: must be a mapping with keys name, type, init_value, greater_than, "
                               f"lower_than; got {_kind_of(entry)} {_short(entry)}")
    if "name" not in entry:
        raise SearchSpaceError(f"{at}: missing key 'name'; add {_KEY_HINTS['name']}")
    name = entry["name"]
    try:
        _check_name(name)
    except _FieldError as e:
        raise SearchSpaceError(f"{at}: {e}") from None
    at = f"{at} ({name})"
    try:
        return _build_param(entry, name)
    except _FieldError as e:
        raise SearchSpaceError(f"{at}: {e}") from None


def _build_param(entry: Mapping[str, Any], name: str) -> Param:
    if "type" not in entry:
        raise _FieldError(f"missing key 'type'; add {_KEY_HINTS['type']}")
    raw_type = entry["type"]
    kind = raw_type.strip().lower() if isinstance(raw_type, str) else None
    if kind not in _KINDS:
        raise _FieldError(f"type={raw_type!r} is not a known type; use one of float, int, choice")
    allowed = _CHOICE_KEYS if kind == "choice" else _NUMERIC_KEYS
    for key in entry:
        if key not in allowed:
            raise _FieldError(f"unknown key {key!r} for type {kind}; allowed keys are {', '.join(allowed)}")
    for key in allowed:
        if key != "log" and key not in entry:
            raise _FieldError(f"missing key {key!r}; add {_KEY_HINTS[key]}")
    if kind == "choice":
        values = entry["values"]
        if not isinstance(values, list):
            raise _FieldError(f"values={_short(values)} must be a list, e.g. values: [adam, sgd]")
        _check_choice(entry["init_value"], tuple(values))
        return ChoiceParam(name=name, init_value=entry["init_value"], values=tuple(values))
    integral = kind == "int"
    log = entry.get("log", False)
    if not isinstance(log, bool):
        raise _FieldError(f"log={log!r} must be true or false")
    low = _number("greater_than", entry["greater_than"], integral=integral)
    high = _number("lower_than", entry["lower_than"], integral=integral)
    init = _number("init_value", entry["init_value"], integral=integral)
    _check_numeric(init, low, high, log, integral=integral)
    cls = IntParam if integral else FloatParam
    return cls(name=name, init_value=init, low=low, high=high, log=log)


def _number(field: str, raw: Any, *, integral: bool) -> Any:
    """A YAML scalar -> float (or int when ``integral``); numeric strings as the original's float()."""
    if isinstance(raw, bool) or not isinstance(raw, (int, float, str)):
        raise _FieldError(f"{field}={raw!r} must be a number, got {_kind_of(raw)}")
    value: int | float = raw
    if isinstance(raw, str):
        text = raw.strip()
        try:
            value = int(text) if integral else float(text)
        except ValueError:
            try:
                value = float(text)
            except ValueError:
                raise _FieldError(f"{field}={raw!r} is not a number; "
                                  f"write a number, e.g. {field}: 0.001") from None
    if isinstance(value, float) and not math.isfinite(value):
        raise _FieldError(f"{field}={raw!r} is not finite; write a finite number")
    if integral:
        if isinstance(value, float):
            if not value.is_integer():
                raise _FieldError(f"{field}={raw!r} is not a whole number but type is int; "
                                  f"use {math.floor(value)} or {math.ceil(value)}, or type: float")
            value = int(value)
        return value
    try:
        return float(value)
    except OverflowError:
        raise _FieldError(f"{field}={raw!r} is not finite; write a finite number") from None


# --- validation shared by parsing and direct construction ---------------------------


def _validated(name: Any, check: Any) -> None:
    try:
        _check_name(name)
        check()
    except _FieldError as e:
        raise SearchSpaceError(f"parameter {name!r}: {e}") from None


def _check_name(name: Any) -> None:
    if not isinstance(name, str):
        raise _FieldError(f"name={name!r} must be a string (the command-line flag name)")
    if not _NAME_RE.match(name):
        raise _FieldError(f"name={name!r} cannot be a command-line flag; use letters, digits, '_' and '-', "
                          "not starting with '-'")
    if name in _RESERVED_NAMES:
        raise _FieldError(f"name={name!r} is reserved (autofinetune passes --{name} to train.py itself); "
                          "rename the parameter")


def _check_numeric(init: Any, low: Any, high: Any, log: Any, *, integral: bool) -> None:
    for field, value in (("init_value", init), ("greater_than", low), ("lower_than", high)):
        if integral and (isinstance(value, (bool, np.bool_)) or not isinstance(value, (int, np.integer))):
            raise _FieldError(f"{field}={value!r} must be an int for type int")
        if not integral and (isinstance(value, (bool, np.bool_))
                             or not isinstance(value, (int, float, np.integer, np.floating))
                             or not math.isfinite(value)):
            raise _FieldError(f"{field}={value!r} must be a finite number")
    if not isinstance(log, bool):
        raise _FieldError(f"log={log!r} must be true or false")
    if low > high:
        raise _FieldError(f"lower_than={high!r} must be greater than greater_than={low!r}; swap the bounds")
    if low == high:
        if integral:
            raise _FieldError(f"the int range [greater_than={low!r}, lower_than={high!r}] has fewer than 2 "
                              "values; widen it, or drop the parameter and fix the value in train.py")
        raise _FieldError(f"lower_than={high!r} must be greater than greater_than={low!r}; widen the range, "
                          "or drop the parameter and fix the value in train.py")
    if log and low <= 0:
        raise _FieldError(f"log: true needs greater_than > 0, got greater_than={low!r}; "
                          "use a positive lower bound (e.g. 1e-06) or drop log")
    if not low <= init <= high:
        raise _FieldError(f"init_value={init!r} is outside [greater_than={low!r}, lower_than={high!r}] "
                          "(inclusive); pick a starting value within the bounds")


def _check_choice(init: Any, values: Any) -> None:
    if not isinstance(values, tuple):
        raise _FieldError(f"values={_short(values)} must be a list of values")
    for j, v in enumerate(values):
        if not isinstance(v, (str, int, float, bool)):
            raise _FieldError(f"values[{j}]={_short(v)} must be a scalar (string, number or true/false), "
                              f"got {_kind_of(v)}")
        if isinstance(v, float) and not math.isfinite(v):
            raise _FieldError(f"values[{j}]={v!r} is not finite; write a finite number")
        for k in range(j):
            if _same_scalar(values[k], v):
                raise _FieldError(f"values[{j}]={v!r} repeats values[{k}]={values[k]!r}; "
                                  "list each value once")
    if len(values) < 2:
        raise _FieldError(f"values={list(values)!r} needs at least 2 distinct values")
    if not any(_same_scalar(v, init) for v in values):
        raise _FieldError(f"init_value={init!r} is not one of values={list(values)!r}; "
                          "pick one of the values")


def _check_in_bounds(p: FloatParam | IntParam, v: float) -> None:
    if not p.low <= v <= p.high:
        raise ValueError(f"{p.name}: {v!r} is outside [{p.low!r}, {p.high!r}]")


def _real(name: str, value: Any) -> float:
    if isinstance(value, (bool, np.bool_)) or not isinstance(value, (int, float, np.integer, np.floating)):
        raise ValueError(f"{name}: expected a number, got {value!r}")
    v = float(value)
    if not math.isfinite(v):
        raise ValueError(f"{name}: expected a finite number, got {value!r}")
    return v


def _integral(name: str, value: Any) -> int:
    if isinstance(value, (int, np.integer)) and not isinstance(value, (bool, np.bool_)):
        return int(value)
    v = _real(name, value)
    if not v.is_integer():
        raise ValueError(f"{name}: expected a whole number, got {value!r}")
    return int(v)


# --- small helpers -------------------------------------------------------------------


def _same_scalar(a: Any, b: Any) -> bool:
    """Equal as hparam values: bools only equal bools, strings only strings; 1 == 1.0."""
    if isinstance(a, bool) or isinstance(b, bool):
        return isinstance(a, bool) and isinstance(b, bool) and a == b
    if isinstance(a, str) or isinstance(b, str):
        return isinstance(a, str) and isinstance(b, str) and a == b
    try:
        return bool(a == b)
    except Exception:
        return False


def _typed(v: Any) -> tuple[str, Any]:
    return (type(v).__name__, v)


def _choices_as_written(data: Any, raw: Any) -> None:
    """Give choice parameters their values as the YAML spells them (``raw``: the same document
    read with every scalar a string), so that ``true``, ``yes`` or ``1e-3`` reach the script
    exactly as written, not as ``True`` or ``0.001``. Leaves anything malformed to from_dict."""
    entries = data.get("param_list") if isinstance(data, Mapping) else None
    raw_entries = raw.get("param_list") if isinstance(raw, Mapping) else None
    if not isinstance(entries, list) or not isinstance(raw_entries, list) or len(entries) != len(raw_entries):
        return
    for entry, raw_entry in zip(entries, raw_entries):
        if not (isinstance(entry, dict) and isinstance(raw_entry, Mapping)
                and str(entry.get("type", "")).lower() == "choice"):
            continue
        values, raw_values = entry.get("values"), raw_entry.get("values")
        if isinstance(values, list) and isinstance(raw_values, list) and len(values) == len(raw_values):
            entry["values"] = [r if isinstance(v, (bool, int, float)) and isinstance(r, str) else v
                               for v, r in zip(values, raw_values)]
        init, raw_init = entry.get("init_value"), raw_entry.get("init_value")
        if isinstance(init, (bool, int, float)) and isinstance(raw_init, str):
            entry["init_value"] = raw_init


def _format_scalar(v: Any) -> str:
    if isinstance(v, float):
        return repr(v)
    return str(v)  # str as is, int as digits, bool as True/False (ast.literal_eval reads it)


def _kind_of(v: Any) -> str:
    return {dict: "a mapping", list: "a list", str: "a string", bool: "a boolean", int: "an int",
            float: "a float", type(None): "nothing (null)"}.get(type(v), type(v).__name__)


def _keys(d: Mapping[Any, Any]) -> str:
    return ", ".join(repr(k) for k in d) or "no keys"


def _short(v: Any, limit: int = 60) -> str:
    text = _one_line(repr(v))
    return text if len(text) <= limit else text[: limit - 3] + "..."


def _one_line(text: str) -> str:
    return " ".join(str(text).split())
