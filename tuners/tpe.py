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
- **Failures rank below every real score**: a failed trial is given, in the model, a score
  strictly below the worst real one (worst − 1 − |worst|; Optuna would ignore it and propose
  its neighbourhood again). With no real score yet, failures are left out.
- **Ints are modelled as continuous** on [low − 0.5, high + 0.5] (log scale for a log int) and
  rounded to the nearest value: Optuna 5's kernel mass for an ``IntDistribution`` is
  evaluated in pure Python, ~110 ms for a round of 8 at 200 trials with two int parameters,
  against ~30 ms this way (the benchmark's overhead target is 50 ms a round). Choices are a
  ``CategoricalDistribution`` over the value indices (so that ``1``, ``1.0`` and ``True`` stay
  distinct values).
- **State = the trial history and our RNG.** Each ``ask`` builds a fresh in-memory study from
  the told trials (params and scores, in order) and a ``TPESampler`` seeded from the tuner's
  numpy Generator. The JSON state is therefore the history (``algorithm.trials``) plus the
  Generator's state, which the base class saves: a tuner restored from it builds the same
  study and the same sampler, and its next ``ask`` is bit-identical. Nothing of Optuna is
  pickled, and Optuna's own RNGs never outlive one ``ask``.

Optuna is imported when the first TPE asks, not by ``import tuners``.
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

from tuners._base import Tuner, _check_keys, _get, _opt_float
from tuners._latin_hypercube import maximin_latin_hypercube
from tuners.space import ChoiceParam, FloatParam, IntParam

__all__ = ["TPE", "TPEConfig"]

# The keys of TPE's algorithm state, all required.
_ALGORITHM_KEYS = ("trials",)
# The keys of one told trial in the state.
_TRIAL_KEYS = ("params", "score")


@dataclass(frozen=True)
class TPEConfig:
    """TPE's constants (Optuna's defaults but for the startup design and the two switches)."""

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


class TPE(Tuner):
    """Optuna's multivariate TPE with a constant liar, one round per ``ask``; see the module docstring.

    ``TPE(space=..., popsize=5, seed=0)`` or ``make_tuner("tpe", space, popsize=5, seed=0)``.
    """

    name = "tpe"
    config_type = TPEConfig

    def _start(self) -> None:
        self._trials: list[tuple[dict[str, Any], float | None]] = []  # told (params, score or None), in order

    @property
    def trials(self) -> list[tuple[dict[str, Any], float | None]]:
        """Every told trial, in order: (params, score or None for a failure)."""
        return [(dict(p), s) for p, s in self._trials]

    # -- ask / tell ---------------------------------------------------------------------------

    def _propose(self) -> list[dict[str, Any]]:
        if len(self._trials) >= self._config.n_startup_trials:
            return self._ask_optuna(seed=int(self._rng.integers(2**32)))
        # the startup design (round 0 always): init first, the rest spread over the box, away from
        # every point tried so far and from each other
        candidates = [self._space.init_params()] if self._rounds_told == 0 else []  # exactly
        tried = np.array([self._space.normalize(p) for p in [*(p for p, _ in self._trials), *candidates]])
        design = maximin_latin_hypercube(self._rng, self._popsize - len(candidates), self._space.dim,
                                         avoid=tried if len(tried) else None)
        return candidates + [self._space.denormalize(x) for x in design]

    def _update(self, scores: list[float | None]) -> None:
        assert self._pending is not None
        self._trials += [(dict(p), s) for p, s in zip(self._pending, scores)]

    def _ask_optuna(self, *, seed: int) -> list[dict[str, Any]]:
        """A round of candidates from a TPE study of the told trials, its sampler seeded with ``seed``."""
        import optuna
        from optuna.trial import TrialState, create_trial

        distributions = {p.name: _distribution(p) for p in self._space.params}
        real = [s for _, s in self._trials if s is not None]
        f_failed = min(real) - 1.0 - abs(min(real)) if real else None  # below every real score
        history = [
            create_trial(params=_internal(self._space, params), distributions=distributions,
                         value=f_failed if score is None else score,
                         state=TrialState.FAIL if score is None and not real else TrialState.COMPLETE)
            for params, score in self._trials
        ]
        with warnings.catch_warnings(), _quiet_optuna():
            warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)
            sampler = optuna.samplers.TPESampler(
                seed=seed, n_startup_trials=1, n_ei_candidates=self._config.n_ei_candidates,
                multivariate=self._config.multivariate, constant_liar=self._config.constant_liar,
)
            study = optuna.create_study(direction="maximize", sampler=sampler)
            study.add_trials(history)
            # asked one by one, not told: with the constant liar each counts as running for the next
            asked = [study.ask(distributions).params for _ in range(self._popsize)]
        return [_external(self._space, params) for params in asked]

    # -- state ------------------------------------------------------------------------------------

    def _algorithm_state(self) -> dict[str, Any]:
        return {"trials": [{"params": dict(p), "score": s} for p, s in self._trials]}

    def _parse_algorithm_state(self, d: Any, *, pending: list[dict[str, Any]] | None) -> list:
        _check_keys(d, _ALGORITHM_KEYS, "the tpe algorithm state")
        items = _get(d, "trials")
        if not isinstance(items, list):
            raise ValueError(f"trials must be a list, got {type(items).__name__}")
        trials = []
        for i, item in enumerate(items):
            _check_keys(item, _TRIAL_KEYS, f"the tpe algorithm state's trials[{i}]")
            params = dict(_get(item, "params"))
            self._space.normalize(params)  # legal values of this space, or ValueError
            trials.append((params, _opt_float(_get(item, "score"), f"trials[{i}] score")))
        if len(trials) % self._popsize:
            raise ValueError(f"{len(trials)} told trials is not a whole number of rounds of {self._popsize}")
        return trials

    def _restore_algorithm_state(self, records: list) -> None:
        self._trials = list(records)


# --- the space in Optuna's terms ---------------------------------------------------------------


def _distribution(p: Any) -> Any:
    from optuna.distributions import CategoricalDistribution, FloatDistribution

    if isinstance(p, ChoiceParam):
        return CategoricalDistribution(tuple(range(len(p.values))))
    if isinstance(p, IntParam):  # continuous, rounded: see the module docstring
        return FloatDistribution(p.low - 0.5, p.high + 0.5, log=p.log)
    assert isinstance(p, FloatParam)
    return FloatDistribution(p.low, p.high, log=p.log)


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
    """Drop Optuna's "A new study created in memory" line (one a round otherwise), and only it."""
    logger = logging.getLogger("optuna.storages._in_memory")
    quiet = _DropInfo()
    logger.addFilter(quiet)
    try:
        yield
    finally:
        logger.removeFilter(quiet)


class _DropInfo(logging.Filter):
    def filter(self, record: logging.LogRecord) -> bool:
        return record.levelno > logging.INFO
