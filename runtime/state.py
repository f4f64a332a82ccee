"""The run state, ``OUTPUT/state.json``: where a search stands, as typed, versioned records.

::

    {"version": 1,                       # RUN_STATE_VERSION (the tuner's own is TUNER_STATE_VERSION)
     "search": {strategy, evaluator, popsize, seed, space},   # SearchKey: what a resume must match
     "rounds": N,                        # may be raised by a resume to extend a finished search
     "next_round": k,                    # the first round whose scores the tuner has not been told
     "pending_round": k | null,          # the round the tuner's pending candidates belong to
     "tuner": {...},                     # tuner.state_dict(), taken after every ask and every tell
     "best": {round, candidate, score} | null,          # BestTrial: the trial best_model/ holds
     "plan": {round, parents, assignment} | null,       # ParentPlan: Population-Based parents
     "run": {script, python, cwd, extras, ..., early_stop}}  # RunOptions: this invocation's options

``RunState.load`` refuses a file that is not such a record (garbage, ``[]``, a missing or
unknown field, a wrong type) with one line naming the file and what is wrong; a state of
another version gets its own error. ``save`` writes atomically. The tuner's state is kept
as the tuner's JSON and checked by the tuner when it is loaded.
"""

from __future__ import annotations

import dataclasses
import json
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from runtime.atomic_files import write_json_atomic
from runtime.early_stopping import EarlyStopConfig

__all__ = ["RUN_STATE_VERSION", "RunStateError", "RunStateVersionError", "SearchKey", "RunOptions",
           "BestTrial", "Parent", "ParentPlan", "RunState"]

RUN_STATE_VERSION = 1
_FIX = "restore it from a backup, or start over with a new --output-dir"


class RunStateError(ValueError):
    """``state.json`` cannot be read as a run state (corrupt, empty, wrong shape)."""


class RunStateVersionError(RunStateError):
    """``state.json`` was written by another run-state version."""


class _Shape(ValueError):
    """What is wrong with one field; turned into a RunStateError naming the file."""


def _fields(cls: type, d: Any, where: str) -> dict[str, Any]:
    """``d``'s values for ``cls``'s fields; refuses a non-object, missing and unknown keys
    (every field is written, defaults included, so every field must be there)."""
    if not isinstance(d, dict):
        raise _Shape(f"{where} is {type(d).__name__}, expected an object")
    names = [f.name for f in dataclasses.fields(cls)]
    missing = [n for n in names if n not in d]
    if missing:
        raise _Shape(f"{where} lacks {', '.join(repr(n) for n in missing)}")
    unknown = [k for k in d if k not in names]
    if unknown:
        raise _Shape(f"{where} has unknown field(s) {', '.join(repr(k) for k in unknown)}")
    return {n: d[n] for n in names}


def _int(v: Any, where: str, *, low: int = 0, none: bool = False) -> int | None:
    if v is None and none:
        return None
    if isinstance(v, bool) or not isinstance(v, int) or v < low:
        raise _Shape(f"{where} is {v!r}, expected an integer >= {low}" + (" or null" if none else ""))
    return v


def _number(v: Any, where: str, *, none: bool = False) -> float | None:
    if v is None and none:
        return None
    if isinstance(v, bool) or not isinstance(v, (int, float)) or not math.isfinite(v):
        raise _Shape(f"{where} is {v!r}, expected a finite number" + (" or null" if none else ""))
    return v


def _str(v: Any, where: str) -> str:
    if not isinstance(v, str):
        raise _Shape(f"{where} is {v!r}, expected a string")
    return v


def _dict(v: Any, where: str) -> dict:
    if not isinstance(v, dict):
        raise _Shape(f"{where} is {type(v).__name__}, expected an object")
    return v


