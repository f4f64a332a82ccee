"""What every tuner shares: the ask/tell protocol, score checks, the best so far, the state.

A tuner proposes a round of ``popsize`` candidates (:meth:`Tuner.ask`), is told their scores
(:meth:`Tuner.tell`, higher is better, ``None`` for a failed trial, :class:`Pruned` for a trial
stopped early), and so on. It never runs
anything itself, so it can be tested, benchmarked and restored without a GPU, a clock or a file.

The state (:meth:`Tuner.state_dict`) is plain JSON, taken at any moment, also between ``ask``
and ``tell`` (the pipeline saves it right after ``ask`` and may be killed mid-round)::

    {"version": 1, "tuner": "hazero", "popsize": 5, "seed": 0,   # version: TUNER_STATE_VERSION
     "space": {...},           # SearchSpace.to_dict(): a restore into another space is refused
     "config": {...},          # the algorithm's constants (HAZeroConfig, PSHE2Config)
     "rng": {...},             # numpy's bit_generator.state: the stream continues where it was
     "rounds_told": 3,
     "best": {"params": {...}, "score": 0.93} | null,
     "pending": [{...}, ...] | null,   # candidates asked but not yet told
     "algorithm": {...}}       # the tuner's own records (CMA-ES internals, particles)

Floats are written as Python floats, which JSON round-trips exactly, so a tuner restored from
``json.loads(json.dumps(state))`` continues bit-identically.

Loading is strict: every mapping of the state must hold exactly its keys (a missing or an
unknown key is refused by name, never defaulted or ignored), and the tuner's attributes are set
one by one, only after the whole state has been read and checked.
"""

from __future__ import annotations

import abc
import copy
import dataclasses
import math
import secrets
from collections.abc import Mapping, Sequence
from typing import Any, ClassVar

import numpy as np

from tuners.space import SearchSpace, SearchSpaceError

__all__ = ["TUNER_STATE_VERSION", "Tuner", "TunerStateError", "TunerStateVersionError", "Pruned",
           "pruned_rank_key", "pruned_levels"]

# The layout of Tuner.state_dict() (not the run state, runtime/state.py, which has RUN_STATE_VERSION).
TUNER_STATE_VERSION = 1
# The keys of a tuner state, all required.
_STATE_KEYS = ("version", "tuner", "popsize", "seed", "space", "config", "rng", "rounds_told", "best",
               "pending", "algorithm")


@dataclasses.dataclass(frozen=True)
class Pruned:
    """A trial stopped early (``--early-stop``): the last step it reported and its value there.

    Every tuner ranks it below every trial that finished with a score, and above every failed
    trial; among pruned trials, one stopped at a later step ranks higher, then by value
    (Optuna's order for pruned trials). It is never the tuner's ``best``. How each tuner
    uses the rank is in its module docstring.
    """

    step: int
    value: float

    def to_json(self) -> dict[str, Any]:
        return {"step": self.step, "value": self.value}

    @classmethod
    def from_json(cls, d: Any) -> Pruned:
        _check_keys(d, ("step", "value"), "a pruned trial's score")
        value = _opt_float(d["value"], "pruned value")
        if value is None:
            raise ValueError("a pruned trial's value must be a finite number")
        return cls(step=_int(d["step"], "pruned step"), value=value)


def pruned_rank_key(score: Pruned) -> tuple[int, float]:
    """Sort key among pruned trials, best first: the later step, then the higher value."""
    return (-score.step, -score.value)


def pruned_levels(scores: Sequence[Any]) -> dict[Pruned, float]:
    """Each distinct Pruned in ``scores`` -> a level in (0, 1), higher for a better rank:
    (n - r) / (n + 1) for the r-th best (from 0) of the n distinct ones. A tuner places its
    pruned trials at ``worst real + level · gap``-like points between real scores and failures."""
    distinct = sorted({s for s in scores if isinstance(s, Pruned)}, key=pruned_rank_key)
    return {s: (len(distinct) - r) / (len(distinct) + 1) for r, s in enumerate(distinct)}


class TunerStateError(ValueError):
    """A tuner state that cannot be loaded: corrupt, or made for another tuner/space/popsize."""


class TunerStateVersionError(TunerStateError):
    """A tuner state written by another state-format version."""


