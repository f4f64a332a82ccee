"""HAZero: CMA-ES in the normalized box, with margin for integer and choice parameters.

CMA-ES (Hansen, "The CMA Evolution Strategy: A Tutorial", 2016) samples each round from a
multivariate normal N(m, σ²C), ranks the candidates, and moves the mean m towards the better
ones while it adapts the step size σ and the covariance C to the shape of the landscape (the
tutorial's eqs. 41-47; the `cmaes` library cites them line by line). PaddleHub's HAZero ran it
on the box [-1, 1]^n with σ₀ = 0.2, one CMA-ES generation per round, popsize = λ.

The CMA-ES itself is the `cmaes` library (CyberAgentAILab/cmaes): small, numpy-only,
maintained, ask/tell, and its state is a handful of numpy arrays we can write to JSON
ourselves. pycma, which the original used, refuses a one-dimensional problem; `cmaes` runs
n = 1 as is (no padding dimension is needed).

Departures from the original, each for a defect or a gap:

- **One hyperparameter works** (see above).
- **Integers and choices use CMA-ES with margin** (`CMAwM`; Hamano et al., GECCO 2022): a
  discrete axis keeps a minimum probability of leaving its current value, so the search does
  not stall once σ shrinks below the spacing of the values. Steps are in box units: an int
  range [lo, hi] has step 2 / (hi - lo); k choices have step 2 / k between bin centres.
  A log-scale int is not evenly spaced in the box, so it is searched as continuous and
  rounded (the restarts below keep it from stalling for good).
- **The first candidate is the user's init_value, exactly** (``space.init_params()``), so the
  result is never worse than the starting point. CMA-ES is told the init point's normalized
  vector with its score: a legal sample (it simply lies at the mean), so the update stays
  a proper CMA-ES update.
- **Failures rank below every real score** (the original scored a crash 0.0, which could win).
  cmaes minimizes f = -score; a failed trial gets f = f_worst + 1 + |f_worst|, strictly worse
  than the worst real score of its generation (all failures tie). A generation in which every
  trial failed carries no ranking, so it is not told: the next round samples the same
  distribution again (its random stream has moved on, so the candidates are new).
- **Restarts instead of wasted rounds**: when the distribution has converged (cmaes's
  ``should_stop``, or every axis' σ·sqrt(C_ii) below ``restart_tol_sigma``, or the scores of
  the last generations flat within ``restart_tol_fitness``), or after
  ``restart_failed_generations`` all-failed generations in a row, CMA-ES restarts at a random
  point of the box with σ₀. The population size stays fixed (no IPOP doubling: the pipeline's
  popsize is the number of GPU slots); the best so far is kept.
- **popsize below 4**: CMA-ES needs λ ≥ 4 for a non-zero rank-μ learning rate; with a smaller
  popsize one generation spans several rounds (λ = the smallest multiple of popsize ≥ 4).
- **Seed and full state**: the CMA-ES internals, including its own numpy RNG (which cmaes
  drops when pickled), are written to the JSON state, so a restored search continues
  bit-identically.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

import cmaes
import numpy as np
from cmaes import CMAwM

from tuners._base import Tuner, TunerStateError, _get, _int, _matrix, _opt_float

__all__ = ["HAZero", "HAZeroConfig"]

# The smallest CMA-ES population: with λ < 4, cmaes's rank-μ learning rate is 0 (μ_eff = 1).
_MIN_GENERATION_SIZE = 4


@dataclass(frozen=True)
class HAZeroConfig:
    """HAZero's constants (all in units of the normalized box [-1, 1]^n)."""

    sigma: float = 0.2  # initial step size σ₀, the original's
    mean_inset: float = 0.1  # start/restart means stay this far inside the box: fewer samples past a bound
    restart_tol_sigma: float = 1e-3  # restart when σ·sqrt(C_ii) < this on every axis (converged)
    restart_tol_fitness: float = 1e-12  # ...or when the last generations' scores all lie within this (flat)
    restart_flat_generations: int = 3  # how many generations the flatness test looks back
    restart_failed_generations: int = 2  # ...or after this many generations in a row where every trial failed

    def __post_init__(self) -> None:
        if not (math.isfinite(self.sigma) and 0 < self.sigma <= 2):
            raise ValueError(f"sigma must be in (0, 2] (box units), got sigma={self.sigma!r}")
        if not (math.isfinite(self.mean_inset) and 0 <= self.mean_inset < 1):
            raise ValueError(f"mean_inset must be in [0, 1), got mean_inset={self.mean_inset!r}")
        if not (math.isfinite(self.restart_tol_sigma) and self.restart_tol_sigma >= 0):
            raise ValueError("restart_tol_sigma must be >= 0, "
                             f"got restart_tol_sigma={self.restart_tol_sigma!r}")
        if not (math.isfinite(self.restart_tol_fitness) and self.restart_tol_fitness >= 0):
            raise ValueError("restart_tol_fitness must be >= 0, "
                             f"got restart_tol_fitness={self.restart_tol_fitness!r}")
        for field in ("restart_flat_generations", "restart_failed_generations"):
            value = getattr(self, field)
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ValueError(f"{field} must be an int >= 1, got {field}={value!r}")


