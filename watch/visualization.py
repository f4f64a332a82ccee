"""VisualDL logs of a search in ``OUTPUT/visualization``: ``visualdl --logdir OUTPUT/visualization``.

A watcher (see ``watch.watchers``) that writes, after each told round k (step = k):

```
visualization/                      main run, as the original
  hyperparameter_tuning/<name>            <name> of the best trial of rounds 0..k
  hyperparameter_tuning/best_eval_value   the best score of rounds 0..k
  gpu/<id>/utilization, gpu/<id>/memory_used   GPU telemetry (percent, MiB; see below)
visualization/pop_<i>/              one run per population member, as the original
  population_transformation/<name>        candidate i's <name> in round k
  population_transformation/eval_value    candidate i's score in round k
visualization/trials/r<k>-c<i>/     one run per trial, for the HParams (parallel coordinates) view
  an hparams record: every hyperparameter plus "round" and "outcome"; metric trial/eval_value
  trial/eval_value                        its score, at step k
  trial/intermediate_value                its report_intermediate curve, at the steps it reported
```

Beyond the original, and decisions it did not have to make:

- A failed trial (crash, no report, NaN, timeout, ...) has no score, so nothing is written
  for ``population_transformation/eval_value`` or ``trial/eval_value`` at its step; its
  hyperparameters are written, and in the HParams view it appears with ``outcome`` (a
  string axis) and an empty metric, so the regions that crash are visible. Until some
  trial succeeds, ``hyperparameter_tuning/*`` has no point (there is no best yet).
- Intermediate curves (``report_intermediate``; early stopping reads them) go to each trial's
  run, one point per reported step, so VisualDL's scalar view shows every trial's curve with
  the step on the x-axis, a trial stopped early ending where it stopped. Its HParams
  ``outcome`` is ``pruned``. A value that was not a finite number is not drawn. The curves
  are written with the round, like everything else here.
- The best is ``runtime.rundir.trial_rank_key``'s: failures below every score, ties to the
  earliest trial, the same trial as ``best_model/``.
- A hyperparameter whose value is not a number (a ``choice`` of strings) has no scalar
  curve; it is in the HParams view. VisualDL stores scalars as 32-bit floats; the HParams
  view and ``trial-<i>.json`` keep full precision.
- GPU telemetry: a trial record with ``"gpu": "<id>"`` and ``"gpu_samples": [{"t": seconds
  since the trial started, "utilization": percent, "memory_used_mib": int}, ...]`` gives
  ``gpu/<id>/utilization`` and ``gpu/<id>/memory_used`` (MiB). Their step is a per-GPU
  sample counter: the GPU's samples of earlier rounds plus the sample's place, by time,
  in this round, so it only grows, across rounds and resumes, and is the same whenever
  the round is written. Their wall time is the real sampling time (``started_at + t``):
  VisualDL's "wall time" x-axis shows when. Without samples (no NVML) nothing is written.

Resume without duplicates. VisualDL reads only the newest ``vdlrecords*`` file of each
folder (``LogReader.logs`` sorts the names and takes the last), and a ``LogWriter`` given
an existing file name appends to it; so one file per round does not work, and appending
blindly duplicates a round that a resumed run tells again. Here each run has one file,
``vdlrecords.autofinetune.log``, that grows by one segment per round (encoded by
VisualDL's own ``LogWriter`` in a scratch folder, then appended and fsynced), and
``visualization/.index.json`` records how many rounds are written and every file's size
after them. Writing round k first truncates each file back to its recorded size (dropping
what a kill left half written), and the index, replaced atomically after the segments,
is the commit point. A round the index already holds is not written again; rounds it
lacks (a kill after the tuner update but before the notification) are written on the
next ``search_started`` or ``round_finished``. A live ``visualdl`` server reads the
appended segments as they come.
"""

from __future__ import annotations

import logging
import math
import os
import tempfile
from collections import Counter, defaultdict
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path
from typing import Any, Sequence

from runtime.atomic_files import read_json, write_json_atomic
from runtime.rundir import RunDir, trial_rank_key

__all__ = ["Scalar", "TrialHParams", "RoundPoints", "round_points", "trial_run", "VisualDLLogs",
           "VisualDLWatcher", "MAIN_RUN", "TRIAL_METRIC", "TRIAL_CURVE", "LOG_FILE_NAME"]

