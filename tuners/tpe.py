"""TPE: a model-based search, Optuna's Tree-structured Parzen Estimator, one round at a time.

TPE (Bergstra et al., "Algorithms for Hyper-Parameter Optimization", NeurIPS 2011) splits the
trials so far into the best γ-fraction and the rest, fits a Parzen (kernel density) estimator
l(x) to the good ones and g(x) to the others, draws candidates from l and proposes the one
that maximises l(x)/g(x) (the expected improvement, up to a monotone map). We run Optuna's
``TPESampler`` (Watanabe, "Tree-Structured Parzen Estimator: Understanding Its Algorithm
Components and Their Roles for Better Empirical Performance", arXiv:2304.11127, 2023) through
Optuna's ask interface:

- **multivariate** (Falkner et al., BOHB, ICML 2018): one joint kernel per trial, so
  parameters that must fit together (a learning rate and a batch size) are modelled together;
- **constant liar** (Ginsbourger et al., "Kriging is well-suited to parallelize optimization",
  2010): a round's popsize candidates are asked before any is scored; each one asked counts
  as a (bad) running trial for the next, so a round does not propose popsize copies of the
  same point.

Departures from a plain ``TPESampler`` study, each for the tuner contract or the budget:

- **Round 0 is the init point, exactly, and a maximin Latin hypercube** over the box
  (``tuners/_latin_hypercube.py``), and so are the following rounds until ``n_startup_trials``
  trials were told (Optuna's startup draws uniformly at random; a space-filling design covers
  the box more evenly at the same cost, as Optuna's docs suggest with ``QMCSampler``).
- **Failures rank below every real score**: a failed trial is a completed trial of value −inf
  in the model (Optuna's own FAIL state would be ignored, and its neighbourhood proposed
  again). Until a trial has scored, rounds come from the space-filling design.
- **A trial stopped early** (``Pruned``, ``--early-stop``) is a completed trial of a value
  between: with m the lowest real score of the history (0 without one) and gap = 1 + |m|, it is
  valued m − gap·(1 − level), level in (0, 1) from ``pruned_levels`` over every pruned trial of
  the history (a later step, then a higher last value, ranks better). So it ranks below every
  finished trial and above every failure (−inf), in Optuna's order for pruned trials (Optuna's
  own PRUNED state would put our failures, completed at −inf, above them). Those values move
  as the history grows, so while the history holds a pruned trial the study is rebuilt from
  the history at every ``ask`` (as a restored tuner does anyway).
- **Ints are modelled as continuous** on [low − 0.5, high + 0.5] (log scale for a log int) and
  rounded to the nearest value (the model keeps the unrounded value it proposed, as HAZero
  tells CMA-ES its raw sample): Optuna 5's kernel mass for an ``IntDistribution`` is
  evaluated in pure Python, ~110 ms for a round of 8 at 200 trials with two int parameters,
  against ~30 ms this way (the benchmark's overhead target is 50 ms a round). Choices are a
  ``CategoricalDistribution`` over the value indices (so that ``1``, ``1.0`` and ``True`` stay
  distinct values).
- **State = the trial history and our RNG.** The tuner holds an in-memory Optuna study of
  the told trials (in order: the raw values TPE proposed and the scores), and each ``ask``
  gives it a new ``TPESampler`` seeded from the tuner's numpy Generator. The JSON state is the
  history (``algorithm.trials``, with ``pending_model`` for a round asked but not told) plus
  the Generator's state, which the base class saves; a restored tuner rebuilds the study from
  the history (``add_trials``: the same completed trials, the same raw values and scores, in
  the same order), so its next ``ask`` is bit-identical. Nothing of Optuna is pickled, and
  Optuna's RNGs never outlive one ``ask``. (The pipeline restores the tuner every round, so
  it pays the rebuild too, ~15 ms at 200 trials; the benchmark reports both.) Proposals for a
  given seed depend on Optuna's TPE code: the same Optuna version resumes bit-identically,
  another one continues the same history with other proposals.

Optuna is imported by the first round asked of the model, not by ``import tuners`` (nor by
the startup rounds).
"""

