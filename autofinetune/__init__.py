"""The tiny library a train.py imports to report to autofinetune.

Standard library only: it must import in any environment a trial runs in, and it never
imports Prefect or the rest of autofinetune.

Three calls, each through one per-trial file named by an environment variable that
autofinetune sets for every trial it launches, so a script in any language can do the same
with plain file operations:

- ``report_final_result(score)``: the file ``AUTOFINETUNE_RESULT_FILE`` holds the score as
  plain text (a decimal float, e.g. ``0.9375``). The original (PaddleHub) used one shared file
  per host, so two searches on one machine mixed their results; a file per trial cannot.
- ``report_intermediate(value, step)``: appends the line ``<step> <value>`` (an integer, a
  space, a decimal float) to ``AUTOFINETUNE_REPORT_FILE``; the early-stopping rules
  (``--early-stop``) read these curves.
- ``should_stop()``: True once the file ``AUTOFINETUNE_STOP_FILE`` exists, i.e. the search
  decided to stop this trial early (it is hopeless); save if you like and exit. A script that
  ignores it is terminated after ``--early-stop-grace`` seconds.

A script that reports no intermediates runs exactly as before.
"""

from __future__ import annotations

import math
import os
import sys

__all__ = ["RESULT_FILE_ENV", "REPORT_FILE_ENV", "STOP_FILE_ENV", "report_final_result",
           "report_intermediate", "should_stop"]

RESULT_FILE_ENV = "AUTOFINETUNE_RESULT_FILE"
REPORT_FILE_ENV = "AUTOFINETUNE_REPORT_FILE"
STOP_FILE_ENV = "AUTOFINETUNE_STOP_FILE"


def _number(value: float, what: str) -> float:
    if isinstance(value, bool):
        raise TypeError(f"{what} expects a number, got a bool: {value!r}")
    return float(value)  # accepts numpy scalars, ints, 0-d tensors with __float__


def report_final_result(score: float) -> None:
    """Report this trial's final score: higher is better (the original's range is (-inf, 1]).

    Call it once, at the end of training. Calling it again replaces the earlier value.
    Outside autofinetune (the variable is unset) the score is printed and nothing is written,
    so the same train.py still runs by hand.
    """
    value = _number(score, "report_final_result")
    path = os.environ.get(RESULT_FILE_ENV)
    if not path:
        print(f"autofinetune: final result {value!r} (not running under autofinetune; nothing reported)",
              file=sys.stderr)
        return
    if not math.isfinite(value):
        print(f"autofinetune: WARNING: reporting a non-finite score {value!r}; the trial will count as failed",
              file=sys.stderr)
    tmp = f"{path}.tmp-{os.getpid()}"
    with open(tmp, "w", encoding="utf-8") as f:
        f.write(repr(value) + "\n")
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)  # atomic: the reader never sees a half-written number


def report_intermediate(value: float, step: int) -> None:
    """Report the validation score ``value`` (higher is better) after ``step`` (an epoch, an
    evaluation; steps must grow). Outside autofinetune it does nothing."""
    number = _number(value, "report_intermediate")
    if isinstance(step, bool) or int(step) != step or step < 0:
        raise ValueError(f"report_intermediate: step must be an integer >= 0, got {step!r}")
    path = os.environ.get(REPORT_FILE_ENV)
    if not path:
        return
    # One write of one short line to a file opened for appending: it lands whole, after
    # every earlier line, even when the reader is on another host of a shared filesystem.
    fd = os.open(path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
    try:
        os.write(fd, f"{int(step)} {number!r}\n".encode())
    finally:
        os.close(fd)


def should_stop() -> bool:
    """True once the search decided to stop this trial early: save if you like, then exit."""
    path = os.environ.get(STOP_FILE_ENV)
    return bool(path) and os.path.exists(path)
