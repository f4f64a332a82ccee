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
  `CMAwM`, unchanged. In the categorical path an int range of more than 10 000 values is
  searched as continuous and rounded (CatCMAwM keeps a table of every value), and the state
  records the candidates' choices at their bin centres. The two optimizers sit behind one
  interface (``tuners/_hazero_backends.py``), so this file never asks which one it holds.
- **The first candidate is the user's init_value, exactly** (``space.init_params()``), so the
  result is never worse than the starting point.
- **A robust start: round 0 is a space-filling design, and CMA-ES starts from its best
  point.** The original started CMA-ES at the init point with σ₀ = 0.2 and nothing else; from
  an init_value far from the optimum (a learning rate copied from another model, a bound) that
  local search walks slowly and a budget of 5×10 ran out before it arrived: worse than random
  search on an ill-conditioned problem. Here round 0 is the init point plus popsize − 1
  points of a maximin Latin hypercube over the box (``tuners/_latin_hypercube.py``; McKay et
  al. 1979, Morris & Mitchell 1995), and CMA-ES starts, with σ₀, at the best point of round 0
  (the init point on a tie): where the init point is the best of round 0, CMA-ES starts there
  as before (one generation later); otherwise from the best of a coarse scan of the box. In
  the benchmark (``bench/results/tuners.md``) this turned HAZero's poor-init cells from far
  behind Optuna's CMA-ES started at the same point into far ahead of it. This is the "initial
  design, then local search" scheme of SMAC and of Optuna's samplers (an independent
  sampler's first trials, then CMA-ES from the best, as ``CmaEsSampler(x0=None)`` does), and
  the first step of the restart strategies below (IPOP/BIPOP, Hansen 2009, "Benchmarking a
  BI-population CMA-ES", GECCO) that draw a new start in the box. If round 0's scores all tie
  (a flat region: training diverged everywhere, chance accuracy), CMA-ES starts at a uniform
  random point; if they all failed, at the init point.
- **Failures rank below every real score** (the original scored a crash 0.0, which could win).
  cmaes minimizes f = -score; a failed trial gets f = f_worst + 1 + |f_worst|, strictly worse
  than the worst real score of its generation (all failures tie). A generation in which every
  trial failed carries no ranking, so it is not told: the next round samples the same
  distribution again (its random stream has moved on, so the candidates are new).
- **A trial stopped early** (``Pruned``, ``--early-stop``) ranks between: with gap =
  1 + |f_worst|, the pruned trials of a generation get f = f_worst + gap·(1 − level), level
  in (0, 1) from ``pruned_levels`` (a later step, then a higher last value, ranks better), so
  each one is worse than every real score and better than every failure (f_worst + gap). A
  generation of pruned and failed trials only is told with f_worst = 0. In round 0 (never
  pruned by the pipeline, whose rules need an earlier round) CMA-ES starts from the best
  pruned point only when no trial has a real score.
- **Restarts instead of wasted rounds**: when the distribution has converged (cmaes's
  ``should_stop``, or every axis' σ·sqrt(C_ii) below ``restart_tol_sigma``, or the scores of
  the last generations flat within ``restart_tol_fitness``), or after
  ``restart_failed_generations`` all-failed generations in a row, CMA-ES restarts at a random
  point of the box with σ₀ (choices: q uniform again; a space of choices only restarts on
  flat scores or failures, since the margin keeps q from converging). A single generation
  whose real scores (at least two) all tie already counts as flat (``restart_flat_generations
  = 1``; it was 3), so a plateau costs one round, not three. The population size
  stays fixed (no IPOP doubling: the pipeline's popsize is the number of GPU slots); the best
  so far is kept.
- **popsize below 4**: CMA-ES needs λ ≥ 4 for a non-zero rank-μ learning rate; with a smaller
  popsize one generation spans several rounds (λ = the smallest multiple of popsize ≥ 4).
- **Seed and full state**: the CMA-ES internals, including its own numpy RNG (which cmaes
  drops when pickled), are written to the JSON state (``tuners/_cmaes_codec.py``: which
  private attributes of which cmaes versions), so a restored search continues
  bit-identically. The algorithm state carries ``layout_version`` (2 since choices became
  categorical, 3 since round 0 is a space-filling design); a state of another layout is
  refused with TunerStateVersionError.

cmaes (and scipy, which cmaes's package imports) is loaded when the first HAZero is made,
not by ``import tuners``.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import numpy as np

from tuners._base import (
    Pruned, Tuner, TunerStateVersionError, _check_keys, _get, _int, _matrix, _opt_float, pruned_levels,
    pruned_rank_key,
)
from tuners._latin_hypercube import maximin_latin_hypercube

if TYPE_CHECKING:
    from tuners._hazero_backends import Backend

__all__ = ["HAZero", "HAZeroConfig"]

# The smallest CMA-ES population: with λ < 4, cmaes's rank-μ learning rate is 0 (μ_eff = 1).
_MIN_GENERATION_SIZE = 4
# The layout of the algorithm state; 2: spaces with a choice run CatCMAwM (1 had no field);
# 3: round 0 is the init point and a Latin hypercube, CMA-ES starts at its best point.
_LAYOUT_VERSION = 3
# The keys of HAZero's algorithm state (layout 2), all required.
_ALGORITHM_KEYS = ("layout_version", "cmaes_version", "generation_size", "optimizer", "generation",
                   "pending_x", "restarts", "recent_ranges", "failed_generations")


@dataclass(frozen=True)
class HAZeroConfig:
    """HAZero's constants (all in units of the normalized box [-1, 1]^n)."""

    sigma: float = 0.2  # initial step size σ₀, the original's
    mean_inset: float = 0.1  # start/restart means stay this far inside the box: fewer samples past a bound
    restart_tol_sigma: float = 1e-3  # restart when σ·sqrt(C_ii) < this on every axis (converged)
    restart_tol_fitness: float = 1e-12  # ...or when the last generations' scores all lie within this (flat)
    restart_flat_generations: int = 1  # how many generations (of >= 2 real scores) the flatness test looks back
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


@dataclass(frozen=True)
class _SearchState:
    """HAZero's records as read from a state, checked, before they are set on the tuner."""

    backend: Backend  # holding the loaded CMA-ES
    generation: list[tuple[np.ndarray, float | Pruned | None]]
    pending_x: list[np.ndarray] | None
    restarts: int
    recent_ranges: list[tuple[float, float]]
    failed_generations: int


class HAZero(Tuner):
    """CMA-ES (with margin; categorical for choices) over the space's box; see the module docstring.

    ``HAZero(space=..., popsize=5, seed=0)`` or ``make_tuner("hazero", space, popsize=5, seed=0)``.
    """

    name = "hazero"
    config_type = HAZeroConfig

    def _start(self) -> None:
        from tuners._hazero_backends import backend_for  # imports cmaes (and scipy): only once a HAZero is made

        self._generation_size = self._popsize * math.ceil(_MIN_GENERATION_SIZE / self._popsize)
        self._backend: Backend = backend_for(self._space, sigma=self._config.sigma,
                                             mean_inset=self._config.mean_inset,
                                             generation_size=self._generation_size)
        mean = np.clip(self._space.init_vector(), self._backend.mean_low, self._backend.mean_high)
        self._backend.start(mean, seed=int(self._rng.integers(2**32)))
        self._generation: list[tuple[np.ndarray, float | Pruned | None]] = []  # (x told, f, Pruned or None) of this generation
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

    # -- ask / tell ---------------------------------------------------------------------------

    def _propose(self) -> list[dict[str, Any]]:
        if self._rounds_told == 0:
            # round 0: the init point, exactly, and a maximin Latin hypercube over the box
            x0 = self._space.init_vector()
            design = maximin_latin_hypercube(self._rng, self._popsize - 1, self._space.dim, avoid=x0)
            self._pending_x = [x0, *(np.array(x, dtype=np.float64) for x in design)]
            return [self._space.init_params(), *(self._space.denormalize(x) for x in design)]
        candidates, told = [], []
        for _ in range(self._popsize):
            x_eval, x_tell = self._backend.ask()
            candidates.append(self._space.denormalize(x_eval))
            told.append(np.array(x_tell, dtype=np.float64))
        self._pending_x = told
        return candidates

    def _update(self, scores: list[float | Pruned | None]) -> None:
        assert self._pending_x is not None
        if self._rounds_told == 0:
            self._start_from_round_zero(self._pending_x, scores)
            self._pending_x = None
            return
        for x, score in zip(self._pending_x, scores):
            self._generation.append((x, -score if isinstance(score, float) else score))  # cmaes minimizes f = -score
        self._pending_x = None
        if len(self._generation) < self._generation_size:
            return  # a generation spans several rounds (popsize < 4)
        generation, self._generation = self._generation, []
        fs = [f for _, f in generation if isinstance(f, float)]
        levels = pruned_levels([f for _, f in generation])
        if not fs and not levels:
            # every trial failed: no ranking to learn from; sample the same distribution again
            self._failed_generations += 1
            if self._failed_generations >= self._config.restart_failed_generations:
                self._restart()
            return
        self._failed_generations = 0
        worst = max(fs) if fs else 0.0
        f_failed = worst + 1.0 + abs(worst)  # strictly worse than every real score of the generation
        generation = [(x, worst + (f_failed - worst) * (1.0 - levels[f]) if isinstance(f, Pruned) else f)
                      for x, f in generation]  # pruned: between the worst real score and a failure
        self._backend.tell([(x, f_failed if f is None else f) for x, f in generation])
        if len(fs) >= 2:  # one real score is no evidence of a plateau
            k = self._config.restart_flat_generations
            self._recent_ranges = (self._recent_ranges + [(min(fs), max(fs))])[-k:]
        if self._converged():
            self._restart()

    def _start_from_round_zero(self, xs: list[np.ndarray], scores: list[float | None]) -> None:
        """Start CMA-ES at round 0's best point (the init point on ties); see the module docstring."""
        real = [(s, i) for i, s in enumerate(scores) if isinstance(s, float)]
        pruned = [(pruned_rank_key(s), i) for i, s in enumerate(scores) if isinstance(s, Pruned)]
        if not real and pruned:
            mean = xs[min(pruned)[1]]  # no real score: the best pruned point
        elif not real:
            mean = xs[0]  # no score at all: the init point, as the original
        elif len(real) >= 2 and max(s for s, _ in real) - min(s for s, _ in real) <= self._config.restart_tol_fitness:
            # a plateau: every score tied, so no point of round 0 is better; start anywhere
            u = self._rng.random(self._space.dim)
            mean = self._backend.mean_low + u * (self._backend.mean_high - self._backend.mean_low)
        else:
            _, i_best = max(real, key=lambda r: (r[0], -r[1]))  # the first best: init wins a tie
            mean = xs[i_best]
        mean = np.clip(mean, self._backend.mean_low, self._backend.mean_high)
        self._backend.start(mean, seed=int(self._rng.integers(2**32)))

    def _converged(self) -> bool:
        if self._backend.distribution_converged(self._config.restart_tol_sigma):
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
        mean = self._backend.mean_low + u * (self._backend.mean_high - self._backend.mean_low)
        self._backend.start(mean, seed=int(self._rng.integers(2**32)))
        self._restarts += 1
        self._recent_ranges = []
        self._failed_generations = 0

    # -- state ------------------------------------------------------------------------------------

    def _algorithm_state(self) -> dict[str, Any]:
        return {
            "layout_version": _LAYOUT_VERSION,
            "cmaes_version": self._backend.cmaes_version,  # informative; load checks the layout
            "generation_size": self._generation_size,
            "optimizer": self._backend.to_json(),
            "generation": [{"x": x.tolist(), "f": f.to_json() if isinstance(f, Pruned) else f}
                           for x, f in self._generation],
            "pending_x": None if self._pending_x is None else [x.tolist() for x in self._pending_x],
            "restarts": self._restarts,
            "recent_ranges": [list(r) for r in self._recent_ranges],
            "failed_generations": self._failed_generations,
        }

    def _parse_algorithm_state(self, d: Any, *, pending: list[dict[str, Any]] | None) -> _SearchState:
        _get(d, "optimizer")  # a mapping with the keys of some layout, or corrupt
        layout = d.get("layout_version")  # layout 1 had none
        if layout != _LAYOUT_VERSION:
            raise TunerStateVersionError(
                f"hazero state layout_version {layout!r} cannot be read by this version, which reads "
                f"layout_version {_LAYOUT_VERSION} (round 0 is a space-filling design since 3); "
                "start a new search (new output dir)")
        _check_keys(d, _ALGORITHM_KEYS, "the hazero algorithm state")
        n = self._space.dim
        size = _get(d, "generation_size")
        if size != self._generation_size:
            raise ValueError(f"generation_size={size!r}, expected {self._generation_size}")
        backend = self._backend.loaded(_get(d, "optimizer"))
        generation = []
        for i, item in enumerate(_get(d, "generation")):
            _check_keys(item, ("x", "f"), f"the hazero algorithm state's generation[{i}]")
            f = _get(item, "f")
            generation.append((_matrix(_get(item, "x"), "generation x", (n,)),
                               Pruned.from_json(f) if isinstance(f, dict) else _opt_float(f, "f")))
        if len(generation) >= self._generation_size or len(generation) % self._popsize:
            raise ValueError(f"{len(generation)} told samples in the current generation "
                             f"of {self._generation_size}")
        pending_x = _get(d, "pending_x")
        if (pending_x is None) != (pending is None):
            raise ValueError("pending candidates and their CMA-ES samples disagree")
        if pending_x is not None:
            pending_x = [_matrix(x, "pending_x", (n,)) for x in pending_x]
            if len(pending_x) != self._popsize:
                raise ValueError(f"{len(pending_x)} pending samples for popsize {self._popsize}")
        recent = [(float(lo), float(hi)) for lo, hi in _get(d, "recent_ranges")]
        if len(recent) > self._config.restart_flat_generations:
            raise ValueError(f"{len(recent)} recent generations, "
                             f"at most {self._config.restart_flat_generations}")
        return _SearchState(backend=backend, generation=generation, pending_x=pending_x,
                            restarts=_int(_get(d, "restarts"), "restarts"), recent_ranges=recent,
                            failed_generations=_int(_get(d, "failed_generations"), "failed_generations"))

    def _restore_algorithm_state(self, records: _SearchState) -> None:
        self._backend = records.backend
        self._generation = list(records.generation)
        self._pending_x = None if records.pending_x is None else list(records.pending_x)
        self._restarts = records.restarts
        self._recent_ranges = list(records.recent_ranges)
        self._failed_generations = records.failed_generations
