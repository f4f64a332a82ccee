"""Benchmark problems for the tuner benchmark (`bench/tuners.py`).

Each problem is a search space in the hparam.yaml format (a `param_list`, the same
dicts that `tuners.SearchSpace.from_dict` reads) plus an objective in natural units:
a value to minimise for the synthetic functions, the validation accuracy (to
maximise) for the digits task. Tuners maximise a score; `Problem.score` maps the
natural value onto "higher is better".

The init values are sensible but deliberately non-optimal starting points: the
domain centre where the centre is not the optimum, the library defaults for the real tasks.
Every synthetic problem also has a ``-poor`` variant started at a corner or bound far from
the optimum (a learning rate copied from another model, a batch size at a bound). Every
method that accepts a starting point gets the same one. The real tasks: digits (an MLP) and
cancer (gradient boosting), both on data that ships with scikit-learn.
"""

from __future__ import annotations

import dataclasses
import functools
import math
import warnings
from dataclasses import dataclass
from typing import Any, Callable

import numpy as np

__all__ = ["Problem", "PROBLEMS", "REAL_PROBLEMS"]


@dataclass(frozen=True)
class Problem:
    name: str
    param_list: tuple[dict[str, Any], ...]  # hparam.yaml entries, as SearchSpace.from_dict reads them
    objective: Callable[[dict[str, Any]], float]  # params -> value in natural units
    sense: str  # "min": lower value is better; "max": higher value is better
    optimum: float | None  # best attainable value, if known (for regret)
    unit: str  # what the reported value is, for the tables
    budgets: tuple[tuple[int, int], ...] | None = None  # (popsize, rounds) it runs at; None = all
    description: str = ""
    prepare: Callable[[], Any] | None = None  # one-time setup (imports, data), kept out of timings

    def score(self, value: float) -> float:
        """The tuner's score: higher is better."""
        return -value if self.sense == "min" else value

    def space_dict(self) -> dict[str, Any]:
        return {"param_list": [dict(p) for p in self.param_list]}

    def regret(self, value: float) -> float | None:
        if self.optimum is None:
            return None
        return value - self.optimum if self.sense == "min" else self.optimum - value

    def better(self, a: float, b: float) -> bool:
        """True if value a is strictly better than value b."""
        return a < b if self.sense == "min" else a > b


def _floats(names, low, high, init) -> tuple[dict[str, Any], ...]:
    return tuple(
        {"name": n, "type": "float", "init_value": init, "greater_than": low, "lower_than": high}
        for n in names
    )


def _vector(params: dict[str, Any], n: int) -> np.ndarray:
    return np.array([params[f"x{i}"] for i in range(n)], dtype=float)


# --- Branin, 2-D: x0 in [-5, 10], x1 in [0, 15]; f* = 0.397887 at 3 points -------------

def _branin(params: dict[str, Any]) -> float:
    x1, x2 = params["x0"], params["x1"]
    b, c, t = 5.1 / (4 * math.pi**2), 5 / math.pi, 1 / (8 * math.pi)
    return (x2 - b * x1**2 + c * x1 - 6) ** 2 + 10 * (1 - t) * math.cos(x1) + 10


_BRANIN_SPACE = (
    {"name": "x0", "type": "float", "init_value": 2.5, "greater_than": -5.0, "lower_than": 10.0},
    {"name": "x1", "type": "float", "init_value": 7.5, "greater_than": 0.0, "lower_than": 15.0},
)

# --- Hartmann6, [0, 1]^6; f* = -3.32237 ----------------------------------------------

_H6_ALPHA = np.array([1.0, 1.2, 3.0, 3.2])
_H6_A = np.array(
    [
        [10, 3, 17, 3.5, 1.7, 8],
        [0.05, 10, 17, 0.1, 8, 14],
        [3, 3.5, 1.7, 10, 17, 8],
        [17, 8, 0.05, 10, 0.1, 14],
    ]
)
_H6_P = 1e-4 * np.array(
    [
        [1312, 1696, 5569, 124, 8283, 5886],
        [2329, 4135, 8307, 3736, 1004, 9991],
        [2348, 1451, 3522, 2883, 3047, 6650],
        [4047, 8828, 8732, 5743, 1091, 381],
    ]
)


def _hartmann6(params: dict[str, Any]) -> float:
    x = _vector(params, 6)
    return float(-np.sum(_H6_ALPHA * np.exp(-np.sum(_H6_A * (x - _H6_P) ** 2, axis=1))))


# --- Rosenbrock 5-D on [-5, 10]^5; f* = 0 at (1, ..., 1) -----------------------------