class Tuner(abc.ABC):
    """An ask/tell tuner over a :class:`SearchSpace`; subclasses add the algorithm.

    Subclasses set ``name`` and ``config_type`` and implement the hooks ``_start`` (initial
    records, called once by the constructor), ``_propose`` (a round's candidates),
    ``_update`` (learn from a round's scores), ``_algorithm_state`` and
    ``_parse_algorithm_state`` (their records to and from JSON) and
    ``_restore_algorithm_state`` (set parsed records).
    """

    name: ClassVar[str]
    config_type: ClassVar[type]

    def __init__(self, *, space: SearchSpace, popsize: int, seed: int | None = None,
                 config: Any = None) -> None:
        if not isinstance(space, SearchSpace):
            raise ValueError(f"space must be a SearchSpace, got {type(space).__name__}")
        if isinstance(popsize, (bool, np.bool_)) or not isinstance(popsize, (int, np.integer)) or popsize < 1:
            raise ValueError(f"popsize must be an int >= 1, got popsize={popsize!r}")
        if seed is not None and (isinstance(seed, (bool, np.bool_)) or not isinstance(seed, (int, np.integer))
                                 or seed < 0):
            raise ValueError(f"seed must be None or an int >= 0, got seed={seed!r}")
        if config is None:
            config = self.config_type()
        if not isinstance(config, self.config_type):
            raise ValueError(f"config for {self.name} must be a {self.config_type.__name__}, got {config!r}")
        self._space = space
        self._popsize = int(popsize)
        self._config = config
        # seed=None: a fresh seed from the OS, recorded in the state so the run can be repeated
        self._seed = int(seed) if seed is not None else secrets.randbits(63)
        self._rng = np.random.Generator(np.random.PCG64(self._seed))
        self._rounds_told = 0
        self._pending: list[dict[str, Any]] | None = None
        self._best: tuple[dict[str, Any], float] | None = None
        self._start()

    # -- what the caller sees -----------------------------------------------------------

    @property
    def space(self) -> SearchSpace:
        return self._space

    @property
    def popsize(self) -> int:
        return self._popsize

    @property
    def seed(self) -> int:
        return self._seed

    @property
    def config(self) -> Any:
        return self._config

    @property
    def rounds_told(self) -> int:
        """Rounds whose scores were told."""
        return self._rounds_told

    @property
    def pending(self) -> list[dict[str, Any]] | None:
        """The candidates of the last ``ask`` not yet told, or None."""
        return None if self._pending is None else copy.deepcopy(self._pending)

    @property
    def best(self) -> tuple[dict[str, Any], float] | tuple[None, None]:
        """``(params, score)`` of the best successful trial so far (the first on ties); ``(None, None)``."""
        if self._best is None:
            return None, None
        return dict(self._best[0]), self._best[1]

    def ask(self) -> list[dict[str, Any]]:
        """The next round: ``popsize`` candidates ``{name: value}``, legal values of the space."""
        if self._pending is not None:
            raise RuntimeError(f"ask() called twice without tell(): tell the scores of the {self._popsize} "
                               "pending candidates first (they are in .pending)")
        self._pending = self._propose()
        return copy.deepcopy(self._pending)

    def tell(self, scores: Sequence[float | None]) -> None:
        """Learn from the scores of the pending candidates, in order; None marks a failed trial,
        ``Pruned(step, value)`` a trial stopped early.

        A rejected call (wrong length, a non-number, nan or inf) raises ValueError and changes nothing.
        """
        if self._pending is None:
            raise RuntimeError("tell() without a pending ask(): call ask() first")
        checked = self._check_scores(scores)
        self._update(checked)
        for params, score in zip(self._pending, checked):
            if isinstance(score, float) and (self._best is None or score > self._best[1]):
                self._best = (params, score)
        self._pending = None
        self._rounds_told += 1

    def _check_scores(self, scores: Any) -> list[float | Pruned | None]:
        if isinstance(scores, (str, bytes)) or not isinstance(scores, (Sequence, np.ndarray)):
            raise ValueError(f"scores must be a list of {self._popsize} floats (None for a failed trial), "
                             f"got {type(scores).__name__}")
        if isinstance(scores, np.ndarray) and scores.ndim != 1:
            raise ValueError(f"scores must be one-dimensional, got an array of shape {scores.shape}")
        if len(scores) != self._popsize:
            raise ValueError(f"got {len(scores)} scores for {self._popsize} pending candidates; "
                             "tell one score (or None) per candidate, in order")
        checked: list[float | Pruned | None] = []
        for i, s in enumerate(scores):
            if s is None:
                checked.append(None)
                continue
            if isinstance(s, Pruned):
                if isinstance(s.step, bool) or not isinstance(s.step, int) or s.step < 0 \
                        or isinstance(s.value, bool) or not isinstance(s.value, (int, float)) \
                        or not math.isfinite(s.value):
                    raise ValueError(f"scores[{i}]={s!r}: a pruned trial needs an int step >= 0 and a finite "
                                     "value; tell None for a pruned trial whose value is not finite")
                checked.append(Pruned(step=s.step, value=float(s.value)))
                continue
            if isinstance(s, (bool, np.bool_)) or not isinstance(s, (int, float, np.integer, np.floating)):
                raise ValueError(f"scores[{i}]={s!r} is not a number; tell a float score, or None for a "
                                 "failed trial")
            value = float(s)
            if not math.isfinite(value):
                raise ValueError(f"scores[{i}]={s!r} is not finite; tell None for a failed trial")
            checked.append(value)
        return checked

    # -- state ----------------------------------------------------------------------------

    def state_dict(self) -> dict[str, Any]:
        """The whole state as JSON-able data (valid at any time, also between ask and tell)."""
        return {
            "version": TUNER_STATE_VERSION,
            "tuner": self.name,
            "popsize": self._popsize,
            "seed": self._seed,
            "space": self._space.to_dict(),
            "config": dataclasses.asdict(self._config),
            "rng": copy.deepcopy(self._rng.bit_generator.state),
            "rounds_told": self._rounds_told,
            "best": None if self._best is None else {"params": dict(self._best[0]), "score": self._best[1]},
            "pending": copy.deepcopy(self._pending),
            "algorithm": self._algorithm_state(),
        }

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        """Continue from ``state``.

        Raises TunerStateVersionError (another state version) or TunerStateError (corrupt, or made
        for another tuner, popsize, space or config); the tuner is then unchanged.
        """
        if not isinstance(state, Mapping):
            raise TunerStateError(f"tuner state must be a mapping, got {type(state).__name__}")
        version = state.get("version")
        if version != TUNER_STATE_VERSION:
            raise TunerStateVersionError(
                f"tuner state version {version!r} cannot be read by this version, which reads version "
                f"{TUNER_STATE_VERSION}; start a new search (new output dir)")
        try:
            staged = self._parse_state(state)
        except TunerStateError:
            raise
        except (KeyError, TypeError, ValueError, IndexError, AttributeError, OverflowError) as e:
            raise TunerStateError(f"corrupt {self.name} tuner state: {type(e).__name__}: {e}") from e
        # all of it checked: set it (nothing below can fail)
        self._seed = staged.seed
        self._rng = staged.rng
        self._rounds_told = staged.rounds_told
        self._best = staged.best
        self._pending = staged.pending
        self._restore_algorithm_state(staged.algorithm)

    def _parse_state(self, state: Mapping[str, Any]) -> _StagedState:
        _check_keys(state, _STATE_KEYS, "the state")
        name = _get(state, "tuner")
        if name != self.name:
            raise TunerStateError(f"the state is of tuner {name!r}, not {self.name!r}; "
                                  f"restore it with make_tuner({name!r}, ...)")
        popsize = _get(state, "popsize")
        if popsize != self._popsize:
            raise TunerStateError(f"the state has popsize={popsize!r}, this tuner popsize={self._popsize}; "
                                  "restore with the popsize the search started with")
        self._check_same_space(_get(state, "space"))
        config_dict = _get(state, "config")
        if not isinstance(config_dict, Mapping):
            raise TunerStateError(f"corrupt {self.name} tuner state: config={config_dict!r} is not a mapping")
        _check_keys(config_dict, [f.name for f in dataclasses.fields(self.config_type)], "the state's config")
        config = self.config_type(**config_dict)
        if config != self._config:
            raise TunerStateError(f"the state was made with {config}, this tuner has {self._config}; "
                                  "restore with the same settings")
        seed = _int(_get(state, "seed"), "seed")
        rng = np.random.Generator(np.random.PCG64())
        template = rng.bit_generator.state
        rng_dict = _get(state, "rng")
        _check_keys(rng_dict, list(template), "the state's rng")
        _check_keys(rng_dict["state"], list(template["state"]), "the state's rng state")
        rng.bit_generator.state = copy.deepcopy(dict(rng_dict))
        rounds_told = _int(_get(state, "rounds_told"), "rounds_told")
        best = _get(state, "best")
        if best is not None:
            _check_keys(best, ("params", "score"), "the state's best")
            params = dict(_get(best, "params"))
            self._space.normalize(params)  # legal values of this space, or ValueError
            score = float(_get(best, "score"))
            if not math.isfinite(score):
                raise ValueError(f"best score {score!r} is not finite")
            best = (params, score)
        pending = _get(state, "pending")
        if pending is not None:
            if not isinstance(pending, list) or len(pending) != self._popsize:
                raise ValueError(f"pending must be a list of {self._popsize} candidates, got {pending!r}")
            pending = [dict(p) for p in pending]
            for p in pending:
                self._space.normalize(p)
        algorithm = self._parse_algorithm_state(_get(state, "algorithm"), pending=pending)
        return _StagedState(seed=seed, rng=rng, rounds_told=rounds_told, best=best, pending=pending,
                            algorithm=algorithm)

    def _check_same_space(self, space_dict: Any) -> None:
        try:
            theirs = SearchSpace.from_dict(space_dict, source="the state's search space")
        except SearchSpaceError as e:
            raise TunerStateError(f"corrupt {self.name} tuner state: {e}") from None
        if theirs == self._space:
            return
        if theirs.names != self._space.names:
            what = f"parameters {list(theirs.names)} in the state, {list(self._space.names)} here"
        else:
            pairs = enumerate(zip(theirs.params, self._space.params))
            i, a, b = next((i, a, b) for i, (a, b) in pairs if a != b)
            what = f"param_list[{i}] ({a.name}) is {a.to_dict()} in the state, {b.to_dict()} here"
        raise TunerStateError(f"the state was made for another search space: {what}; "
                              "restore with the hparam file the search started with")

    # -- hooks ------------------------------------------------------------------------------

    @abc.abstractmethod
    def _start(self) -> None:
        """Set up the algorithm's records (the constructor calls it once, after the rng exists)."""

    @abc.abstractmethod
    def _propose(self) -> list[dict[str, Any]]:
        """The next round's ``popsize`` candidates (round 0's first: ``space.init_params()``)."""

    @abc.abstractmethod
    def _update(self, scores: list[float | Pruned | None]) -> None:
        """Learn from the pending round's checked scores (``rounds_told`` not yet incremented)."""

    @abc.abstractmethod
    def _algorithm_state(self) -> dict[str, Any]:
        """The algorithm's records as JSON-able data."""

    @abc.abstractmethod
    def _parse_algorithm_state(self, d: Any, *, pending: list[dict[str, Any]] | None) -> Any:
        """The records in ``_algorithm_state`` output, checked but not yet set; raise on anything wrong.

        ``pending`` is the state's pending candidates (already checked). ``d`` must hold exactly
        the keys ``_algorithm_state`` writes (:func:`_check_keys`).
        """

    @abc.abstractmethod
    def _restore_algorithm_state(self, records: Any) -> None:
        """Set the records ``_parse_algorithm_state`` returned (called once the whole state has checked)."""


