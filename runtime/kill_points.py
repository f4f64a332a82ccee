"""Named points where a test may SIGKILL this very process.

The resume tests prove that a kill at any instant leaves a run directory that a re-run
completes with the same result as an uninterrupted run. External kills cover "mid-round";
these points cover instants too short to hit from outside. ``AUTOFINETUNE_KILL_AT=<point>``
kills at the first pass of ``<point>``, ``<point>#<n>`` at the n-th; a ``:raise`` suffix
raises ``KilledAtPoint`` instead (a failure Prefect can retry). Unset (always, outside
the tests), ``kill_point`` is a dictionary lookup and nothing else.
"""

from __future__ import annotations

import os
import signal
import threading
from collections import Counter

__all__ = ["kill_point", "KilledAtPoint", "KILL_AT_ENV", "POINTS"]

KILL_AT_ENV = "AUTOFINETUNE_KILL_AT"
POINTS = ("trial_recorded", "round_told", "best_model_copied", "plan_decided", "prune_decided")
_passes: Counter = Counter()
_lock = threading.Lock()


class KilledAtPoint(RuntimeError):
    """Raised at a kill point in ``:raise`` mode."""


def kill_point(name: str) -> None:
    spec = os.environ.get(KILL_AT_ENV)
    if not spec:
        return
    spec, _, mode = spec.partition(":")
    point, _, nth = spec.partition("#")
    if point != name:
        return
    with _lock:
        _passes[name] += 1
        if _passes[name] != int(nth or 1):
            return
    if mode == "raise":
        raise KilledAtPoint(f"{KILL_AT_ENV}={os.environ[KILL_AT_ENV]}")
    os.kill(os.getpid(), signal.SIGKILL)
