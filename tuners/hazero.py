"""HAZero: CMA-ES in the normalized box, with margin for integers, categorical for choices.

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
- **Integers use CMA-ES with margin** (`CMAwM`; Hamano et al., GECCO 2022): a discrete axis
  keeps a minimum probability of leaving its current value, so the search does not stall once
  σ shrinks below the spacing of the values. Steps are in box units: an int range [lo, hi]
  has step 2 / (hi - lo). A log-scale int is not evenly spaced in the box, so it is searched
  as continuous and rounded (the restarts below keep it from stalling for good).
- **Choices are categories, not an ordered axis.** A space with a choice parameter runs
  CatCMA with margin (`CatCMAwM`; Hamano et al., "CatCMA with Margin", GECCO 2025,
  arXiv:2504.07884) instead: the float and int axes keep a Gaussian with margin on the ints
  (a raw sample outside the box is clipped for evaluation and penalized in the ranking,
  where CMAwM resamples it), and each choice gets its own categorical distribution q (one
  probability per value, uniform at the start and after a restart), updated from the ranked
  samples by the adaptive stochastic natural gradient (Akimoto et al., ICML 2019), with a
  margin that keeps every value's probability at least (1 − 0.73^(1/(n_int + n_choice))) /
  (k − 1). An ordered axis would be a trap: values are listed in no meaningful order, so
  from an init value whose neighbour scores worse, CMA-ES never crossed to a better value
  further along (the benchmark's ``mixed`` problem: init "relu", "tanh" worse, "gelu" best;
  the old ordinal search ended on "relu" in 28 of 30 seeds). A space without choices still runs
  `CMAwM`, unchanged. In the categorical path an int range of more than
  ``_MAX_INT_VALUES`` values is searched as continuous and rounded (CatCMAwM keeps a table
  of every value), and the state records the candidates' choices at their bin centres.
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
  point of the box with σ₀ (choices: q uniform again; a space of choices only restarts on
  flat scores or failures, since the margin keeps q from converging). The population size
  stays fixed (no IPOP doubling: the pipeline's popsize is the number of GPU slots); the best
  so far is kept.
- **popsize below 4**: CMA-ES needs λ ≥ 4 for a non-zero rank-μ learning rate; with a smaller
  popsize one generation spans several rounds (λ = the smallest multiple of popsize ≥ 4).
- **Seed and full state**: the CMA-ES internals, including its own numpy RNG (which cmaes
  drops when pickled), are written to the JSON state, so a restored search continues
  bit-identically. The algorithm state carries ``layout_version`` (2 since choices became
  categorical); a state of another layout is refused with TunerStateVersionError.
"""

from __future__ import annotations

import math
import warnings
from dataclasses import dataclass
from typing import Any

import cmaes
import numpy as np
from cmaes import CatCMAwM, CMAwM

from tuners._base import Tuner, TunerStateError, TunerStateVersionError, _get, _int, _matrix, _opt_float
from tuners.space import ChoiceParam, IntParam, SearchSpace

__all__ = ["HAZero", "HAZeroConfig"]

# The smallest CMA-ES population: with λ < 4, cmaes's rank-μ learning rate is 0 (μ_eff = 1).
_MIN_GENERATION_SIZE = 4
# The layout of the algorithm state; 2: spaces with a choice run CatCMAwM (1 had no field).
_LAYOUT_VERSION = 2
# CatCMAwM lists every value of an int axis; a wider int range is searched as continuous.
_MAX_INT_VALUES = 10_000
# CatCMAwM attributes left out of the state: fixed tables that the space rebuilds.
_CAT_DERIVED = frozenset({"_rng", "_z_space", "_z_lim"})


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


class _CatCMAwM(CatCMAwM):
    """CatCMAwM with no box penalty until the score scale is known.

    The penalty for a raw sample outside the box (the boundary handling of Hansen et al.,
    IEEE Trans. Evol. Comput. 13(1), 2009) is scaled by the median interquartile range of the
    past generations' scores. cmaes 0.13.1 records only positive ranges, so while
    none has been seen (equal scores, or failures that tie) the median of nothing is nan, every
    penalized score is nan and the ranking is arbitrary. Until then we penalize nothing: the
    sample is clipped into the box anyway.
    """

    def _calc_continuous_penalty(self, v_raw: np.ndarray, sorted_fvals: np.ndarray) -> np.ndarray:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", RuntimeWarning)  # numpy's "mean of empty slice"
            penalties = super()._calc_continuous_penalty(v_raw, sorted_fvals)
        if not self._iqhist_values:
            return np.zeros(self._popsize)
        return penalties