@dataclasses.dataclass(frozen=True)
class _StagedState:
    """A state read and checked by :meth:`Tuner._parse_state`, not yet set on the tuner."""

    seed: int
    rng: np.random.Generator
    rounds_told: int
    best: tuple[dict[str, Any], float] | None
    pending: list[dict[str, Any]] | None
    algorithm: Any  # what the tuner's _parse_algorithm_state returned


# --- helpers for the parsers -----------------------------------------------------------


def _check_keys(d: Any, expected: Sequence[str], where: str) -> None:
    """Refuse ``d`` unless it is a mapping with exactly the keys ``expected``, naming the odd ones."""
    if not isinstance(d, Mapping):
        raise TunerStateError(f"corrupt tuner state: {where} must be a mapping with keys "
                              f"{', '.join(expected)}; got {type(d).__name__}")
    missing = [k for k in expected if k not in d]
    unknown = [k for k in d if k not in expected]
    if missing:
        s = "s" if len(missing) > 1 else ""
        raise TunerStateError(f"corrupt tuner state: missing key{s} {', '.join(map(repr, missing))} in {where}")
    if unknown:
        s = "s" if len(unknown) > 1 else ""
        raise TunerStateError(f"corrupt tuner state: unknown key{s} {', '.join(map(repr, unknown))} "
                              f"in {where}, which holds exactly: {', '.join(expected)}")