from __future__ import annotations

import logging
import math
import warnings
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any

import numpy as np

from tuners._base import Pruned, Tuner, _check_keys, _get, _opt_float, pruned_levels
from tuners._latin_hypercube import maximin_latin_hypercube
from tuners.space import ChoiceParam, FloatParam, IntParam

__all__ = ["TPE", "TPEConfig"]

# The keys of TPE's algorithm state, all required.
_ALGORITHM_KEYS = ("trials", "pending_model")
# The keys of one told trial in the state.
_TRIAL_KEYS = ("params", "score", "model")


@dataclass(frozen=True)
class TPEConfig:
    """TPE's constants (Optuna's defaults, but for the startup design and the two switches)."""

    n_startup_trials: int = 10  # trials from the space-filling design (init first) before TPE models
    n_ei_candidates: int = 24  # candidates drawn from l(x) per proposal; the best l/g is proposed (Optuna's)
    multivariate: bool = True  # one joint kernel per trial, not one per parameter
    constant_liar: bool = True  # a round's candidates asked before it is scored count as bad running trials

    def __post_init__(self) -> None:
        for field in ("n_startup_trials", "n_ei_candidates"):
            value = getattr(self, field)
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ValueError(f"{field} must be an int >= 1, got {field}={value!r}")
        for field in ("multivariate", "constant_liar"):
            value = getattr(self, field)
            if not isinstance(value, bool):
                raise ValueError(f"{field} must be True or False, got {field}={value!r}")


@dataclass(frozen=True)
class _Trial:
    """A told trial: what was evaluated, its score, and where the model saw it."""

    params: dict[str, Any]  # legal values of the space, as asked
    score: float | Pruned | None  # None: failed; Pruned: stopped early
    model: dict[str, float | int]  # Optuna's raw values (an int axis unrounded; a choice's index)

    def to_json(self) -> dict[str, Any]:
        score = self.score.to_json() if isinstance(self.score, Pruned) else self.score
        return {"params": dict(self.params), "score": score, "model": dict(self.model)}


@dataclass(frozen=True)
class _History:
    """TPE's records as read from a state, checked, before they are set on the tuner."""

    trials: list[_Trial]
    pending_model: list[dict[str, float | int]] | None


