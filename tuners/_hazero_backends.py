"""HAZero's two CMA-ES backends behind one interface: CMAwM without choices, CatCMAwM with them.

:class:`HAZero` (``tuners/hazero.py``) runs one CMA-ES generation after another and restarts it;
what a sample is, how it is told, when the distribution has converged and how it is saved
differ between the two `cmaes` optimizers it may hold, and live here, one adapter class per
optimizer (:class:`Backend` is their interface, :func:`backend_for` picks one for a space):

- :class:`CMAwMBackend`, for a space of floats and ints: `CMAwM` over the whole box, the int
  axes on their value grids (margin), a log-scale int as continuous.
- :class:`CatCMAwMBackend`, for a space with a choice: `CatCMAwM`, whose Gaussian covers the
  float and int axes (continuous block, then integer block; an int range of more than
  ``_MAX_INT_VALUES`` values or a log-scale int is continuous) and whose categorical
  distribution q covers the choices. A sample is told back as its raw Gaussian part and, for
  each choice, the box point of its value (the bin centre), so that the state stays a point
  of the box per candidate.

Both speak in points of the box [-1, 1]^n, one coordinate per parameter of the space.

cmaes has no public σ, C or reset; besides what ``tuners/_cmaes_codec.py`` saves, the adapters
read ``CMAwM._cma._sigma``, ``._cma._C`` and ``CatCMAwM._sigma``, ``._C`` (convergence), zero
``_funhist_values`` (allocated with np.empty), read a CatCMAwM sample's ``_v_raw`` and build
``CatCMAwM.Solution(c=..., _v_raw=...)`` to tell it, and override
``CatCMAwM._calc_continuous_penalty`` (reading ``_iqhist_values``, ``_popsize``): private names of
cmaes 0.13.1 that ``tests/test_tuners_cmaes_layout.py`` checks.

This module imports cmaes, and cmaes's package imports scipy: :class:`HAZero` imports this
module when the first HAZero is made, so ``import tuners`` loads neither.
"""

from __future__ import annotations

import abc
import copy
import math
import warnings
from dataclasses import dataclass
from typing import Any, Protocol

import numpy as np
from cmaes import CatCMAwM, CMAwM

from tuners import _cmaes_codec as codec
from tuners.space import ChoiceParam, IntParam, SearchSpace

__all__ = ["Backend", "CMAwMBackend", "CatCMAwMBackend", "backend_for"]

# CatCMAwM lists every value of an int axis; a wider int range is searched as continuous.
_MAX_INT_VALUES = 10_000


class Backend(Protocol):
    """One CMA-ES over the box, as HAZero uses it; :meth:`start` must be called before the rest."""

    mean_low: np.ndarray  # start and restart means lie in [mean_low, mean_high], per axis
    mean_high: np.ndarray
    optimizer: Any  # the cmaes object (for tests and inspection)

    def start(self, mean: np.ndarray, *, seed: int) -> None:
        """A fresh CMA-ES at ``mean`` (a point of the box) with σ₀, C = I (and q uniform), seeded."""

    def ask(self) -> tuple[np.ndarray, np.ndarray]:
        """A sample: (the point to evaluate, on the grids; the point to tell back for it)."""

    def tell(self, told: list[tuple[np.ndarray, float]]) -> None:
        """One generation's (told point, f) pairs, f to minimize, one per sample."""

    def distribution_converged(self, tol_sigma: float) -> bool:
        """cmaes's own stop test, or σ·sqrt(C_ii) < ``tol_sigma`` on every axis of the Gaussian."""

    @property
    def cmaes_version(self) -> str | None:
        """The version of the cmaes that runs (written to the state, for information)."""

    def to_json(self) -> dict[str, Any]:
        """The optimizer's state as JSON (the "optimizer" section of HAZero's state)."""

    def loaded(self, d: Any) -> Backend:
        """A copy of this backend holding the optimizer saved as ``d``; raises if ``d`` does not fit."""


def backend_for(space: SearchSpace, *, sigma: float, mean_inset: float, generation_size: int) -> Backend:
    """CatCMAwM for a space with a choice parameter, CMAwM otherwise (not started)."""
    kind = CatCMAwMBackend if any(isinstance(p, ChoiceParam) for p in space.params) else CMAwMBackend
    return kind(space=space, sigma=sigma, mean_inset=mean_inset, generation_size=generation_size)


class _BackendBase(abc.ABC):
    """What both adapters share: the box of start means, σ₀, λ, and the optimizer they hold."""

    def __init__(self, *, space: SearchSpace, sigma: float, generation_size: int, inset: np.ndarray) -> None:
        self._space = space
        self._sigma = sigma
        self._generation_size = generation_size
        # the box per axis: [-1, 1] for continuous axes, first..last value (bin centre) for discrete ones
        self._bounds = np.array([p.grid_bounds for p in space.params], dtype=np.float64)
        self.mean_low = self._bounds[:, 0] + inset
        self.mean_high = self._bounds[:, 1] - inset
        self.optimizer: Any = None

    @property
    def cmaes_version(self) -> str | None:
        return codec.CMAES_VERSION

    def start(self, mean: np.ndarray, *, seed: int) -> None:
        self.optimizer = self._build(mean, seed=seed)

    def _reference(self) -> Any:
        """An optimizer of this space's layout, for a saved state to be loaded into."""
        return self._build((self.mean_low + self.mean_high) / 2, seed=0)

    @abc.abstractmethod
    def _build(self, mean: np.ndarray, *, seed: int) -> Any:
        """A fresh optimizer at ``mean`` (a point of the box) with σ₀."""

    def _holding(self, optimizer: Any) -> Any:
        other = copy.copy(self)  # shares the space's fixed tables, never changed
        other.optimizer = optimizer
        return other