@dataclass(frozen=True)
class SearchKey:
    """What makes a search itself: a resume must ask for the same (``--seed`` may be omitted)."""

    strategy: str
    evaluator: str
    popsize: int
    seed: int | None  # None only before the run draws one (settings); always set on disk
    space: dict  # SearchSpace.to_dict()

    @classmethod
    def from_json(cls, d: Any, where: str = "search") -> SearchKey:
        v = _fields(cls, d, where)
        return cls(strategy=_str(v["strategy"], f"{where}.strategy"),
                   evaluator=_str(v["evaluator"], f"{where}.evaluator"),
                   popsize=_int(v["popsize"], f"{where}.popsize", low=1),
                   seed=_int(v["seed"], f"{where}.seed", none=True),
                   space=_dict(v["space"], f"{where}.space"))


@dataclass(frozen=True)
class RunOptions:
    """This invocation's options: how trials are run. A resume may change them."""

    script: str
    python: str
    cwd: str
    extras: list  # [[KEY, VALUE], ...] forwarded as --KEY=VALUE
    trial_timeout: float | None
    trial_retries: int
    pbt_epochs: int
    keep_checkpoints: str  # "all" | "needed"
    slots: list  # [{"index", "gpu", "ordinal", "uuid"}, ...]
    early_stop: EarlyStopConfig = field(default_factory=EarlyStopConfig)

    @classmethod
    def from_json(cls, d: Any, where: str = "run") -> RunOptions:
        if isinstance(d, dict) and "early_stop" not in d:  # written before early stopping existed: off
            d = {**d, "early_stop": EarlyStopConfig().to_json()}
        v = _fields(cls, d, where)
        try:
            early_stop = EarlyStopConfig.from_json(v["early_stop"])
        except (TypeError, ValueError) as exc:
            raise _Shape(f"{where}.early_stop: {exc}") from None
        extras = v["extras"]
        if not isinstance(extras, list) or not all(
                isinstance(p, list) and len(p) == 2 and all(isinstance(s, str) for s in p) for p in extras):
            raise _Shape(f"{where}.extras is {extras!r}, expected a list of [KEY, VALUE] strings")
        if not isinstance(v["slots"], list) or not all(isinstance(s, dict) for s in v["slots"]):
            raise _Shape(f"{where}.slots is {v['slots']!r}, expected a list of objects")
        timeout = _number(v["trial_timeout"], f"{where}.trial_timeout", none=True)
        return cls(script=_str(v["script"], f"{where}.script"), python=_str(v["python"], f"{where}.python"),
                   cwd=_str(v["cwd"], f"{where}.cwd"), extras=[list(p) for p in extras],
                   trial_timeout=timeout, trial_retries=_int(v["trial_retries"], f"{where}.trial_retries"),
                   pbt_epochs=_int(v["pbt_epochs"], f"{where}.pbt_epochs"),
                   keep_checkpoints=_str(v["keep_checkpoints"], f"{where}.keep_checkpoints"),
                   slots=list(v["slots"]), early_stop=early_stop)


@dataclass(frozen=True)
class BestTrial:
    """The trial whose model ``best_model/`` holds."""

    round: int
    candidate: int
    score: float

    @classmethod
    def from_json(cls, d: Any, where: str = "best") -> BestTrial:
        v = _fields(cls, d, where)
        return cls(round=_int(v["round"], f"{where}.round"), candidate=_int(v["candidate"], f"{where}.candidate"),
                   score=_number(v["score"], f"{where}.score"))


@dataclass(frozen=True)
class Parent:
    """A checkpoint that candidates of the next round continue from (Population-Based)."""

    name: str  # "round<k>/model-<i>"
    model_path: str
    round: int
    candidate: int
    score: float

    @classmethod
    def from_json(cls, d: Any, where: str = "parent") -> Parent:
        v = _fields(cls, d, where)
        return cls(name=_str(v["name"], f"{where}.name"), model_path=_str(v["model_path"], f"{where}.model_path"),
                   round=_int(v["round"], f"{where}.round"), candidate=_int(v["candidate"], f"{where}.candidate"),
                   score=_number(v["score"], f"{where}.score"))


