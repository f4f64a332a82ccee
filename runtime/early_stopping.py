"""Early stopping: which trials to stop before they finish, as pure functions of their curves.

A train.py reports intermediate scores with ``autofinetune.report_intermediate(value, step)``
(a line ``<step> <value>`` appended to its per-trial report file); the trial runner reads
each new point as it comes and asks ``decide`` whether the trial goes on. A trial that is
stopped ("pruned") sees ``should_stop()`` turn true, has ``grace_s`` seconds to exit, and
its process group then gets SIGTERM, then SIGKILL (``runtime.trial``).

The rules (``--early-stop``; higher values are better):

- ``median``: the median stopping rule of Google Vizier (Golovin et al., "Google Vizier: A
  Service for Black-Box Optimization", KDD 2017, §3.2.2): stop a trial at step s when its best
  value so far is strictly worse than the median of the running averages, up to s, of the
  completed trials' curves. (Ray Tune's ``MedianStoppingRule``; Optuna's ``MedianPruner``
  takes the median of the values at s instead of the running averages.)
- ``asha``: asynchronous successive halving (Li et al., "A System for Massively Parallel
  Hyperparameter Tuning", MLSys 2020), in its stopping form (as Ray Tune's ``ASHAScheduler``
  and Optuna's ``SuccessiveHalvingPruner``): rungs at steps r·η^j (r = ``min_resource``,
  η = ``reduction_factor``, j = 0, 1, ...); a trial that reaches a rung goes on only if its
  value there is among the top ⌊n/η⌋ (at least the top one) of the n values recorded at that
  rung: its own and those of every reference trial that reached the rung (completed or
  stopped at a later rung, from every earlier round of the search).

No trial is stopped at a step below ``min_steps``.

What "deterministic" means here. Trials of one round run concurrently, on local slots or on
Dask workers on other hosts; a rule that looked at whatever the other running trials had
reported at that instant would decide differently from run to run. So the reference of a
trial of round k is frozen when the round starts: the curves of the trials of rounds 0..k-1
(their ``trial-<i>.json`` records, in the shared run dir). A decision is then a pure function
of the trial's own curve and that reference: the same reports give the same decisions, on any
number of slots or workers, in any order, and after a resume. Every new point is judged in
order, including points the runner reads only after the process exited, so when a decision
falls does not depend on polling. Consequences: round 0 is never stopped (it is the
reference; Optuna's pruners also wait for ``n_startup_trials``), and the reference grows by
one round at a time. A decision is also written to the run dir before it is acted on
(``round<k>/.prune-<i>``) and a re-run of the trial (a resume) replays it, so a resume decides
the same even for a train.py that is not itself deterministic (GPU kernels).

Curves: points come in report order; a point whose step is not greater than the one before
is ignored, and a value that is not a finite number (training diverged) counts as the worst
possible value (it is stored as ``null``).
"""

from __future__ import annotations

import math
import statistics
from dataclasses import asdict, dataclass
from typing import Any, Sequence

__all__ = ["EARLY_STOP_RULES", "EarlyStopConfig", "Decision", "Reference", "parse_reports", "decide",
           "running_average", "rung_steps", "rung_value"]

EARLY_STOP_RULES = ("off", "median", "asha")

Curve = Sequence[Sequence]  # [[step, value or None], ...], steps increasing


@dataclass(frozen=True)
class EarlyStopConfig:
    """The early-stopping rule and its constants (``--early-stop*``)."""

    rule: str = "off"  # off | median | asha
    min_steps: int = 1  # no trial is stopped at a step below this
    reduction_factor: int = 3  # asha: η; the top 1/η of a rung's values go on
    min_resource: int = 1  # asha: the first rung's step r; rungs at r·η^j
    grace_s: float = 30.0  # from should_stop() turning true to SIGTERM of the trial's process group

    def __post_init__(self) -> None:
        if self.rule not in EARLY_STOP_RULES:
            raise ValueError(f"early-stop rule {self.rule!r} is not one of {', '.join(EARLY_STOP_RULES)}")
        for name, low in (("min_steps", 0), ("reduction_factor", 2), ("min_resource", 1)):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < low:
                raise ValueError(f"early-stop {name} must be an integer >= {low}, got {value!r}")
        if isinstance(self.grace_s, bool) or not isinstance(self.grace_s, (int, float)) \
                or not 0 <= self.grace_s < math.inf:
            raise ValueError(f"early-stop grace_s must be a number of seconds >= 0, got {self.grace_s!r}")

    @property
    def enabled(self) -> bool:
        return self.rule != "off"

    def to_json(self) -> dict:
        return asdict(self)

    @classmethod
    def from_json(cls, d: Any) -> EarlyStopConfig:
        if not isinstance(d, dict) or set(d) != {f for f in cls.__dataclass_fields__}:
            raise ValueError(f"an early-stop config holds exactly {', '.join(cls.__dataclass_fields__)}, got {d!r}")
        return cls(**d)


