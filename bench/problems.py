"""Benchmark problems for the tuner benchmark (`bench/tuners.py`).

Each problem is a search space in the hparam.yaml format (a `param_list`, the same
dicts that `tuners.SearchSpace.from_dict` reads) plus an objective in natural units:
a value to minimise for the synthetic functions, the validation accuracy (to
maximise) for the digits task. Tuners maximise a score; `Problem.score` maps the
natural value onto "higher is better".

The init values are sensible but deliberately non-optimal starting points: the
domain centre where the centre is not the optimum, the library defaults for digits.
Every method that accepts a starting point gets the same one.
"""

from __future__ import annotations

import functools
import math
import warnings
from dataclasses import dataclass
from typing import Any, Callable

import numpy as np

__all__ = ["Problem", "PROBLEMS"]


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


PROBLEMS: dict[str, Problem] = {
    p.name: p
    for p in [
        Problem("branin", _BRANIN_SPACE, _branin, "min", 0.397887, "f(x)", description="Branin, 2-D"),
        Problem("hartmann6", _floats([f"x{i}" for i in range(6)], 0.0, 1.0, 0.5), _hartmann6,
                "min", -3.32237, "f(x)", description="Hartmann6, [0,1]^6"),
        Problem("rosenbrock5", _floats([f"x{i}" for i in range(5)], -5.0, 10.0, 2.5), _rosenbrock,
                "min", 0.0, "f(x)", description="Rosenbrock 5-D, [-5,10]^5"),
        Problem("rastrigin4", _floats([f"x{i}" for i in range(4)], -5.12, 5.12, 2.5), _rastrigin,
                "min", 0.0, "f(x)", description="Rastrigin 4-D, [-5.12,5.12]^4, start 2.5"),
        Problem("mixed", _MIXED_SPACE, _mixed, "min", 0.0, "f(x)",
                description="2 ints (wide), log float, float, 4-way choice; f*=0"),
        Problem("digits", _DIGITS_SPACE, _digits, "max", None, "val. accuracy",
                budgets=((5, 10),), description="MLPClassifier on sklearn digits",
                prepare=_digits_split),
    ]
}