class TPE(Tuner):
    """Optuna's multivariate TPE with a constant liar, one round per ``ask``; see the module docstring.

    ``TPE(space=..., popsize=5, seed=0)`` or ``make_tuner("tpe", space, popsize=5, seed=0)``.
    """

    name = "tpe"
    config_type = TPEConfig

    def _start(self) -> None:
        self._trials: list[_Trial] = []  # told, in order
        self._pending_model: list[dict[str, float | int]] | None = None  # raw values of the pending round
        # In memory only, rebuilt from _trials when missing (after a restore): an Optuna study of
        # exactly the told trials, plus the pending round's trials when it was asked of TPE.
        self._study: Any = None
        self._asked: list[int] | None = None  # their trial numbers in _study

    @property
    def trials(self) -> list[tuple[dict[str, Any], float | Pruned | None]]:
        """Every told trial, in order: (params, score, Pruned, or None for a failure)."""
        return [(dict(t.params), t.score) for t in self._trials]

    # -- ask / tell ---------------------------------------------------------------------------

    def _propose(self) -> list[dict[str, Any]]:
        scored = any(isinstance(t.score, float) for t in self._trials)
        if len(self._trials) >= self._config.n_startup_trials and scored:
            return self._ask_optuna(seed=int(self._rng.integers(2**32)))
        # the startup design (round 0 always; again while no trial has scored): init first, the
        # rest spread over the box, away from every point tried so far and from each other
        candidates = [self._space.init_params()] if self._rounds_told == 0 else []  # exactly
        tried = np.array([self._space.normalize(p) for p in [*(t.params for t in self._trials), *candidates]])
        design = maximin_latin_hypercube(self._rng, self._popsize - len(candidates), self._space.dim,
                                         avoid=tried if len(tried) else None)
        candidates += [self._space.denormalize(x) for x in design]
        self._pending_model = [_internal(self._space, c) for c in candidates]
        self._asked = None
        return candidates

    def _update(self, scores: list[float | Pruned | None]) -> None:
        assert self._pending is not None and self._pending_model is not None
        told = [_Trial(dict(p), s, m) for p, s, m in zip(self._pending, scores, self._pending_model)]
        if any(isinstance(t.score, Pruned) for t in [*self._trials, *told]):
            self._study = None  # pruned trials' values depend on the whole history: rebuilt at the next ask
        if self._study is not None:
            with _quiet_optuna():
                if self._asked is not None:  # asked of the study: complete them
                    for number, trial in zip(self._asked, told):
                        self._study.tell(number, _model_value(trial.score))
                else:  # the startup design: add them
                    self._study.add_trials([self._frozen(t, _model_value(t.score)) for t in told])
        self._trials += told
        self._pending_model, self._asked = None, None

    def _ask_optuna(self, *, seed: int) -> list[dict[str, Any]]:
        """A round of candidates from the TPE study of the told trials, its sampler seeded with ``seed``."""
        import optuna

        with warnings.catch_warnings(), _quiet_optuna():
            warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)
            if self._study is None:
                self._study = optuna.create_study(direction="maximize")
                values = _model_values([t.score for t in self._trials])
                self._study.add_trials([self._frozen(t, v) for t, v in zip(self._trials, values)])
            self._study.sampler = optuna.samplers.TPESampler(
                seed=seed, n_startup_trials=1, n_ei_candidates=self._config.n_ei_candidates,
                multivariate=self._config.multivariate, constant_liar=self._config.constant_liar)
            # asked one by one, not told: with the constant liar each counts as running for the next
            asked = [self._study.ask(self._distributions()) for _ in range(self._popsize)]
        self._asked = [trial.number for trial in asked]
        self._pending_model = [dict(trial.params) for trial in asked]
        return [_external(self._space, trial.params) for trial in asked]

    def _distributions(self) -> dict[str, Any]:
        return {p.name: _distribution(p) for p in self._space.params}

    def _frozen(self, trial: _Trial, value: float) -> Any:
        """A told trial as Optuna's completed trial of ``value`` (``_model_values``)."""
        from optuna.trial import create_trial

        return create_trial(params=dict(trial.model), distributions=self._distributions(), value=value)

    # -- state ------------------------------------------------------------------------------------

    def _algorithm_state(self) -> dict[str, Any]:
        return {"trials": [t.to_json() for t in self._trials],
                "pending_model": None if self._pending_model is None else [dict(m) for m in self._pending_model]}

    def _parse_algorithm_state(self, d: Any, *, pending: list[dict[str, Any]] | None) -> _History:
        _check_keys(d, _ALGORITHM_KEYS, "the tpe algorithm state")
        items = _get(d, "trials")
        if not isinstance(items, list):
            raise ValueError(f"trials must be a list, got {type(items).__name__}")
        trials = []
        for i, item in enumerate(items):
            _check_keys(item, _TRIAL_KEYS, f"the tpe algorithm state's trials[{i}]")
            params = dict(_get(item, "params"))
            self._space.normalize(params)  # legal values of this space, or ValueError
            score = _get(item, "score")
            score = Pruned.from_json(score) if isinstance(score, dict) else _opt_float(score, f"trials[{i}] score")
            trials.append(_Trial(params, score, self._model(_get(item, "model"), f"trials[{i}] model")))
        if len(trials) % self._popsize:
            raise ValueError(f"{len(trials)} told trials is not a whole number of rounds of {self._popsize}")
        pending_model = _get(d, "pending_model")
        if (pending_model is None) != (pending is None):
            raise ValueError("pending candidates and their model values disagree")
        if pending_model is not None:
            if not isinstance(pending_model, list) or len(pending_model) != self._popsize:
                raise ValueError(f"pending_model must be a list of {self._popsize} mappings")
            pending_model = [self._model(m, "pending_model") for m in pending_model]
        return _History(trials=trials, pending_model=pending_model)

    def _model(self, m: Any, what: str) -> dict[str, float | int]:
        """Checked raw values: a number in the parameter's model range per name (a choice: an index)."""
        _check_keys(m, self._space.names, f"the tpe algorithm state's {what}")
        out: dict[str, float | int] = {}
        for p in self._space.params:
            v = m[p.name]
            if isinstance(p, ChoiceParam):
                if isinstance(v, bool) or not isinstance(v, int) or not 0 <= v < len(p.values):
                    raise ValueError(f"{what}: {p.name}={v!r} is not a value index 0..{len(p.values) - 1}")
            else:
                low, high = _model_range(p)
                if isinstance(v, bool) or not isinstance(v, (int, float)) or not low <= v <= high:
                    raise ValueError(f"{what}: {p.name}={v!r} is outside [{low!r}, {high!r}]")
                v = float(v)
            out[p.name] = v
        return out

    def _restore_algorithm_state(self, records: _History) -> None:
        self._trials = list(records.trials)
        self._pending_model = None if records.pending_model is None else list(records.pending_model)
        self._study, self._asked = None, None  # rebuilt from the trials at the next ask