_log = logging.getLogger("autofinetune.visualization")

MAIN_RUN = "."                              # the run in visualization/ itself
TRIAL_METRIC = "trial/eval_value"           # the HParams view's metric, in each trial's run
TRIAL_CURVE = "trial/intermediate_value"    # a trial's report_intermediate points, step = its step
LOG_FILE_NAME = "vdlrecords.autofinetune.log"  # VisualDL reads files whose name has "vdlrecords"
_INDEX_NAME = ".index.json"
_INDEX_VERSION = 1


@dataclass(frozen=True)
class Scalar:
    run: str                  # folder under visualization/ ("." for the main run)
    tag: str
    step: int
    value: float
    walltime_ms: int | None   # None: the time of writing


@dataclass(frozen=True)
class TrialHParams:
    run: str
    hparams: dict[str, int | float | str]
    metrics: tuple[str, ...]
    walltime_ms: int | None   # VisualDL lists trials in the HParams view by this time


@dataclass(frozen=True)
class RoundPoints:
    """What round k adds to the VisualDL logs."""
    scalars: list[Scalar]
    hparams: list[TrialHParams]

    def runs(self) -> list[str]:
        """Every run this round writes to, in first-appearance order."""
        return list(dict.fromkeys(p.run for p in [*self.scalars, *self.hparams]))


def _is_ok(record: dict) -> bool:
    score = record.get("score")
    return (record.get("outcome") == "ok" and isinstance(score, (int, float))
            and math.isfinite(score))


def _number(value: Any) -> float | None:
    """A hyperparameter value as a scalar curve's value, or None (a string choice)."""
    if isinstance(value, (int, float)) and math.isfinite(value):
        return float(value)
    return None


def _hparam_value(value: Any) -> int | float | str:
    """An HParams-view value: VisualDL takes int, float and str (a bool would become 0/1)."""
    if isinstance(value, bool) or not isinstance(value, (int, float, str)):
        return str(value)
    return value


def _ms(timestamp: str | None) -> int | None:
    """``2024-01-01T00:00:00.000+00:00`` -> milliseconds since the epoch."""
    if not timestamp:
        return None
    try:
        return round(datetime.fromisoformat(timestamp).timestamp() * 1000)
    except (TypeError, ValueError):
        return None


def _gpu_samples(record: dict) -> list[dict]:
    """The record's usable GPU samples (a dict with a finite ``t``), or none without a GPU id."""
    if record.get("gpu") is None:
        return []
    samples = record.get("gpu_samples") or []
    return [s for s in samples if isinstance(s, dict) and isinstance(s.get("t"), (int, float))
            and math.isfinite(s["t"])]


def _gpu_scalars(k: int, rounds: Sequence[Sequence[dict]]) -> list[Scalar]:
    """GPU telemetry of round k; step = per-GPU sample counter over rounds 0..k, by time."""
    before = Counter()
    for records in rounds[:k]:
        for r in records:
            before[str(r.get("gpu"))] += len(_gpu_samples(r))
    by_gpu: dict[str, list[tuple[float, int, int | None, dict]]] = defaultdict(list)
    for r in rounds[k]:
        start = _ms(r.get("started_at"))
        for s in _gpu_samples(r):
            at = None if start is None else start + round(s["t"] * 1000)
            by_gpu[str(r["gpu"])].append(((start or 0) + s["t"] * 1000, r["candidate"], at, s))
    scalars = []
    for gpu, samples in by_gpu.items():
        samples.sort(key=lambda x: (x[0], x[1]))
        for j, (_, _, at, s) in enumerate(samples):
            step = before[gpu] + j
            for key, tag in (("utilization", "utilization"), ("memory_used_mib", "memory_used")):
                value = _number(s.get(key))
                if value is not None:
                    scalars.append(Scalar(MAIN_RUN, f"gpu/{gpu}/{tag}", step, value, at))
    return scalars


def trial_run(k: int, i: int) -> str:
    return f"trials/r{k}-c{i}"