class HAZero(Tuner):
    """CMA-ES (with margin) over the search space's box; see the module docstring.

    ``HAZero(space=..., popsize=5, seed=0)`` or ``make_tuner("hazero", space, popsize=5, seed=0)``.
    """

    name = "hazero"
    config_type = HAZeroConfig

    def _start(self) -> None:
        params = self._space.params
        # CMAwM's box per axis: [-1, 1] for continuous axes, first..last value for discrete ones
        self._bounds = np.array([p.grid_bounds for p in params], dtype=np.float64)
        self._steps = np.array([p.step or 0.0 for p in params], dtype=np.float64)  # 0: continuous
        inset = np.where(self._steps > 0, 0.0, self._config.mean_inset)
        self._mean_low = self._bounds[:, 0] + inset
        self._mean_high = self._bounds[:, 1] - inset
        self._generation_size = self._popsize * math.ceil(_MIN_GENERATION_SIZE / self._popsize)
        mean = np.clip(self._space.init_vector(), self._mean_low, self._mean_high)
        self._optimizer = self._new_optimizer(mean)
        self._generation: list[tuple[np.ndarray, float | None]] = []  # (x told, f or None) of this generation
        self._pending_x: list[np.ndarray] | None = None  # what CMA-ES will be told for each pending candidate
        self._restarts = 0
        self._recent_ranges: list[tuple[float, float]] = []  # (min f, max f) of the last generations
        self._failed_generations = 0  # all-failed generations in a row

    @property
    def restarts(self) -> int:
        """How many times CMA-ES restarted from a fresh point."""
        return self._restarts

    @property
    def generation_size(self) -> int:
        """CMA-ES's population λ: popsize, or the smallest multiple of it >= 4."""
        return self._generation_size

    def _new_optimizer(self, mean: np.ndarray) -> CMAwM:
        optimizer = CMAwM(mean=mean, sigma=self._config.sigma, bounds=self._bounds.copy(),
                          steps=self._steps.copy(), population_size=self._generation_size,
                          seed=int(self._rng.integers(2**32)))
        # cmaes allocates this with np.empty and reads an entry only after writing it; zero it
        # so that the saved state does not depend on leftover memory.
        optimizer._cma._funhist_values[:] = 0.0
        return optimizer

    # -- ask / tell ---------------------------------------------------------------------------

    def _propose(self) -> list[dict[str, Any]]:
        candidates, told = [], []
        for i in range(self._popsize):
            if self._rounds_told == 0 and i == 0:
                x_eval = x_tell = self._space.init_vector()
                candidates.append(self._space.init_params())  # exactly, not via float round-trips
            else:
                x_eval, x_tell = self._optimizer.ask()  # x_eval: on the discrete grid; x_tell: raw sample
                candidates.append(self._space.denormalize(x_eval))
            told.append(np.array(x_tell, dtype=np.float64))
        self._pending_x = told
        return candidates

    def _update(self, scores: list[float | None]) -> None:
        assert self._pending_x is not None
        for x, score in zip(self._pending_x, scores):
            self._generation.append((x, None if score is None else -score))  # cmaes minimizes f = -score
        self._pending_x = None
        if len(self._generation) < self._generation_size:
            return  # a generation spans several rounds (popsize < 4)
        generation, self._generation = self._generation, []
        fs = [f for _, f in generation if f is not None]
        if not fs:
            # every trial failed: no ranking to learn from; sample the same distribution again
            self._failed_generations += 1
            if self._failed_generations >= self._config.restart_failed_generations:
                self._restart()
            return
        self._failed_generations = 0
        worst = max(fs)
        f_failed = worst + 1.0 + abs(worst)  # strictly worse than every real score of the generation
        self._optimizer.tell([(x, f_failed if f is None else f) for x, f in generation])
        k = self._config.restart_flat_generations
        self._recent_ranges = (self._recent_ranges + [(min(fs), max(fs))])[-k:]
        if self._converged():
            self._restart()

    def _converged(self) -> bool:
        cma = self._optimizer._cma  # cmaes exposes no public σ or C
        if self._optimizer.should_stop():
            return True
        if cma._sigma * math.sqrt(float(np.max(np.diag(cma._C)))) < self._config.restart_tol_sigma:
            return True
        if len(self._recent_ranges) == self._config.restart_flat_generations:
            low = min(r[0] for r in self._recent_ranges)
            high = max(r[1] for r in self._recent_ranges)
            if high - low <= self._config.restart_tol_fitness:
                return True
        return False

    def _restart(self) -> None:
        # a fresh start at a uniform random point of the (inset) box, same λ and σ₀
        u = self._rng.random(self._space.dim)
        mean = self._mean_low + u * (self._mean_high - self._mean_low)
        self._optimizer = self._new_optimizer(mean)
        self._restarts += 1
        self._recent_ranges = []
        self._failed_generations = 0

    # -- state ------------------------------------------------------------------------------------

    def _algorithm_state(self) -> dict[str, Any]:
        optimizer = self._optimizer
        rng_state = optimizer._cma._rng.get_state(legacy=False)
        return {
            "cmaes_version": getattr(cmaes, "__version__", None),  # informative; load checks the layout
            "generation_size": self._generation_size,
            "optimizer": {
                "cma_with_margin": {k: _encode(v) for k, v in optimizer.__dict__.items() if k != "_cma"},
                "cma": {k: _encode(v) for k, v in optimizer._cma.__dict__.items() if k != "_rng"},
                "rng": {"bit_generator": rng_state["bit_generator"],
                        "state": {"key": rng_state["state"]["key"].tolist(),
                                  "pos": int(rng_state["state"]["pos"])},
                        "has_gauss": int(rng_state["has_gauss"]), "gauss": float(rng_state["gauss"])},
            },
            "generation": [{"x": x.tolist(), "f": f} for x, f in self._generation],
            "pending_x": None if self._pending_x is None else [x.tolist() for x in self._pending_x],
            "restarts": self._restarts,
            "recent_ranges": [list(r) for r in self._recent_ranges],
            "failed_generations": self._failed_generations,
        }

    def _parse_algorithm_state(self, d: Any, common: dict[str, Any]) -> dict[str, Any]:
        n = self._space.dim
        size = _get(d, "generation_size")
        if size != self._generation_size:
            raise ValueError(f"generation_size={size!r}, expected {self._generation_size}")
        optimizer = self._load_optimizer(_get(d, "optimizer"))
        generation = []
        for item in _get(d, "generation"):
            generation.append((_matrix(_get(item, "x"), "generation x", (n,)),
                               _opt_float(_get(item, "f"), "f")))
        if len(generation) >= self._generation_size or len(generation) % self._popsize:
            raise ValueError(f"{len(generation)} told samples in the current generation "
                             f"of {self._generation_size}")
        pending_x = _get(d, "pending_x")
        if (pending_x is None) != (common["_pending"] is None):
            raise ValueError("pending candidates and their CMA-ES samples disagree")
        if pending_x is not None:
            pending_x = [_matrix(x, "pending_x", (n,)) for x in pending_x]
            if len(pending_x) != self._popsize:
                raise ValueError(f"{len(pending_x)} pending samples for popsize {self._popsize}")
        recent = [(float(lo), float(hi)) for lo, hi in _get(d, "recent_ranges")]
        if len(recent) > self._config.restart_flat_generations:
            raise ValueError(f"{len(recent)} recent generations, "
                             f"at most {self._config.restart_flat_generations}")
        return {"_optimizer": optimizer, "_generation": generation, "_pending_x": pending_x,
                "_restarts": _int(_get(d, "restarts"), "restarts"), "_recent_ranges": recent,
                "_failed_generations": _int(_get(d, "failed_generations"), "failed_generations")}

    def _load_optimizer(self, d: Any) -> CMAwM:
        # A reference optimizer of the same layout; its attributes are then replaced by the saved ones.
        reference = CMAwM(mean=(self._mean_low + self._mean_high) / 2, sigma=self._config.sigma,
                          bounds=self._bounds.copy(), steps=self._steps.copy(),
                          population_size=self._generation_size, seed=0)
        wm = {k: _decode(v) for k, v in _get(d, "cma_with_margin").items()}
        cma = {k: _decode(v) for k, v in _get(d, "cma").items()}
        expected_wm = set(reference.__dict__) - {"_cma"}
        expected_cma = set(reference._cma.__dict__) - {"_rng"}
        if set(wm) != expected_wm or set(cma) != expected_cma:
            differ = sorted((set(wm) ^ expected_wm) | (set(cma) ^ expected_cma))
            raise TunerStateError(
                f"the CMA-ES state does not fit cmaes {getattr(cmaes, '__version__', '?')} "
                f"(attributes {differ} differ): written by another cmaes version, or corrupt")
        n = self._space.dim
        for key, shape in (("_mean", (n,)), ("_C", (n, n)), ("_p_sigma", (n,)), ("_pc", (n,))):
            _matrix(cma[key], key, shape)
        if cma["_popsize"] != self._generation_size or cma["_n_dim"] != n:
            raise ValueError(f"CMA-ES has λ={cma['_popsize']!r}, n={cma['_n_dim']!r}; "
                             f"expected {self._generation_size}, {n}")
        rng_state = _get(d, "rng")
        state = dict(rng_state)
        state["state"] = {"key": np.array(_get(rng_state["state"], "key"), dtype=np.uint32),
                          "pos": int(_get(rng_state["state"], "pos"))}
        reference._cma._rng.set_state(state)
        reference.__dict__.update(wm)
        reference._cma.__dict__.update(cma)
        return reference


# --- numpy values <-> JSON -------------------------------------------------------------


def _encode(v: Any) -> Any:
    """A cmaes attribute as JSON: arrays and numpy scalars keep their dtype, so they come back exact."""
    if v is None or isinstance(v, (bool, str)):
        return v
    if isinstance(v, np.ndarray):
        return {"ndarray": v.dtype.str, "shape": list(v.shape), "data": v.ravel().tolist()}
    if isinstance(v, np.generic):
        return {"numpy": v.dtype.str, "value": v.item()}
    if isinstance(v, (int, float)):
        if isinstance(v, float) and not math.isfinite(v):
            raise ValueError(f"cannot write the non-finite value {v!r} to JSON")
        return v
    raise TypeError(f"cannot write a {type(v).__name__} of the CMA-ES state to JSON")


def _decode(v: Any) -> Any:
    if isinstance(v, dict):
        if "ndarray" in v:
            return np.array(v["data"], dtype=np.dtype(v["ndarray"])).reshape(v["shape"])
        if "numpy" in v:
            return np.dtype(v["numpy"]).type(v["value"])
        raise ValueError(f"unknown encoded value {sorted(v)!r}")
    if isinstance(v, list):
        raise ValueError("a bare list in the CMA-ES state")
    return v