def _rosenbrock(params: dict[str, Any]) -> float:
    x = _vector(params, 5)
    return float(np.sum(100 * (x[1:] - x[:-1] ** 2) ** 2 + (1 - x[:-1]) ** 2))


# --- Rastrigin 4-D on [-5.12, 5.12]^4; f* = 0 at the origin --------------------------
# The centre is the optimum, so the start is (2.5, ..., 2.5), halfway to the edge.

def _rastrigin(params: dict[str, Any]) -> float:
    x = _vector(params, 4)
    return float(10 * len(x) + np.sum(x**2 - 10 * np.cos(2 * np.pi * x)))


# --- Mixed: two wide ints, a log-scale float, a plain float and a choice ----------------
# f* = 0 at units=300, layers=4, lr=1e-3, dropout=0.25, activation="gelu".
# The lr optimum moves with the depth (a coupling term), as learning rates do.

_MIXED_ACTIVATION_PENALTY = {"relu": 0.5, "tanh": 1.0, "gelu": 0.0, "sigmoid": 2.0}

_MIXED_SPACE = (
    {"name": "units", "type": "int", "init_value": 128, "greater_than": 16, "lower_than": 1024},
    {"name": "layers", "type": "int", "init_value": 2, "greater_than": 1, "lower_than": 12},
    {"name": "lr", "type": "float", "log": True, "init_value": 1e-2, "greater_than": 1e-6, "lower_than": 1.0},
    {"name": "dropout", "type": "float", "init_value": 0.5, "greater_than": 0.0, "lower_than": 0.9},
    {"name": "activation", "type": "choice", "init_value": "relu", "values": ["relu", "tanh", "gelu", "sigmoid"]},
)


def _mixed(params: dict[str, Any]) -> float:
    units, layers = params["units"], params["layers"]
    log_lr = math.log10(params["lr"])
    return (
        ((units - 300) / 150) ** 2
        + (layers - 4) ** 2 / 4
        + (log_lr + 3 + 0.25 * (layers - 4)) ** 2
        + ((params["dropout"] - 0.25) / 0.2) ** 2
        + _MIXED_ACTIVATION_PENALTY[params["activation"]]
    )


# --- Digits: a real (small) training task -------------------------------------------
# scikit-learn's bundled 8x8 digits, a fixed stratified 50/50 train/validation split, a
# one-hidden-layer MLP trained with Adam for a few epochs; the score is the validation
# accuracy (899 samples: steps of 0.0011). The MLP's own seed is fixed, so the objective
# is deterministic and the seeds vary only the tuner.
#
# The epoch budget is deliberately short. At 40 epochs on a 70/30 split (~0.15 s/eval)
# the task saturates: a few percent of the space reaches the top accuracy, so the best
# of 50 random trials already ties it and every method scored the same median (0.9833).
# With 5 epochs the learning rate and batch size must fit together (a narrow ridge) and
# random search stays ~0.005-0.01 below the best known value, at ~0.02 s/eval.

_DIGITS_MAX_ITER = 5  # epochs (Adam)


@functools.cache
def _digits_split():
    from sklearn.datasets import load_digits
    from sklearn.model_selection import train_test_split

    from sklearn.neural_network import MLPClassifier  # noqa: F401  (import once, before timing)

    X, y = load_digits(return_X_y=True)
    return train_test_split(X / 16.0, y, test_size=0.5, random_state=0, stratify=y)


def _digits(params: dict[str, Any]) -> float:
    from sklearn.exceptions import ConvergenceWarning
    from sklearn.neural_network import MLPClassifier

    X_train, X_val, y_train, y_val = _digits_split()
    model = MLPClassifier(
        hidden_layer_sizes=(int(params["hidden"]),),
        learning_rate_init=float(params["learning_rate_init"]),
        alpha=float(params["alpha"]),
        batch_size=int(params["batch_size"]),
        max_iter=_DIGITS_MAX_ITER,
        random_state=0,
    )
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", ConvergenceWarning)  # a 5-epoch budget never converges
        model.fit(X_train, y_train)
    return float(model.score(X_val, y_val))


_DIGITS_SPACE = (
    {"name": "learning_rate_init", "type": "float", "log": True, "init_value": 1e-3, "greater_than": 1e-5, "lower_than": 1.0},
    {"name": "alpha", "type": "float", "log": True, "init_value": 1e-4, "greater_than": 1e-7, "lower_than": 10.0},
    {"name": "hidden", "type": "int", "init_value": 100, "greater_than": 4, "lower_than": 256},
    {"name": "batch_size", "type": "int", "init_value": 200, "greater_than": 16, "lower_than": 512},
)