@dataclass(frozen=True)
class _MixedAxes:
    """Which box axes go to CatCMAwM's continuous (x), integer (z) and categorical (c) blocks."""

    continuous: np.ndarray  # axes of floats, log-scale ints and ints wider than _MAX_INT_VALUES
    integer: np.ndarray  # axes of the other ints, searched on their values
    choice: np.ndarray  # axes of the choices
    grids: tuple[np.ndarray, ...]  # box positions of each integer axis' values, ascending
    sizes: tuple[int, ...]  # number of values of each choice axis

    @property
    def numeric(self) -> np.ndarray:
        """The axes of CatCMAwM's Gaussian, in its order: continuous, then integer."""
        return np.concatenate([self.continuous, self.integer])

    @classmethod
    def of(cls, space: SearchSpace) -> _MixedAxes:
        continuous, integer, choice, grids, sizes = [], [], [], [], []
        for i, p in enumerate(space.params):
            if isinstance(p, ChoiceParam):
                choice.append(i)
                sizes.append(len(p.values))
            elif isinstance(p, IntParam) and not p.log and p.high - p.low < _MAX_INT_VALUES:
                integer.append(i)
                # the same arithmetic as IntParam.normalize, so the init value lies on the grid
                grid = 2.0 * np.arange(p.high - p.low + 1, dtype=np.float64) / (p.high - p.low) - 1.0
                grids.append(np.clip(grid, -1.0, 1.0))
            else:
                continuous.append(i)
        return cls(np.array(continuous, dtype=np.intp), np.array(integer, dtype=np.intp),
                   np.array(choice, dtype=np.intp), tuple(grids), tuple(sizes))

    def choice_indices(self, x: np.ndarray) -> np.ndarray:
        """The value index of each choice axis of the box point x (its bin, as ChoiceParam.denormalize)."""
        k = np.array(self.sizes)
        t = (np.clip(x[self.choice], -1.0, 1.0) + 1.0) / 2.0
        return np.minimum((t * k).astype(np.intp), k - 1)

    def bin_centres(self, indices: np.ndarray) -> np.ndarray:
        k = np.array(self.sizes)
        return -1.0 + (2 * indices + 1) / k