@dataclass(frozen=True)
class Decision:
    """A trial stopped at ``step``, where it reported ``value`` (None: not finite)."""

    step: int
    value: float | None
    rule: str
    reason: str

    def to_json(self) -> dict:
        return asdict(self)

    @classmethod
    def from_json(cls, d: Any) -> Decision:
        if not isinstance(d, dict) or set(d) != {"step", "value", "rule", "reason"}:
            raise ValueError(f"a pruning decision holds step, value, rule and reason, got {d!r}")
        return cls(step=int(d["step"]), value=None if d["value"] is None else float(d["value"]),
                   rule=str(d["rule"]), reason=str(d["reason"]))


@dataclass(frozen=True)
class Reference:
    """The curves a round's decisions are judged against: those of every earlier round.

    ``completed``: curves of trials that finished (outcome ok) — the median rule's reference.
    ``reached``: those plus the curves of stopped trials — ASHA counts every value recorded at
    a rung, also of a trial stopped at a later rung.
    """

    completed: tuple[tuple[tuple[int, float | None], ...], ...] = ()
    reached: tuple[tuple[tuple[int, float | None], ...], ...] = ()

    @classmethod
    def from_records(cls, records: Sequence[dict]) -> Reference:
        """From ``trial-<i>.json`` records (their ``curve``), in the order given."""
        def curve(r: dict) -> tuple:
            return tuple((int(s), v) for s, v in r.get("curve") or ())
        completed = tuple(curve(r) for r in records if r.get("outcome") == "ok" and r.get("curve"))
        reached = tuple(curve(r) for r in records if r.get("outcome") in ("ok", "pruned") and r.get("curve"))
        return cls(completed=completed, reached=reached)


def parse_reports(text: str, after: int | None = None) -> list[tuple[int, float | None]]:
    """The points in a report file's complete lines ``<step> <value>``, steps increasing
    (beyond ``after``, the last step already read); malformed lines are skipped."""
    points = []
    last = after
    for line in text.splitlines():
        parts = line.split()
        if len(parts) != 2:
            continue
        try:
            step, value = int(parts[0]), float(parts[1])
        except ValueError:
            continue
        if last is not None and step <= last:
            continue
        points.append((step, value if math.isfinite(value) else None))
        last = step
    return points


def _v(value: float | None) -> float:
    return -math.inf if value is None else value


def running_average(curve: Curve, step: int) -> float | None:
    """The mean of the curve's values at steps <= ``step`` (None: no such value)."""
    values = [_v(v) for s, v in curve if s <= step]
    return sum(values) / len(values) if values else None


def rung_steps(min_resource: int, reduction_factor: int, up_to: int) -> list[int]:
    """ASHA's rungs r·η^j that are <= ``up_to``."""
    steps, step = [], min_resource
    while step <= up_to:
        steps.append(step)
        step *= reduction_factor
    return steps


def rung_value(curve: Curve, rung: int) -> float | None:
    """A curve's value at a rung: at its first step >= the rung (None: it never got there)."""
    for s, v in curve:
        if s >= rung:
            return _v(v)
    return None


def _median(config: EarlyStopConfig, curve: Curve, reference: Reference) -> Decision | None:
    step, value = curve[-1]
    averages = [a for a in (running_average(c, step) for c in reference.completed) if a is not None]
    if not averages:
        return None
    median = statistics.median(averages)
    best = max(_v(v) for _, v in curve)
    if best < median:
        return Decision(step, value, "median",
                        f"its best value so far {best:.6g} is below the median {median:.6g} of the running "
                        f"averages of {len(averages)} completed trials at step {step}")
    return None


def _asha(config: EarlyStopConfig, curve: Curve, reference: Reference) -> Decision | None:
    step, value = curve[-1]
    before = curve[-2][0] if len(curve) > 1 else -1
    eta = config.reduction_factor
    for rung in rung_steps(config.min_resource, eta, step):
        if rung <= before or rung < config.min_steps:
            continue  # judged at an earlier point, or too early to judge
        values = [v for v in (rung_value(c, rung) for c in reference.reached) if v is not None]
        values.append(_v(value))
        keep = max(1, len(values) // eta)
        cutoff = sorted(values, reverse=True)[keep - 1]
        if _v(value) < cutoff:
            return Decision(step, value, "asha",
                            f"its value {_v(value):.6g} at rung {rung} is not among the top {keep} of the "
                            f"{len(values)} values recorded there (the cut-off is {cutoff:.6g})")
    return None


def decide(config: EarlyStopConfig, curve: Curve, reference: Reference) -> Decision | None:
    """Whether a trial whose reports so far are ``curve`` stops at its last point (a Decision)
    or goes on (None). Pure: call it once per new point, in order."""
    if not config.enabled or not curve or curve[-1][0] < config.min_steps:
        return None
    return (_median if config.rule == "median" else _asha)(config, curve, reference)