# --- Rotated ellipsoid 5-D on [-5, 5]^5: ill-conditioned (axis ratio 100); f* = 0 at X_STAR --
# f(x) = sum_i 10^(4 i / (n - 1)) (R (x - x*))_i^2 with a fixed random rotation R: the valley
# is narrow and oblique, so a search must learn the correlations (CMA-ES's covariance) or
# crawl; from a poor start an isotropic sigma of 0.2 of the box walks slowly.

_ELLIPSOID_N = 5
_ELLIPSOID_SCALES = 10.0 ** (4.0 * np.arange(_ELLIPSOID_N) / (_ELLIPSOID_N - 1))
_ELLIPSOID_ROTATION = np.linalg.qr(np.random.default_rng(7).normal(size=(_ELLIPSOID_N, _ELLIPSOID_N)))[0]
_ELLIPSOID_OPTIMUM = np.array([1.5, -2.0, 0.5, 2.5, -1.0])


def _ellipsoid(params: dict[str, Any]) -> float:
    z = _ELLIPSOID_ROTATION @ (_vector(params, _ELLIPSOID_N) - _ELLIPSOID_OPTIMUM)
    return float(np.sum(_ELLIPSOID_SCALES * z**2))


# --- Plateau 4-D: a training run that diverges; f* = 0 -----------------------------------
# A learning rate (log), a weight decay (log), a dropout and a momentum. Where the learning
# rate is too large for the momentum (log10 lr + momentum > -1) training "diverges" and the
# value is the chance level, 10, everywhere; it is 10 too wherever the bowl around the optimum
# (lr 10^-2.2, wd 1e-4, dropout 0.3, momentum 0.7; the best lr just below the divergence edge,
# as in practice) exceeds 10: a large flat region around a basin.

_PLATEAU_CHANCE = 10.0
_PLATEAU_SPACE = (
    {"name": "lr", "type": "float", "log": True, "init_value": 1e-3, "greater_than": 1e-5, "lower_than": 1.0},
    {"name": "wd", "type": "float", "log": True, "init_value": 1e-4, "greater_than": 1e-6, "lower_than": 0.1},
    {"name": "dropout", "type": "float", "init_value": 0.5, "greater_than": 0.0, "lower_than": 1.0},
    {"name": "momentum", "type": "float", "init_value": 0.5, "greater_than": 0.0, "lower_than": 1.0},
)


def _plateau(params: dict[str, Any]) -> float:
    u, v = math.log10(params["lr"]), math.log10(params["wd"])
    a, b = params["dropout"], params["momentum"]
    if u + b > -1.0:
        return _PLATEAU_CHANCE  # diverged
    bowl = (u + 2.2) ** 2 + ((v + 4.0) / 2) ** 2 + ((a - 0.3) / 0.3) ** 2 + ((b - 0.7) / 0.3) ** 2
    return min(bowl, _PLATEAU_CHANCE)


# --- Breast cancer: a second real training task ---------------------------------------
# scikit-learn's bundled breast cancer data (569 samples, 30 features), a fixed stratified
# 50/50 split, gradient-boosted trees; the score is the validation log-loss (lower is better:
# accuracy on 285 samples saturates, every method tied at ~0.965). Fixed random_state: the
# objective is deterministic. ~2-60 ms a fit (~25 ms on average over the space).


@functools.cache
def _cancer_split():
    from sklearn.datasets import load_breast_cancer
    from sklearn.ensemble import GradientBoostingClassifier  # noqa: F401  (import once, before timing)
    from sklearn.model_selection import train_test_split

    X, y = load_breast_cancer(return_X_y=True)
    return train_test_split(X, y, test_size=0.5, random_state=0, stratify=y)


def _cancer(params: dict[str, Any]) -> float:
    from sklearn.ensemble import GradientBoostingClassifier
    from sklearn.metrics import log_loss

    X_train, X_val, y_train, y_val = _cancer_split()
    model = GradientBoostingClassifier(
        learning_rate=float(params["learning_rate"]),
        n_estimators=int(params["n_estimators"]),
        max_depth=int(params["max_depth"]),
        subsample=float(params["subsample"]),
        min_samples_leaf=int(params["min_samples_leaf"]),
        random_state=0,
    )
    model.fit(X_train, y_train)
    return float(log_loss(y_val, model.predict_proba(X_val)))