class HAZero(Tuner):
    """CMA-ES (with margin; categorical for choices) over the space's box; see the module docstring.

    ``HAZero(space=..., popsize=5, seed=0)`` or ``make_tuner("hazero", space, popsize=5, seed=0)``.
    """

    name = "hazero"
    config_type = HAZeroConfig

    def _start(self) -> None:
        params = self._space.params
        has_choice = any(isinstance(p, ChoiceParam) for p in params)
        self._axes = _MixedAxes.of(self._space) if has_choice else None  # None: CMAwM, else CatCMAwM
        # CMAwM's box per axis: [-1, 1] for continuous axes, first..last value for discrete ones
        self._bounds = np.array([p.grid_bounds for p in params], dtype=np.float64)
        self._steps = np.array([p.step or 0.0 for p in params], dtype=np.float64)  # 0: continuous
        inset = np.where(self._steps > 0, 0.0, self._config.mean_inset)
        if self._axes is not None:  # only the continuous block is inset (ints keep their grid ends)
            inset = np.zeros(self._space.dim)
            inset[self._axes.continuous] = self._config.mean_inset
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

    def _new_optimizer(self, mean: np.ndarray) -> CMAwM | CatCMAwM:
        return self._build_optimizer(mean, seed=int(self._rng.integers(2**32)))

    def _build_optimizer(self, mean: np.ndarray, *, seed: int) -> CMAwM | CatCMAwM:
        """A fresh CMA-ES at ``mean`` (a point of the box, one coordinate per axis) with σ₀."""
        if self._axes is None:
            optimizer = CMAwM(mean=mean, sigma=self._config.sigma, bounds=self._bounds.copy(),
                              steps=self._steps.copy(), population_size=self._generation_size,
                              seed=seed)
            # cmaes allocates this with np.empty and reads an entry only after writing it; zero it
            # so that the saved state does not depend on leftover memory.
            optimizer._cma._funhist_values[:] = 0.0
            return optimizer
        axes = self._axes
        n_numeric = len(axes.numeric)
        cat = _CatCMAwM(
            x_space=[[-1.0, 1.0]] * len(axes.continuous) or None,
            z_space=[grid.tolist() for grid in axes.grids] or None,
            c_space=list(axes.sizes),
            population_size=self._generation_size,
            # σ₀ in box units on every numeric axis (C = I, as CMAwM); q starts uniform
            mean=mean[axes.numeric].copy() if n_numeric else None,
            sigma=self._config.sigma if n_numeric else None,
            cov=np.eye(n_numeric) if n_numeric else None,
            seed=seed,
        )
        if n_numeric:
            cat._funhist_values[:] = 0.0  # as above: np.empty, read only after written
        return cat

    # -- ask / tell ---------------------------------------------------------------------------

    def _propose(self) -> list[dict[str, Any]]:
        candidates, told = [], []
        for i in range(self._popsize):
            if self._rounds_told == 0 and i == 0:
                x_eval = x_tell = self._space.init_vector()
                candidates.append(self._space.init_params())  # exactly, not via float round-trips
            else:
                x_eval, x_tell = self._ask_one()
                candidates.append(self._space.denormalize(x_eval))
            told.append(np.array(x_tell, dtype=np.float64))
        self._pending_x = told
        return candidates

    def _ask_one(self) -> tuple[np.ndarray, np.ndarray]:
        """A sample: (the point to evaluate, on the grids; the point to tell CMA-ES)."""
        if self._axes is None:
            return self._optimizer.ask()  # x_eval: on the discrete grid; x_tell: raw sample
        # CatCMAwM: x clipped to the box, z on the int grid, c one-hot; the raw Gaussian sample
        # is told back, and each choice as its bin centre (the box point of that value).
        axes, sample = self._axes, self._optimizer.ask()
        x_eval = np.empty(self._space.dim)
        x_tell = np.empty(self._space.dim)
        if len(axes.continuous):
            x_eval[axes.continuous] = sample.x
        if len(axes.integer):
            x_eval[axes.integer] = sample.z
        if len(axes.numeric):
            x_tell[axes.numeric] = sample._v_raw
        indices = np.array([int(np.argmax(row[:k])) for row, k in zip(sample.c, axes.sizes)], dtype=np.intp)
        x_eval[axes.choice] = x_tell[axes.choice] = axes.bin_centres(indices)
        return x_eval, x_tell

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
        told = [(x, f_failed if f is None else f) for x, f in generation]
        if self._axes is None:
            self._optimizer.tell(told)
        else:
            self._optimizer.tell([(self._solution(x), f) for x, f in told])
        k = self._config.restart_flat_generations
        self._recent_ranges = (self._recent_ranges + [(min(fs), max(fs))])[-k:]
        if self._converged():
            self._restart()

    def _solution(self, x: np.ndarray) -> CatCMAwM.Solution:
        """What CatCMAwM's tell reads of a sample: its raw Gaussian part and its one-hot choices."""
        axes = self._axes
        assert axes is not None
        c = np.zeros((len(axes.sizes), max(axes.sizes)), dtype=bool)
        c[np.arange(len(axes.sizes)), axes.choice_indices(x)] = True
        v_raw = x[axes.numeric].copy() if len(axes.numeric) else None
        return CatCMAwM.Solution(c=c, _v_raw=v_raw)

    def _converged(self) -> bool:
        if self._axes is None:
            cma = self._optimizer._cma  # cmaes exposes no public σ or C
            sigma, cov = cma._sigma, cma._C
        elif len(self._axes.numeric):
            sigma, cov = self._optimizer._sigma, self._optimizer._C
        else:
            sigma = cov = None  # choices only: the margin keeps q from converging; flatness still counts
        if cov is not None:
            if self._optimizer.should_stop():
                return True
            if sigma * math.sqrt(float(np.max(np.diag(cov)))) < self._config.restart_tol_sigma:
                return True
        if len(self._recent_ranges) == self._config.restart_flat_generations:
            low = min(r[0] for r in self._recent_ranges)
            high = max(r[1] for r in self._recent_ranges)
            if high - low <= self._config.restart_tol_fitness:
                return True
        return False

    def _restart(self) -> None:
        # a fresh start at a uniform random point of the (inset) box, same λ and σ₀ (q uniform)
        u = self._rng.random(self._space.dim)
        mean = self._mean_low + u * (self._mean_high - self._mean_low)
        self._optimizer = self._new_optimizer(mean)
        self._restarts += 1
        self._recent_ranges = []
        self._failed_generations = 0

    # -- state ------------------------------------------------------------------------------------

    def _algorithm_state(self) -> dict[str, Any]:
        optimizer = self._optimizer
        if self._axes is None:
            optimizer_state = {
                "cma_with_margin": {k: _encode(v) for k, v in optimizer.__dict__.items() if k != "_cma"},
                "cma": {k: _encode(v) for k, v in optimizer._cma.__dict__.items() if k != "_rng"},
                "rng": _rng_to_json(optimizer._cma._rng),
            }
        else:
            optimizer_state = {
                "cat_cma_with_margin": {k: _encode(v) for k, v in optimizer.__dict__.items()
                                        if k not in _CAT_DERIVED},
                "rng": _rng_to_json(optimizer._rng),
            }
        return {
            "layout_version": _LAYOUT_VERSION,
            "cmaes_version": getattr(cmaes, "__version__", None),  # informative; load checks the layout
            "generation_size": self._generation_size,
            "optimizer": optimizer_state,
            "generation": [{"x": x.tolist(), "f": f} for x, f in self._generation],
            "pending_x": None if self._pending_x is None else [x.tolist() for x in self._pending_x],
            "restarts": self._restarts,
            "recent_ranges": [list(r) for r in self._recent_ranges],
            "failed_generations": self._failed_generations,
        }

    def _parse_algorithm_state(self, d: Any, common: dict[str, Any]) -> dict[str, Any]:
        _get(d, "optimizer")  # a mapping with the keys of some layout, or corrupt
        layout = d.get("layout_version")  # layout 1 had none
        if layout != _LAYOUT_VERSION:
            raise TunerStateVersionError(
                f"hazero state layout_version {layout!r} cannot be read by this version, which reads "
                f"layout_version {_LAYOUT_VERSION} (choices are searched categorically since 2); "
                "start a new search (new output dir)")
        n = self._space.dim
        size = _get(d, "generation_size")
        if size != self._generation_size:
            raise ValueError(f"generation_size={size!r}, expected {self._generation_size}")
        if self._axes is None:
            optimizer = self._load_optimizer(_get(d, "optimizer"))
        else:
            optimizer = self._load_cat_optimizer(_get(d, "optimizer"))
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
        reference = self._build_optimizer((self._mean_low + self._mean_high) / 2, seed=0)
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
        _rng_from_json(reference._cma._rng, _get(d, "rng"))
        reference.__dict__.update(wm)
        reference._cma.__dict__.update(cma)
        return reference

    def _load_cat_optimizer(self, d: Any) -> CatCMAwM:
        # As _load_optimizer; the value tables (_z_space, _z_lim) stay the reference's, built from the space.
        axes = self._axes
        assert axes is not None
        reference = self._build_optimizer((self._mean_low + self._mean_high) / 2, seed=0)
        attrs = {k: _decode(v) for k, v in _get(d, "cat_cma_with_margin").items()}
        expected = set(reference.__dict__) - _CAT_DERIVED
        if set(attrs) != expected:
            differ = sorted(set(attrs) ^ expected)
            raise TunerStateError(
                f"the CatCMA state does not fit cmaes {getattr(cmaes, '__version__', '?')} "
                f"(attributes {differ} differ): written by another cmaes version, or corrupt")
        m, n_choice = len(axes.numeric), len(axes.sizes)
        shapes = [("_q", (n_choice, max(axes.sizes)))]
        if m:
            shapes += [("_mean", (m,)), ("_C", (m, m)), ("_p_sigma", (m,)), ("_pc", (m,)), ("_A", (m,))]
        for key, shape in shapes:
            _matrix(attrs[key], key, shape)
        if attrs["_popsize"] != self._generation_size or (attrs["_Nmi"], attrs["_Nca"]) != (m, n_choice):
            raise ValueError(f"CatCMA has λ={attrs['_popsize']!r}, {attrs['_Nmi']!r} numeric and "
                             f"{attrs['_Nca']!r} choice axes; "
                             f"expected {self._generation_size}, {m}, {n_choice}")
        _rng_from_json(reference._rng, _get(d, "rng"))
        reference.__dict__.update(attrs)
        return reference


# --- numpy values <-> JSON -------------------------------------------------------------


def _rng_to_json(rng: np.random.RandomState) -> dict[str, Any]:
    """cmaes's legacy RandomState (MT19937) as JSON."""
    state = rng.get_state(legacy=False)
    return {"bit_generator": state["bit_generator"],
            "state": {"key": state["state"]["key"].tolist(), "pos": int(state["state"]["pos"])},
            "has_gauss": int(state["has_gauss"]), "gauss": float(state["gauss"])}


def _rng_from_json(rng: np.random.RandomState, d: Any) -> None:
    state = dict(d)
    state["state"] = {"key": np.array(_get(d["state"], "key"), dtype=np.uint32),
                      "pos": int(_get(d["state"], "pos"))}
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