@dataclass(frozen=True)
class ParentPlan:
    """Round ``round``'s parents, best first, and the parent of each of its candidates."""

    round: int
    parents: tuple[Parent, ...]
    assignment: tuple[Parent | None, ...]  # one per candidate; None: train from scratch

    def to_json(self) -> dict:
        return {"round": self.round, "parents": [dataclasses.asdict(p) for p in self.parents],
                "assignment": [None if p is None else dataclasses.asdict(p) for p in self.assignment]}

    @classmethod
    def from_json(cls, d: Any, where: str = "plan") -> ParentPlan:
        v = _fields(cls, d, where)
        for key in ("parents", "assignment"):
            if not isinstance(v[key], list):
                raise _Shape(f"{where}.{key} is {v[key]!r}, expected a list")
        return cls(round=_int(v["round"], f"{where}.round"),
                   parents=tuple(Parent.from_json(p, f"{where}.parents[{j}]") for j, p in enumerate(v["parents"])),
                   assignment=tuple(None if p is None else Parent.from_json(p, f"{where}.assignment[{j}]")
                                    for j, p in enumerate(v["assignment"])))


@dataclass
class RunState:
    """The contents of ``state.json``; mutate the fields, then ``save``."""

    search: SearchKey
    rounds: int
    tuner: dict
    run: RunOptions
    next_round: int = 0
    pending_round: int | None = None
    best: BestTrial | None = None
    plan: ParentPlan | None = None
    version: int = field(default=RUN_STATE_VERSION)

    def to_json(self) -> dict:
        return {"version": self.version, "search": dataclasses.asdict(self.search), "rounds": self.rounds,
                "next_round": self.next_round, "pending_round": self.pending_round, "tuner": self.tuner,
                "best": None if self.best is None else dataclasses.asdict(self.best),
                "plan": None if self.plan is None else self.plan.to_json(),
                "run": dataclasses.asdict(self.run)}

    @classmethod
    def from_json(cls, d: Any) -> RunState:
        """Parse a state; raises ``_Shape`` (or RunStateVersionError) saying what is wrong."""
        if not isinstance(d, dict):
            raise _Shape(f"the file holds {type(d).__name__ if d is not None else 'null'}, expected an object")
        if "version" in d and d["version"] != RUN_STATE_VERSION:
            raise RunStateVersionError(f"run-state version {d['version']!r} is not {RUN_STATE_VERSION}")
        v = _fields(cls, d, "the state")
        return cls(version=_int(v["version"], "version"), search=SearchKey.from_json(v["search"]),
                   rounds=_int(v["rounds"], "rounds", low=1), tuner=_dict(v["tuner"], "tuner"),
                   run=RunOptions.from_json(v["run"]), next_round=_int(v["next_round"], "next_round"),
                   pending_round=_int(v["pending_round"], "pending_round", none=True),
                   best=None if v["best"] is None else BestTrial.from_json(v["best"]),
                   plan=None if v["plan"] is None else ParentPlan.from_json(v["plan"]))

    @classmethod
    def load(cls, path: Path) -> RunState | None:
        """The state in ``path``; None when there is no such file. One-line errors name the file."""
        path = Path(path)
        try:
            text = path.read_text(encoding="utf-8")
        except FileNotFoundError:
            return None
        except (OSError, UnicodeDecodeError) as exc:
            raise RunStateError(f"{path}: cannot be read ({exc}); {_FIX}") from None
        try:
            data = json.loads(text)
        except json.JSONDecodeError as exc:
            what = "is empty" if not text.strip() else f"is not JSON ({exc.msg} at line {exc.lineno})"
            raise RunStateError(f"{path}: {what}; {_FIX}") from None
        try:
            return cls.from_json(data)
        except RunStateVersionError as exc:
            raise RunStateVersionError(
                f"{path}: {exc}: it was written by another autofinetune version; use a new --output-dir") from None
        except _Shape as exc:
            raise RunStateError(f"{path}: not an autofinetune run state: {exc}; {_FIX}") from None

    def save(self, path: Path) -> None:
        write_json_atomic(Path(path), self.to_json())