def _get(d: Any, key: str) -> Any:
    if not isinstance(d, Mapping):
        raise TunerStateError(f"corrupt tuner state: expected a mapping holding {key!r}, "
                              f"got {type(d).__name__}")
    if key not in d:
        raise TunerStateError(f"corrupt tuner state: missing key {key!r}")
    return d[key]


def _int(v: Any, what: str, *, low: int = 0) -> int:
    if isinstance(v, bool) or not isinstance(v, int) or v < low:
        raise ValueError(f"{what}={v!r} must be an int >= {low}")
    return v


def _matrix(v: Any, what: str, shape: tuple[int, ...], *, box: bool = False) -> np.ndarray:
    """A float array of ``shape`` from nested lists, finite (and within [-1, 1] when ``box``)."""
    arr = np.array(v, dtype=np.float64)
    if arr.shape != shape:
        raise ValueError(f"{what} has shape {arr.shape}, expected {shape}")
    if not np.all(np.isfinite(arr)):
        raise ValueError(f"{what} holds non-finite values")
    if box and not np.all(np.abs(arr) <= 1.0):
        raise ValueError(f"{what} leaves the box [-1, 1]")
    return arr


def _opt_float(v: Any, what: str) -> float | None:
    if v is None:
        return None
    if isinstance(v, bool) or not isinstance(v, (int, float)) or not math.isfinite(v):
        raise ValueError(f"{what}={v!r} must be a finite number or null")
    return float(v)
