"""A space-filling first round: a maximin Latin hypercube in the box [-1, 1]^n (numpy only).

Latin hypercube sampling (McKay, Beckman & Conover, Technometrics 21(2), 1979): each of n
points takes a different one of n equal strata on every axis, at a uniform position within
its stratum, the strata matched at random across axes; every axis is thus covered evenly,
unlike n uniform points, which cluster. Among ``tries`` such designs we keep the one whose
smallest distance between two of its points, or from one of them to the points in
``avoid`` (the user's init point), is largest (the "maximin" criterion, Morris & Mitchell,
J. Stat. Plan. Inference 43, 1995), so round 0 does not spend a trial next to the init
point or next to another trial.

Written here, not taken from ``scipy.stats.qmc``, so that a PSHE2 search loads no scipy.
"""

from __future__ import annotations

import numpy as np

__all__ = ["maximin_latin_hypercube"]


def maximin_latin_hypercube(rng: np.random.Generator, n: int, dim: int, *, avoid: np.ndarray | None = None,
                            tries: int = 16) -> np.ndarray:
    """``n`` points of [-1, 1]^dim, shape (n, dim), drawn from ``rng`` (always ``tries`` designs)."""
    if n <= 0:
        return np.zeros((0, dim))
    others = np.zeros((0, dim)) if avoid is None else np.asarray(avoid, dtype=np.float64).reshape(-1, dim)
    best, best_gap = None, -1.0
    for _ in range(tries):
        strata = np.argsort(rng.random((n, dim)), axis=0)  # a random permutation of 0..n-1 per axis
        design = -1.0 + 2.0 * (strata + rng.random((n, dim))) / n
        points = np.concatenate([design, others])
        gaps = np.linalg.norm(points[:, None, :] - points[None, :, :], axis=-1)
        gaps[np.arange(len(points)), np.arange(len(points))] = np.inf
        gap = float(gaps[:n].min()) if len(points) > 1 else 0.0
        if gap > best_gap:
            best, best_gap = design, gap
    assert best is not None
    return best