# --- the space in Optuna's terms ---------------------------------------------------------------


def _model_value(score: float | None) -> float:
    return -math.inf if score is None else score


def _model_values(scores: list[float | Pruned | None]) -> list[float]:
    """The study's value of each told trial: its score; -inf for a failure; a pruned trial
    below the lowest real score of the history, by rank (see the module docstring)."""
    real = [s for s in scores if isinstance(s, float)]
    low = min(real) if real else 0.0
    levels = pruned_levels(scores)
    return [low - (1.0 + abs(low)) * (1.0 - levels[s]) if isinstance(s, Pruned) else _model_value(s)
            for s in scores]


def _distribution(p: Any) -> Any:
    from optuna.distributions import CategoricalDistribution, FloatDistribution

    if isinstance(p, ChoiceParam):
        return CategoricalDistribution(tuple(range(len(p.values))))
    low, high = _model_range(p)
    return FloatDistribution(low, high, log=p.log)


def _model_range(p: FloatParam | IntParam) -> tuple[float, float]:
    """Where the model searches a number: an int continuous on [low − 0.5, high + 0.5], then rounded."""
    if isinstance(p, IntParam):
        return p.low - 0.5, p.high + 0.5
    return p.low, p.high


def _internal(space: Any, params: dict[str, Any]) -> dict[str, Any]:
    """Our values -> Optuna's: a choice as its index, an int as a float."""
    out: dict[str, Any] = {}
    for p in space.params:
        v = params[p.name]
        out[p.name] = p.index(v) if isinstance(p, ChoiceParam) else float(v)
    return out


def _external(space: Any, params: dict[str, Any]) -> dict[str, Any]:
    """Optuna's values -> legal values of the space (ints rounded half up, floats clipped)."""
    out: dict[str, Any] = {}
    for p in space.params:
        v = params[p.name]
        if isinstance(p, ChoiceParam):
            out[p.name] = p.values[int(v)]
        elif isinstance(p, IntParam):
            out[p.name] = min(max(math.floor(float(v) + 0.5), p.low), p.high)
        else:
            out[p.name] = min(max(float(v), p.low), p.high)
    return out


@contextmanager
def _quiet_optuna() -> Iterator[None]:
    """Drop Optuna's lines below ERROR ("A new study created", "Trial 7 failed"): bookkeeping, not news."""
    loggers = [logging.getLogger(name)
               for name in ("optuna.storages._in_memory", "optuna.study.study", "optuna.study._tell")]
    quiet = _DropInfo()
    for logger in loggers:
        logger.addFilter(quiet)
    try:
        yield
    finally:
        for logger in loggers:
            logger.removeFilter(quiet)


class _DropInfo(logging.Filter):
    def filter(self, record: logging.LogRecord) -> bool:
        return record.levelno >= logging.ERROR