def round_points(k: int, rounds: Sequence[Sequence[dict]], names: Sequence[str]) -> RoundPoints:
    """The points round k adds, from the records of rounds 0..k (``rounds[j]``: round j's).

    Pure: the same records give the same points, so a re-written round is identical.
    """
    if not 0 <= k < len(rounds):
        raise ValueError(f"round_points needs the records of rounds 0..{k}, got {len(rounds)} rounds")
    records = sorted(rounds[k], key=lambda r: r["candidate"])
    ends = [t for t in (_ms(r.get("ended_at")) for r in records) if t is not None]
    round_time = max(ends) if ends else None
    scalars: list[Scalar] = []
    ok = [r for past in rounds[:k + 1] for r in past if _is_ok(r)]
    if ok:
        best = min(ok, key=trial_rank_key)
        for name in names:
            value = _number(best["params"].get(name))
            if value is not None:
                scalars.append(Scalar(MAIN_RUN, f"hyperparameter_tuning/{name}", k, value, round_time))
        scalars.append(Scalar(MAIN_RUN, "hyperparameter_tuning/best_eval_value", k,
                              float(best["score"]), round_time))
    scalars += _gpu_scalars(k, rounds)
    hparams = []
    for r in records:
        i, params = r["candidate"], r["params"]
        pop = f"pop_{i}"
        for name in names:
            value = _number(params.get(name))
            if value is not None:
                scalars.append(Scalar(pop, f"population_transformation/{name}", k, value, round_time))
        if _is_ok(r):
            scalars.append(Scalar(pop, "population_transformation/eval_value", k,
                                  float(r["score"]), round_time))
        values = {name: _hparam_value(params[name]) for name in names if name in params}
        for extra, value in (("round", k), ("outcome", str(r.get("outcome")))):
            values.setdefault(extra, value)  # a hyperparameter of that name wins
        hparams.append(TrialHParams(trial_run(k, i), values, (TRIAL_METRIC,),
                                    _ms(r.get("started_at"))))
        if _is_ok(r):
            scalars.append(Scalar(trial_run(k, i), TRIAL_METRIC, k, float(r["score"]),
                                  _ms(r.get("ended_at")) or round_time))
        for step, value in r.get("curve") or ():
            if _number(value) is not None:
                scalars.append(Scalar(trial_run(k, i), TRIAL_CURVE, int(step), float(value),
                                      _ms(r.get("started_at")) or round_time))
    return RoundPoints(scalars, hparams)


# -- writing -------------------------------------------------------------------------------

def _encode(points: RoundPoints, run: str, scratch: Path) -> bytes:
    """One run's segment of round k, as VisualDL's own LogWriter frames it."""
    from visualdl import LogWriter  # slow to import: only when a round is written

    folder = Path(tempfile.mkdtemp(dir=scratch))
    with LogWriter(logdir=str(folder), file_name=LOG_FILE_NAME) as writer:
        for h in points.hparams:
            if h.run == run:
                writer.add_hparams(dict(h.hparams), list(h.metrics), walltime=h.walltime_ms)
        for s in points.scalars:
            if s.run == run:
                writer.add_scalar(s.tag, s.value, s.step, walltime=s.walltime_ms)
    return (folder / LOG_FILE_NAME).read_bytes()


