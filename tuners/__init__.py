"""Pure search logic: the search space (hparam.yaml) and the ask/tell tuners.

numpy, the `cmaes` library and Optuna only: no Prefect, no files (but reading hparam.yaml), no clock.
cmaes (and the scipy that its package imports) is loaded by the first HAZero, Optuna by the
first TPE that models, neither by ``import tuners``.

    from tuners import SearchSpace, make_tuner
    space = SearchSpace.from_yaml("hparam.yaml")
    tuner = make_tuner("hazero", space, popsize=5, seed=0)     # or "pshe2", "tpe"
    for _ in range(rounds):
        candidates = tuner.ask()       # popsize dicts {name: value}, legal values of the space
        tuner.tell(scores)             # floats aligned with candidates, higher is better; None = failed;
                                       # Pruned(step, value) = stopped early (below scores, above failures)
    best_params, best_score = tuner.best
    state = tuner.state_dict()         # JSON; make_tuner(...).load_state_dict(state) continues exactly
"""

from __future__ import annotations

from typing import Any

from tuners._base import TUNER_STATE_VERSION, Pruned, Tuner, TunerStateError, TunerStateVersionError
from tuners.hazero import HAZero, HAZeroConfig
from tuners.pshe2 import PSHE2, PSHE2Config
from tuners.tpe import TPE, TPEConfig
from tuners.space import ChoiceParam, FloatParam, IntParam, Param, SearchSpace, SearchSpaceError

__all__ = [
    "SearchSpace", "SearchSpaceError", "FloatParam", "IntParam", "ChoiceParam", "Param",
    "make_tuner", "TUNER_NAMES", "Tuner", "HAZero", "HAZeroConfig", "PSHE2", "PSHE2Config", "TPE", "TPEConfig",
    "TunerStateError", "TunerStateVersionError", "TUNER_STATE_VERSION", "Pruned",
]

_TUNERS: dict[str, type[Tuner]] = {"hazero": HAZero, "pshe2": PSHE2, "tpe": TPE}
TUNER_NAMES: tuple[str, ...] = tuple(_TUNERS)


def make_tuner(name: str, space: SearchSpace, *, popsize: int, seed: int | None = None,
               config: Any = None) -> Tuner:
    """A new tuner by name (case-insensitive): ``"hazero"``, ``"pshe2"`` or ``"tpe"``.

    ``seed=None`` draws a fresh seed (recorded in the state); ``config=None`` takes the
    algorithm's defaults (:class:`HAZeroConfig`, :class:`PSHE2Config`, :class:`TPEConfig`).
    """
    key = name.strip().lower() if isinstance(name, str) else None
    if key not in _TUNERS:
        raise ValueError(f"unknown tuner {name!r}; choose one of: {', '.join(TUNER_NAMES)}")
    return _TUNERS[key](space=space, popsize=popsize, seed=seed, config=config)
