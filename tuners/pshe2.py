"""PSHE2: PaddleHub's particle dynamics for hyperparameter search, with its defects fixed.

Each of the ``popsize`` particles i has a position x_i in the box [-1, 1]^n (its candidate),
a momentum m_i, and the best position it has scored, p_i; g is the best position of all.
After round t (t = 1 after the first tell), with α = ``alpha`` and ε = ``epsilon``:

    (1)  m_i ← (1 − 3α/t) · m_i − α (x_i − p_i) − α (x_i − g)     momentum, pulled to p_i and g
    (2)  x_i ← clip(x_i + α · m_i, −1, 1)                           move
    (3)  per coordinate, r ~ U[−1, 1):                               perturb: a random fraction
         x ← x + r·ε·(1 − x) if r ≥ 0,  x ← x + r·ε·(x + 1) if r < 0   of the way to a bound

and, for a choice parameter only (a departure, below),

    (4)  per choice coordinate, with probability ε:  x ← u,  u ~ U[−1, 1)   jump to a random value

Round 0 puts particle 0 at the init point x₀ exactly and the other popsize − 1 particles
on a maximin Latin hypercube over the box (``tuners/_latin_hypercube.py``; a departure, below).

Departures from the original (PaddleHub ``autofinetune/autoft.py``):

- **Per-particle momentum and best**: the original built both with ``[[0] * n] * popsize``,
  one list aliased by every row, so all particles shared one momentum (updated popsize times
  a round) and one "personal" best. Here they are (popsize, n) arrays, as the equations say.
- **Positions stay in the box**: the original never clipped, so positions (and the values
  they mapped to, until clamped) drifted past the bounds. We clip after the move (2); the
  perturbation (3) then stays inside by construction, and a last clip guards rounding.
- **Particle 0 of round 0 is the user's init_value, exactly**, so the result is never worse
  than the starting point (the original started every particle at a random spread).
- **A robust start: the other particles of round 0 fill the box** (a maximin Latin hypercube,
  McKay et al. 1979; Morris & Mitchell 1995), as particle swarms are usually initialised
  (uniformly over the box: Kennedy & Eberhart 1995; space-filling designs: Richards &
  Ventura, "Choosing a starting configuration for particle swarm optimization", IEEE IJCNN
  2004). The original's ``set_random_hparam`` spread them between x₀ and a bound (per
  coordinate r ~ U[−1, 1), x = x₀ + r·(1 − x₀) if r ≥ 0 else x₀ + r·(x₀ + 1)): from an
  init_value at a bound half the coordinates stayed at that bound (r < 0 gives x = x₀), so the
  swarm searched a corner of the box. The dynamics (1)-(4) are unchanged.
- **Failures**: a failed trial (None) never updates p_i or g (the original scored a crash
  0.0, which could become the best). A particle that has never succeeded has no p_i yet:
  its local pull α(x_i − p_i) is taken as 0 (as if p_i = x_i). With no success at all yet,
  g is undefined and its pull is 0 too, so an all-failed round still moves (by momentum and
  perturbation) to a fresh round.
- **A trial stopped early** (``Pruned``, ``--early-stop``) moves its particle as a failure
  does: it has no final score, so it never becomes p_i or g (only a score a trial finished
  with can; the pulls of (1) stay on finished trials). PSHE2 compares scores only to update
  p_i and g, so "below every finished trial, above failures" holds without a number for it.
- **Ties** follow the original: p_i and g move to a new position that scores equal to the
  old best (its ``<=`` on rewards); within one round the first best particle counts.
- **Integer and choice parameters**: positions stay continuous; the space rounds them
  (the original truncated ints) and maps a choice's coordinate to the value whose bin of the
  box it lies in.
- **Choices jump** (4): the bins of a choice are in no meaningful order, but moves (1)-(3)
  only ever reach neighbouring bins, so from an init value whose neighbour scores worse the
  swarm never reached a better value further along (the benchmark's ``mixed`` problem: init
  "relu", "tanh" worse, "gelu" best; the best choice stayed "relu" in 18 of 30 seeds). With
  probability ε per round a particle's choice coordinate is redrawn uniformly in the box (a
  uniformly random value); the pulls to p_i and g then carry a better value to the swarm.
  Spaces without choices draw no extra random numbers, so their searches are unchanged.
- **Seeded, serializable**: one numpy Generator, saved with the particles in the JSON state.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

import numpy as np

from tuners._base import Pruned, Tuner, _check_keys, _get, _matrix, _opt_float
from tuners._latin_hypercube import maximin_latin_hypercube
from tuners.space import ChoiceParam

__all__ = ["PSHE2", "PSHE2Config"]

# The keys of PSHE2's algorithm state, all required.
_ALGORITHM_KEYS = ("positions", "momenta", "personal_best_positions", "personal_best_scores",
                   "global_best_position", "global_best_score")


@dataclass(frozen=True)
class PSHE2Config:
    """PSHE2's constants (the original's defaults)."""

    alpha: float = 0.5  # α: step size of the move and strength of the pulls to p_i and g, eqs. (1)-(2)
    epsilon: float = 0.2  # ε: largest random move, as a fraction of the distance to a bound, eq. (3)

    def __post_init__(self) -> None:
        if not (math.isfinite(self.alpha) and self.alpha > 0):
            raise ValueError(f"alpha must be > 0, got alpha={self.alpha!r}")
        if not (math.isfinite(self.epsilon) and 0 <= self.epsilon <= 1):
            raise ValueError(f"epsilon must be in [0, 1], got epsilon={self.epsilon!r}")


@dataclass(frozen=True)
class _SwarmState:
    """The particles as read from a state, checked, before they are set on the tuner."""

    x: np.ndarray  # positions, one row per particle
    m: np.ndarray  # momenta
    p: np.ndarray  # personal best positions (rows valid where p_score is not None)
    p_score: list[float | None]
    g: np.ndarray | None  # global best position
    g_score: float | None


class PSHE2(Tuner):
    """Particles with momentum pulled to their own and the global best; see the module docstring.

    ``PSHE2(space=..., popsize=5, seed=0)`` or ``make_tuner("pshe2", space, popsize=5, seed=0)``.
    """

    name = "pshe2"
    config_type = PSHE2Config

    def _start(self) -> None:
        shape = (self._popsize, self._space.dim)
        x0 = self._space.init_vector()
        x = np.empty(shape)
        x[0] = x0  # particle 0: the init point; the others fill the box, away from it and each other
        x[1:] = maximin_latin_hypercube(self._rng, self._popsize - 1, self._space.dim, avoid=x0)
        self._x = np.clip(x, -1.0, 1.0)  # positions, one row per particle
        self._m = np.zeros(shape)  # momenta
        self._p = np.zeros(shape)  # personal best positions (rows valid where _p_score is not None)
        self._p_score: list[float | None] = [None] * self._popsize
        self._g: np.ndarray | None = None  # global best position
        self._g_score: float | None = None
        self._choice_axes = np.array([i for i, p in enumerate(self._space.params)
                                      if isinstance(p, ChoiceParam)], dtype=np.intp)

    def _propose(self) -> list[dict[str, Any]]:
        candidates = [self._space.denormalize(x) for x in self._x]
        if self._rounds_told == 0:
            candidates[0] = self._space.init_params()  # exactly, not via float round-trips
        return candidates

    def _update(self, scores: list[float | Pruned | None]) -> None:
        alpha, eps = self._config.alpha, self._config.epsilon
        t = self._rounds_told + 1  # rounds completed, this one included
        x = self._x
        scores = [s if isinstance(s, float) else None for s in scores]  # stopped early: as a failure
        for i, s in enumerate(scores):  # personal bests (ties: the newer position)
            if s is not None and (self._p_score[i] is None or s >= self._p_score[i]):
                self._p[i] = x[i]
                self._p_score[i] = s
        ok = [i for i, s in enumerate(scores) if s is not None]
        if ok:  # global best (the round's first best; ties with the old best: the newer position)
            i_best = max(ok, key=lambda i: (scores[i], -i))
            if self._g_score is None or scores[i_best] >= self._g_score:
                self._g = x[i_best].copy()
                self._g_score = scores[i_best]
        has_p = np.array([s is not None for s in self._p_score])[:, None]
        local_pull = np.where(has_p, x - self._p, 0.0)  # no personal best yet: no pull
        global_pull = x - self._g if self._g is not None else np.zeros_like(x)
        # (1) m ← (1 − 3α/t)·m − α(x − p) − α(x − g)
        self._m = (1.0 - 3.0 * alpha / t) * self._m - alpha * local_pull - alpha * global_pull
        # (2) x ← clip(x + α·m)
        x = np.clip(x + alpha * self._m, -1.0, 1.0)
        # (3) perturb by a random fraction r·ε of the way to the upper (r ≥ 0) or lower bound
        r = (self._rng.random(x.shape) - 0.5) * 2.0
        x = np.where(r >= 0, x + r * eps * (1.0 - x), x + r * eps * (x + 1.0))
        if len(self._choice_axes):
            # (4) each choice coordinate jumps, with probability ε, to a uniform point of the box
            shape = (self._popsize, len(self._choice_axes))
            jump = self._rng.random(shape) < eps
            u = (self._rng.random(shape) - 0.5) * 2.0  # U[-1, 1)
            x[:, self._choice_axes] = np.where(jump, u, x[:, self._choice_axes])
        self._x = np.clip(x, -1.0, 1.0)

    def _algorithm_state(self) -> dict[str, Any]:
        return {
            "positions": self._x.tolist(),
            "momenta": self._m.tolist(),
            "personal_best_positions": [None if s is None else p.tolist()
                                        for p, s in zip(self._p, self._p_score)],
            "personal_best_scores": list(self._p_score),
            "global_best_position": None if self._g is None else self._g.tolist(),
            "global_best_score": self._g_score,
        }

    def _parse_algorithm_state(self, d: Any, *, pending: list[dict[str, Any]] | None) -> _SwarmState:
        _check_keys(d, _ALGORITHM_KEYS, "the pshe2 algorithm state")
        n, shape = self._space.dim, (self._popsize, self._space.dim)
        x = _matrix(_get(d, "positions"), "positions", shape, box=True)
        m = _matrix(_get(d, "momenta"), "momenta", shape)
        p_rows = _get(d, "personal_best_positions")
        p_scores = [_opt_float(s, "personal best score") for s in _get(d, "personal_best_scores")]
        if len(p_rows) != self._popsize or len(p_scores) != self._popsize:
            raise ValueError(f"personal bests for {len(p_rows)}/{len(p_scores)} particles, "
                             f"expected {self._popsize}")
        p = np.zeros(shape)
        for i, (row, s) in enumerate(zip(p_rows, p_scores)):
            if (row is None) != (s is None):
                raise ValueError(f"particle {i}: personal best position and score disagree")
            if row is not None:
                p[i] = _matrix(row, "personal best position", (n,), box=True)
        g_row = _get(d, "global_best_position")
        g_score = _opt_float(_get(d, "global_best_score"), "global best")
        if (g_row is None) != (g_score is None):
            raise ValueError("global best position and score disagree")
        g = None if g_row is None else _matrix(g_row, "global best position", (n,), box=True)
        return _SwarmState(x=x, m=m, p=p, p_score=p_scores, g=g, g_score=g_score)

    def _restore_algorithm_state(self, records: _SwarmState) -> None:
        self._x, self._m, self._p = records.x, records.m, records.p
        self._p_score, self._g, self._g_score = list(records.p_score), records.g, records.g_score