def _append_at(path: Path, size: int, data: bytes) -> int:
    """Cut ``path`` back to ``size`` bytes, append ``data``, fsync; the new size."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
    try:
        os.ftruncate(fd, size)
        os.lseek(fd, size, os.SEEK_SET)
        view = memoryview(data)
        while view:
            view = view[os.write(fd, view):]
        os.fsync(fd)
        return size + len(data)
    finally:
        os.close(fd)


class VisualDLLogs:
    """The logs under one ``visualization/`` folder: which rounds they hold; add a round."""

    def __init__(self, path: str | os.PathLike) -> None:
        self.path = Path(path)

    @property
    def index_path(self) -> Path:
        return self.path / _INDEX_NAME

    def log_path(self, run: str) -> Path:
        return self.path / run / LOG_FILE_NAME

    def read_index(self) -> dict:
        """``{"version", "rounds": n written, "sizes": {run: bytes}}``; a fresh index when the
        file is missing, from another version, or no longer matches the logs (edited by hand)."""
        fresh = {"version": _INDEX_VERSION, "rounds": 0, "sizes": {}}
        try:
            index = read_json(self.index_path)
        except (OSError, ValueError):
            return fresh
        if (not isinstance(index, dict) or index.get("version") != _INDEX_VERSION
                or not isinstance(index.get("rounds"), int) or not isinstance(index.get("sizes"), dict)):
            return fresh
        for run, size in index["sizes"].items():
            path = self.log_path(run)
            if not isinstance(size, int) or not path.is_file() or path.stat().st_size < size:
                _log.warning("%s does not match %s; rewriting the VisualDL logs", path, self.index_path)
                return fresh
        return index

    @property
    def rounds_written(self) -> int:
        return self.read_index()["rounds"]

    def write_round(self, k: int, points: RoundPoints) -> None:
        """Add round k (which must be the next one) to every run it touches, then commit."""
        index = self.read_index()
        if k != index["rounds"]:
            raise ValueError(f"{self.path}: round {k} cannot follow the {index['rounds']} "
                             "rounds written")
        sizes = dict(index["sizes"])
        self.path.mkdir(parents=True, exist_ok=True)
        with tempfile.TemporaryDirectory(prefix="autofinetune-vdl-") as scratch:
            for run in points.runs():
                data = _encode(points, run, Path(scratch))
                sizes[run] = _append_at(self.log_path(run), sizes.get(run, 0), data)
        write_json_atomic(self.index_path, {"version": _INDEX_VERSION, "rounds": k + 1, "sizes": sizes})


class VisualDLWatcher:
    """Watcher: after each told round, adds it to ``OUTPUT/visualization`` (see the module doc).

    Keeps the records of the told rounds (from ``search_started``'s ``trials`` and each
    ``round_finished``; missing ones are read from the run dir), writes every told round
    the logs lack, in order, and never writes a round twice.
    """

    def __init__(self, *, output_dir: str | os.PathLike, names: Sequence[str]) -> None:
        self._run_dir = RunDir(output_dir)
        self._names = list(names)
        self._logs = VisualDLLogs(self._run_dir.visualization)
        self._rounds: dict[int, list[dict]] = {}

    @property
    def logs(self) -> VisualDLLogs:
        return self._logs

    def search_started(self, info: dict) -> None:
        told = info.get("next_round", 0)
        by_round: dict[int, list[dict]] = defaultdict(list)
        for record in info.get("trials") or ():
            if record is not None and record["round"] < told:
                by_round[record["round"]].append(record)
        self._rounds.update(by_round)
        if told:
            self._catch_up(told - 1)

    def round_finished(self, k: int, records: list[dict], best: dict | None) -> None:
        self._rounds[k] = list(records)
        self._catch_up(k)

    def _history(self, k: int) -> list[list[dict]]:
        missing = [j for j in range(k + 1) if j not in self._rounds]
        if missing:
            by_round: dict[int, list[dict]] = defaultdict(list)
            for record in self._run_dir.trials(rounds=k + 1):
                by_round[record["round"]].append(record)
            for j in missing:
                self._rounds[j] = by_round.get(j, [])
        return [self._rounds[j] for j in range(k + 1)]

    def _catch_up(self, k: int) -> None:
        first = self._logs.rounds_written
        if first > k:
            return  # already written (a resumed run telling a round again)
        history = self._history(k)
        for j in range(first, k + 1):
            self._logs.write_round(j, round_points(j, history, self._names))
            self._rounds[j] = _kept_for_later(history[j])


def _kept_for_later(records: list[dict]) -> list[dict]:
    """What the points of later rounds need of a written round: its best scored trial (the
    best so far is the best of the rounds' bests) and its GPU samples (later samples' steps
    count them). So the watcher holds a few records per round, not every record of the
    search (~3.5 KB each in memory: 17 MB at 5,000 trials)."""
    ok = [r for r in records if _is_ok(r)]
    kept = [min(ok, key=trial_rank_key)] if ok else []
    kept += [{"round": r["round"], "candidate": r["candidate"], "gpu": r["gpu"], "gpu_samples": _gpu_samples(r)}
             for r in records if _gpu_samples(r) and r not in kept]  # the best counts its own
    return kept

    def trial_started(self, k: int, i: int, slot: dict, params: dict) -> None:
        pass

    def trial_finished(self, record: dict) -> None:
        pass

    def search_finished(self, summary: dict) -> None:
        pass

    def close(self) -> None:
        pass