class CMAwMBackend(_BackendBase):
    """CMA-ES with margin (Hamano et al., GECCO 2022) on the whole box: floats and ints."""

    def __init__(self, *, space: SearchSpace, sigma: float, mean_inset: float, generation_size: int) -> None:
        self._steps = np.array([p.step or 0.0 for p in space.params], dtype=np.float64)  # 0: continuous
        # only continuous axes are inset; a discrete axis keeps its first and last values
        inset = np.where(self._steps > 0, 0.0, mean_inset)
        super().__init__(space=space, sigma=sigma, generation_size=generation_size, inset=inset)

    def _build(self, mean: np.ndarray, *, seed: int) -> CMAwM:
        optimizer = CMAwM(mean=mean, sigma=self._sigma, bounds=self._bounds.copy(), steps=self._steps.copy(),
                          population_size=self._generation_size, seed=seed)
        # cmaes allocates this with np.empty and reads an entry only after writing it; zero it
        # so that the saved state does not depend on leftover memory.
        optimizer._cma._funhist_values[:] = 0.0
        return optimizer

    def ask(self) -> tuple[np.ndarray, np.ndarray]:
        return self.optimizer.ask()  # x_eval: on the discrete grid; x_tell: the raw sample

    def tell(self, told: list[tuple[np.ndarray, float]]) -> None:
        self.optimizer.tell(told)

    def distribution_converged(self, tol_sigma: float) -> bool:
        if self.optimizer.should_stop():
            return True
        cma = self.optimizer._cma  # cmaes exposes no public σ or C
        return cma._sigma * math.sqrt(float(np.max(np.diag(cma._C)))) < tol_sigma

    def to_json(self) -> dict[str, Any]:
        return codec.dump_cma_with_margin(self.optimizer)

    def loaded(self, d: Any) -> CMAwMBackend:
        optimizer = codec.load_cma_with_margin(self._reference(), d, n_dim=self._space.dim,
                                               popsize=self._generation_size)
        return self._holding(optimizer)


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


class CatCMAwMBackend(_BackendBase):
    """CatCMA with margin (Hamano et al., GECCO 2025): a Gaussian for floats and ints, q for choices."""

    def __init__(self, *, space: SearchSpace, sigma: float, mean_inset: float, generation_size: int) -> None:
        self._axes = _MixedAxes.of(space)
        # only the continuous block is inset (ints keep their grid ends, choices their bin centres)
        inset = np.zeros(space.dim)
        inset[self._axes.continuous] = mean_inset
        super().__init__(space=space, sigma=sigma, generation_size=generation_size, inset=inset)

    def _build(self, mean: np.ndarray, *, seed: int) -> _CatCMAwM:
        axes = self._axes
        n_numeric = len(axes.numeric)
        optimizer = _CatCMAwM(
            x_space=[[-1.0, 1.0]] * len(axes.continuous) or None,
            z_space=[grid.tolist() for grid in axes.grids] or None,
            c_space=list(axes.sizes),
            population_size=self._generation_size,
            # σ₀ in box units on every numeric axis (C = I, as CMAwM); q starts uniform
            mean=mean[axes.numeric].copy() if n_numeric else None,
            sigma=self._sigma if n_numeric else None,
            cov=np.eye(n_numeric) if n_numeric else None,
            seed=seed,
        )
        if n_numeric:
            optimizer._funhist_values[:] = 0.0  # as CMAwM's: np.empty, read only after written
        return optimizer

    def ask(self) -> tuple[np.ndarray, np.ndarray]:
        # CatCMAwM: x clipped to the box, z on the int grid, c one-hot; the raw Gaussian sample
        # is told back, and each choice as its bin centre (the box point of that value).
        axes, sample = self._axes, self.optimizer.ask()
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

    def tell(self, told: list[tuple[np.ndarray, float]]) -> None:
        self.optimizer.tell([(self._solution(x), f) for x, f in told])

    def _solution(self, x: np.ndarray) -> CatCMAwM.Solution:
        """What CatCMAwM's tell reads of a told point: its raw Gaussian part and its one-hot choices."""
        axes = self._axes
        c = np.zeros((len(axes.sizes), max(axes.sizes)), dtype=bool)
        c[np.arange(len(axes.sizes)), axes.choice_indices(x)] = True
        v_raw = x[axes.numeric].copy() if len(axes.numeric) else None
        return CatCMAwM.Solution(c=c, _v_raw=v_raw)

    def distribution_converged(self, tol_sigma: float) -> bool:
        if not len(self._axes.numeric):
            return False  # choices only: the margin keeps q from converging
        if self.optimizer.should_stop():
            return True
        optimizer = self.optimizer
        return optimizer._sigma * math.sqrt(float(np.max(np.diag(optimizer._C)))) < tol_sigma

    def to_json(self) -> dict[str, Any]:
        return codec.dump_cat_cma_with_margin(self.optimizer)

    def loaded(self, d: Any) -> CatCMAwMBackend:
        axes = self._axes
        optimizer = codec.load_cat_cma_with_margin(
            self._reference(), d, n_numeric=len(axes.numeric), q_shape=(len(axes.sizes), max(axes.sizes)),
            popsize=self._generation_size)
        return self._holding(optimizer)