_CANCER_SPACE = (
    {"name": "learning_rate", "type": "float", "log": True, "init_value": 0.1, "greater_than": 1e-3, "lower_than": 1.0},
    {"name": "n_estimators", "type": "int", "init_value": 30, "greater_than": 5, "lower_than": 60},
    {"name": "max_depth", "type": "int", "init_value": 3, "greater_than": 1, "lower_than": 5},
    {"name": "subsample", "type": "float", "init_value": 1.0, "greater_than": 0.2, "lower_than": 1.0},
    {"name": "min_samples_leaf", "type": "int", "init_value": 1, "greater_than": 1, "lower_than": 40},
)


def _poor(problem: Problem, init: dict[str, Any], where: str) -> Problem:
    """``problem`` started at ``init`` (a corner or a bound, far from the optimum)."""
    param_list = tuple(dict(p, init_value=init[p["name"]]) for p in problem.param_list)
    return dataclasses.replace(problem, name=f"{problem.name}-poor", param_list=param_list,
                               description=f"{problem.description}; poor init: {where}")


def _corner(problem: Problem, value: float) -> dict[str, Any]:
    return {p["name"]: value for p in problem.param_list}


_REAL_BUDGETS = ((5, 10), (8, 25))

_GOOD = [
    Problem("branin", _BRANIN_SPACE, _branin, "min", 0.397887, "f(x)", description="Branin, 2-D"),
    Problem("hartmann6", _floats([f"x{i}" for i in range(6)], 0.0, 1.0, 0.5), _hartmann6,
            "min", -3.32237, "f(x)", description="Hartmann6, [0,1]^6"),
    Problem("rosenbrock5", _floats([f"x{i}" for i in range(5)], -5.0, 10.0, 2.5), _rosenbrock,
            "min", 0.0, "f(x)", description="Rosenbrock 5-D, [-5,10]^5"),
    Problem("rastrigin4", _floats([f"x{i}" for i in range(4)], -5.12, 5.12, 2.5), _rastrigin,
            "min", 0.0, "f(x)", description="Rastrigin 4-D, [-5.12,5.12]^4, start 2.5"),
    Problem("mixed", _MIXED_SPACE, _mixed, "min", 0.0, "f(x)",
            description="2 ints (wide), log float, float, 4-way choice; f*=0"),
    Problem("ellipsoid5", _floats([f"x{i}" for i in range(5)], -5.0, 5.0, 0.0), _ellipsoid, "min", 0.0, "f(x)",
            description="rotated ellipsoid 5-D, axis ratio 100, [-5,5]^5"),
    Problem("plateau4", _PLATEAU_SPACE, _plateau, "min", 0.0, "f(x)",
            description="lr/wd/dropout/momentum, flat (chance = 10) where training diverges"),
]
_BY_NAME = {p.name: p for p in _GOOD}
_POOR = [
    _poor(_BY_NAME["branin"], {"x0": -5.0, "x1": 0.0}, "corner (-5, 0)"),
    _poor(_BY_NAME["hartmann6"], _corner(_BY_NAME["hartmann6"], 1.0), "corner (1, ..., 1)"),
    _poor(_BY_NAME["rosenbrock5"], _corner(_BY_NAME["rosenbrock5"], 10.0), "corner (10, ..., 10)"),
    _poor(_BY_NAME["rastrigin4"], _corner(_BY_NAME["rastrigin4"], 5.12), "corner (5.12, ..., 5.12)"),
    _poor(_BY_NAME["mixed"], {"units": 1024, "layers": 12, "lr": 1.0, "dropout": 0.9, "activation": "sigmoid"},
          "every bound at its far end, worst choice"),
    _poor(_BY_NAME["ellipsoid5"], {"x0": -5.0, "x1": 5.0, "x2": -5.0, "x3": -5.0, "x4": 5.0},
          "the corner opposite the optimum"),
    _poor(_BY_NAME["plateau4"], {"lr": 0.3, "wd": 0.1, "dropout": 1.0, "momentum": 1.0},
          "diverged (flat), every bound at its far end"),
]
_REAL = [
    Problem("digits", _DIGITS_SPACE, _digits, "max", None, "val. accuracy",
            budgets=_REAL_BUDGETS, description="MLPClassifier on sklearn digits",
            prepare=_digits_split),
    Problem("cancer", _CANCER_SPACE, _cancer, "min", None, "val. log-loss",
            budgets=_REAL_BUDGETS, description="GradientBoostingClassifier on sklearn breast cancer",
            prepare=_cancer_split),
]

PROBLEMS: dict[str, Problem] = {p.name: p for p in [*_GOOD, *_POOR, *_REAL]}
REAL_PROBLEMS = tuple(p.name for p in _REAL)
