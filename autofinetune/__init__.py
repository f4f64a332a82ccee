"""The tiny library a train.py imports to report its score to autofinetune.

Standard library only: it must import in any environment a trial runs in, and it never
imports Prefect or the rest of autofinetune.

The channel is one file per trial, named by the environment variable
``AUTOFINETUNE_RESULT_FILE`` that autofinetune sets for every trial it launches. The file
holds the score as plain text (a decimal float, e.g. ``0.9375``), so a script in any
language can report by writing that file itself. The original (PaddleHub) used one shared
file per host, so two searches on one machine mixed their results; a file per trial cannot.
"""

from __future__ import annotations

import math
import os
import sys

__all__ = ["RESULT_FILE_ENV", "report_final_result"]

RESULT_FILE_ENV = "AUTOFINETUNE_RESULT_FILE"


def report_final_result(score: float) -> None:
    """Report this trial's final score: higher is better (the original's range is (-inf, 1]).

    Call it once, at the end of training. Calling it again replaces the earlier value.
    Outside autofinetune (the variable is unset) the score is printed and nothing is written,
    so the same train.py still runs by hand.
    """
    if isinstance(score, bool):
        raise TypeError(f"report_final_result expects a number, got a bool: {score!r}")
    value = float(score)  # accepts numpy scalars, ints, 0-d tensors with __float__
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
