"""One trial: train.py as a real subprocess on one slot, and what became of it.

The child gets an argv list (never a shell): ``--<name>=<value>`` per hyperparameter in
YAML order, ``--saved_params_dir=<dir>``, for Population-Based rounds after the first
``--model_path=<parent dir>`` (and ``--epochs``), then the forwarded extras. It runs in
its own process group with ``CUDA_VISIBLE_DEVICES`` set to its slot's GPU (empty on a CPU
slot), stdout+stderr into ``round<k>/log-<i>.info``, and reports its score by writing the
file named in ``AUTOFINETUNE_RESULT_FILE`` (see ``autofinetune.report_final_result``).
Intermediate scores it appends to ``AUTOFINETUNE_REPORT_FILE`` (``report_intermediate``) are
read while it runs and kept in the record as ``curve``; with an early-stopping rule each new
point is judged (``runtime.early_stopping.decide``), and a trial judged hopeless sees
``should_stop()`` (the file ``AUTOFINETUNE_STOP_FILE``) turn true, gets ``grace_s`` seconds
to exit, then its process group gets SIGTERM and, 5 s later, SIGKILL.

Outcomes (``trial-<i>.json`` field ``outcome``):
  ok             exit 0 and a finite score
  pruned         stopped early by the --early-stop rule (``pruned``: step, value, rule, reason),
                 whatever its exit; judged on every point it reported, also the last ones
  crashed        non-zero exit status (a score it may have reported is ignored)
  killed         ended by a signal it did not ask for (OOM killer, a kill -9)
  no_result      exit 0 but never reported
  invalid_score  reported something that is not a finite number
  timeout        ran past --trial-timeout; its whole process group was killed
  failed_to_start  the interpreter or script could not be executed
  worker_lost    the Dask worker running it died (process killed, node lost) more often
                 than retries allow (``--trial-retries``, at least 1 for this kind)
  interrupted    the search was stopped while it ran, or before it started (not final:
                 a resumed search runs it again)
Only ``killed`` and ``failed_to_start`` are retried (``--trial-retries``): an error exit or
a bad score would only repeat.
"""

from __future__ import annotations

import json
import math
import os
import signal
import socket
import subprocess
import time
from collections import deque
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path

from autofinetune import REPORT_FILE_ENV, RESULT_FILE_ENV, STOP_FILE_ENV
from runtime.atomic_files import read_json, write_json_atomic
from runtime.early_stopping import Decision, EarlyStopConfig, Reference, decide, parse_reports
from runtime.gpu_sampling import GpuSampler
from runtime.kill_points import kill_point
from runtime.slots import Slot, StopCheck

__all__ = ["TrialSpec", "build_argv", "run_trial", "FINAL_OUTCOMES", "RETRYABLE_OUTCOMES",
           "crash_warning", "log_tail", "outcome_counts", "reap_orphans", "reap_one", "read_pid_file", "process_start_time"]

FINAL_OUTCOMES = frozenset({"ok", "pruned", "crashed", "killed", "no_result", "invalid_score", "timeout",
                            "failed_to_start", "worker_lost"})
RETRYABLE_OUTCOMES = frozenset({"killed", "failed_to_start"})
_TERM_GRACE_S = 5.0  # between SIGTERM and SIGKILL of a trial's process group
_POLL_S = 0.05  # how often a running trial checks its deadline and the stop flag


@dataclass(frozen=True)
class TrialSpec:
    round: int
    candidate: int
    params: dict  # name -> value, YAML order
    flags: list  # [[name, value-as-text], ...] for the hyperparameters, YAML order
    python: str
    script: str
    cwd: str
    saved_params_dir: str
    log_path: str
    result_path: str
    pid_path: str  # JSON {pid, start, host, slot, gpu} while the process group runs: a resume reaps orphans
    model_path: str | None = None  # parent checkpoint (Population-Based rounds after the first)
    parent: str | None = None  # the parent as "round<k>/model-<i>"
    extras: list = field(default_factory=list)  # [[KEY, VALUE], ...] forwarded as --KEY=VALUE
    timeout_s: float | None = None
    retries: int = 0
    report_path: str | None = None  # AUTOFINETUNE_REPORT_FILE (None: intermediate reports are not read)
    prune_path: str | None = None  # the persisted early-stopping decision (runtime.rundir.RunDir.prune_path)
    should_stop_path: str | None = None  # AUTOFINETUNE_STOP_FILE
    early_stop: EarlyStopConfig = field(default_factory=EarlyStopConfig)
    reference: Reference = field(default_factory=Reference)  # the earlier rounds' curves


def build_argv(spec: TrialSpec) -> list[str]:
    argv = [spec.python, spec.script]
    argv += [f"--{name}={value}" for name, value in spec.flags]
    argv.append(f"--saved_params_dir={spec.saved_params_dir}")
    if spec.model_path is not None:
        argv.append(f"--model_path={spec.model_path}")
    argv += [f"--{key}={value}" for key, value in spec.extras]
    return argv


def _now() -> str:
    return datetime.now(timezone.utc).isoformat(timespec="milliseconds")


def _kill_group(pgid: int, sig: int) -> None:
    try:
        os.killpg(pgid, sig)
    except (ProcessLookupError, PermissionError):
        pass


def process_start_time(pid: int) -> str | None:
    """The kernel's start time of ``pid`` (tells a live process from a reused pid), or None."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            fields = f.read().rsplit(")", 1)[1].split()
    except (FileNotFoundError, ProcessLookupError):
        return None
    return None if fields[0] == "Z" else fields[19]


def read_pid_file(path: Path) -> dict | None:
    """A running trial's ``{"pid", "start", "host", "slot", "gpu"}``; None when gone or unreadable."""
    try:
        info = json.loads(Path(path).read_text())
        int(info["pid"]), str(info["start"])
    except (FileNotFoundError, ValueError, KeyError, TypeError):
        return None
    return info


def reap_one(path: Path, *, keep_foreign: bool = False) -> tuple[dict | None, bool]:
    """Kill the process group a pid file names if it still runs on this host (a pid means
    nothing elsewhere), and remove the file, or with ``keep_foreign`` keep the file of a
    trial on another host. Returns (what the file said or None, whether a group was killed)."""
    info = read_pid_file(path)
    here = info is None or info.get("host", socket.gethostname()) == socket.gethostname()
    killed = here and info is not None and process_start_time(int(info["pid"])) == str(info["start"])
    if killed:
        _kill_group(int(info["pid"]), signal.SIGKILL)
    if here or not keep_foreign:
        Path(path).unlink(missing_ok=True)
    return info, killed


def reap_orphans(pid_files: list[Path]) -> list[int]:
    """Kill the process groups of trials whose search was SIGKILLed (their pid files remain).

    Such an orphan would otherwise go on writing into the model dir that the resumed run
    gives to the re-run of the same trial. Only trials started on this host are reaped.
    Returns the process groups killed.
    """
    reaped = [reap_one(path, keep_foreign=True) for path in pid_files]
    return [int(info["pid"]) for info, killed in reaped if killed]


def _read_score(path: Path) -> tuple[float | None, str | None]:
    """(score, None) or (None, why it is not a score)."""
    try:
        text = path.read_text(encoding="utf-8").strip()
    except FileNotFoundError:
        return None, "no_result"
    try:
        score = float(text)
    except ValueError:
        return None, f"invalid_score: reported {text[:80]!r}, which is not a number"
    if not math.isfinite(score):
        return None, f"invalid_score: reported {score!r}, which is not a finite number"
    return score, None


class _CurveWatch:
    """One attempt's intermediate reports, read as they grow, each new point judged in order.

    A decision is written to ``prune_path`` before ``should_stop_path`` is created, and one
    found there at the start (a resumed trial) is replayed: the trial stops at that step again.
    """

    def __init__(self, spec: TrialSpec) -> None:
        self.spec = spec
        self.points: list[tuple[int, float | None]] = []
        self.decision: Decision | None = None
        self._offset = 0
        self._partial = b""
        replay = read_json(Path(spec.prune_path)) if spec.prune_path and spec.early_stop.enabled else None
        self._replay = Decision.from_json(replay) if replay else None
        if self._replay is not None and self._replay.rule != spec.early_stop.rule:
            self._replay = None  # decided under another rule (the resume changed --early-stop)
        for path in (spec.report_path, spec.should_stop_path):
            if path:
                Path(path).unlink(missing_ok=True)  # a stale report or stop from an earlier attempt

    def poll(self, *, final: bool = False) -> bool:
        """Read new complete lines (at ``final``, the last partial one too); True on a new decision."""
        if not self.spec.report_path or self.decision is not None and not final:
            return False
        try:
            with open(self.spec.report_path, "rb") as f:
                f.seek(self._offset)
                data = f.read()
        except FileNotFoundError:
            data = b""
        self._offset += len(data)
        data = self._partial + data
        complete, _, self._partial = data.rpartition(b"\n")
        if final:
            complete, self._partial = data, b""
        before = self.decision
        last = self.points[-1][0] if self.points else None
        for point in parse_reports(complete.decode(errors="replace"), after=last):
            self.points.append(point)
            if self.decision is None:
                self.decision = self._judge()
        if final and self.decision is None and self._replay is not None:
            self.decision = self._replay  # the re-run ended before the replayed step: it stands
        if self.decision is not None and before is None:
            self._act()
            return True
        return False

    def _judge(self) -> Decision | None:
        if self._replay is not None:
            return self._replay if self.points[-1][0] >= self._replay.step else None
        return decide(self.spec.early_stop, self.points, self.spec.reference)

    def _act(self) -> None:
        if self.decision is not self._replay:
            write_json_atomic(Path(self.spec.prune_path), self.decision.to_json())
            kill_point("prune_decided")
        Path(self.spec.should_stop_path).write_text(f"{self.decision.step}\n")

    def outcome_fields(self) -> dict:
        return {"curve": [list(p) for p in self.points]} if self.points else {}


def _run_once(spec: TrialSpec, slot: Slot, stop: StopCheck) -> dict:
    """Launch the child once and wait for it; the record's outcome fields."""
    result_path = Path(spec.result_path)
    result_path.unlink(missing_ok=True)  # a stale score from an interrupted attempt never counts
    Path(spec.saved_params_dir).mkdir(parents=True, exist_ok=True)
    curve = _CurveWatch(spec)
    env = dict(os.environ)
    env.update({RESULT_FILE_ENV: str(result_path), "CUDA_VISIBLE_DEVICES": slot.cuda_visible_devices,
                "PYTHONUNBUFFERED": "1"})
    for name, path in ((REPORT_FILE_ENV, spec.report_path), (STOP_FILE_ENV, spec.should_stop_path)):
        if path:
            env[name] = str(path)
    # GPU indices are NVML's, which follow PCI bus order; CUDA's default order (fastest
    # first) can differ on a machine with mixed GPUs, so make CUDA count the same way.
    # A slot's id (an index or a GPU-/MIG- UUID) is passed exactly as it was written.
    env["CUDA_DEVICE_ORDER"] = "PCI_BUS_ID"
    if stop.is_set():
        return {"outcome": "interrupted", "exit_code": None, "error": "stopped before launch"}
    with open(spec.log_path, "ab") as log:
        try:
            proc = subprocess.Popen(build_argv(spec), stdout=log, stderr=subprocess.STDOUT,
                                    stdin=subprocess.DEVNULL, cwd=spec.cwd, env=env,
                                    start_new_session=True)
        except OSError as exc:
            log.write(f"autofinetune: failed to start: {exc}\n".encode())
            return {"outcome": "failed_to_start", "exit_code": None, "error": str(exc)}
    pid_path = Path(spec.pid_path)
    pid_path.write_text(json.dumps({"pid": proc.pid, "start": process_start_time(proc.pid),
                                    "host": socket.gethostname(), "slot": slot.index, "gpu": slot.gpu,
                                    "worker": slot.worker}) + "\n")
    deadline = None if spec.timeout_s is None else time.monotonic() + spec.timeout_s
    grace_ends = None  # a pruned trial's time to exit by itself
    why_killed = None
    while True:
        try:
            code = proc.wait(timeout=_POLL_S)
            break
        except subprocess.TimeoutExpired:
            pass
        if curve.poll():
            grace_ends = time.monotonic() + spec.early_stop.grace_s
        now = time.monotonic()
        if why_killed is None and (stop.is_set() or (deadline and now > deadline)
                                   or (grace_ends is not None and now >= grace_ends)):
            why_killed = "interrupted" if stop.is_set() else "pruned" if curve.decision else "timeout"
            _kill_group(proc.pid, signal.SIGTERM)
            try:
                code = proc.wait(timeout=_TERM_GRACE_S)
                break
            except subprocess.TimeoutExpired:
                _kill_group(proc.pid, signal.SIGKILL)
    if why_killed is None and code in _STOPPING_SIGNALS and _stop_follows(stop):
        why_killed = "interrupted"  # a service manager stopping everything (systemd, a pod) got here first
    # Whatever the leader did, nothing of the trial outlives it (dataloader workers, shells).
    _kill_group(proc.pid, signal.SIGKILL)
    pid_path.unlink(missing_ok=True)
    curve.poll(final=True)  # what it reported last is judged too, whenever the runner read it
    if spec.should_stop_path:
        Path(spec.should_stop_path).unlink(missing_ok=True)
    if why_killed == "interrupted":
        return {"outcome": "interrupted", "exit_code": code, "error": "search stopped"}
    if curve.decision is not None:
        d = curve.decision
        how = "it ignored should_stop() and was terminated" if why_killed == "pruned" else "it exited"
        return {"outcome": "pruned", "exit_code": code, "pruned": d.to_json(), **curve.outcome_fields(),
                "error": f"stopped early by the {d.rule} rule at step {d.step} (value {d.value}): "
                         f"{d.reason}; {how}"}
    if why_killed == "timeout":
        return {"outcome": "timeout", "exit_code": code,
                "error": f"ran past --trial-timeout {spec.timeout_s:g}s; process group killed",
                **curve.outcome_fields()}
    if code < 0:
        return {"outcome": "killed", "exit_code": code,
                "error": f"killed by signal {signal.Signals(-code).name}", **curve.outcome_fields()}
    if code != 0:
        return {"outcome": "crashed", "exit_code": code, "error": f"exit status {code}", **curve.outcome_fields()}
    score, why = _read_score(result_path)
    result_path.unlink(missing_ok=True)
    if why is not None:
        outcome, _, detail = why.partition(": ")
        return {"outcome": outcome, "exit_code": code, **curve.outcome_fields(),
                "error": "exit 0 without report_final_result()" if why == "no_result" else detail}
    return {"outcome": "ok", "exit_code": code, "score": score, **curve.outcome_fields()}


# Exit codes of a trial ended by the signals that stop a whole service or session: when
# the search's own stop follows within a second, the trial was interrupted (re-run on
# resume), not killed by something else.
_STOPPING_SIGNALS = frozenset({-signal.SIGTERM, -signal.SIGINT, -signal.SIGHUP})


def _stop_follows(stop: StopCheck, within_s: float = 1.0) -> bool:
    deadline = time.monotonic() + within_s
    while not stop.is_set():
        if time.monotonic() > deadline:
            return False
        time.sleep(0.05)
    return True


def run_trial(spec: TrialSpec, slot: Slot, *, stop: StopCheck, gpu_sampler: GpuSampler | None = None) -> dict:
    """Run the trial (with retries of signal kills and failed starts) and return its record.

    ``stop``: anything with ``is_set()`` (a ``StopMarker`` in the run dir, a threading.Event);
    once it is set no attempt starts and a running one's process group is terminated.
    ``gpu_sampler`` (default: one for the slot's GPU) samples the GPU while the trial runs.
    """
    Path(spec.log_path).parent.mkdir(parents=True, exist_ok=True)
    Path(spec.log_path).write_bytes(b"")  # a re-run (resume) starts a fresh log
    started, t0 = _now(), time.monotonic()
    attempts = []
    sampler = gpu_sampler if gpu_sampler is not None else GpuSampler(slot.uuid or slot.gpu)
    with sampler:
        while True:
            outcome = _run_once(spec, slot, stop)
            attempts.append(outcome)
            if outcome["outcome"] not in RETRYABLE_OUTCOMES or len(attempts) > spec.retries or stop.is_set():
                break
            with open(spec.log_path, "ab") as log:
                log.write(f"\nautofinetune: attempt {len(attempts)} {outcome['outcome']} "
                          f"({outcome.get('error')}); retrying\n".encode())
    Path(spec.result_path).unlink(missing_ok=True)  # a crash's report never lingers
    if spec.report_path:
        Path(spec.report_path).unlink(missing_ok=True)  # the record holds the curve
    record = {
        "round": spec.round, "candidate": spec.candidate, "params": spec.params,
        "score": None, "error": None, **attempts[-1],
        "attempts": len(attempts),
        "retried_after": [a["outcome"] for a in attempts[:-1]],
        "slot": slot.index, "gpu": slot.gpu, "gpu_uuid": slot.uuid,
        "started_at": started, "ended_at": _now(), "duration_s": round(time.monotonic() - t0, 3),
        "saved_params_dir": spec.saved_params_dir, "model_path": spec.model_path,
        "parent": spec.parent, "log": spec.log_path, "argv": build_argv(spec),
        "host": socket.gethostname(), "worker": slot.worker,
    }
    if sampler.sampled:
        record["gpu_samples"] = sampler.samples
    if sampler.error:
        record["gpu_sampling_error"] = sampler.error
    return record


def outcome_counts(records) -> dict[str, int]:
    """``{"ok", "pruned", "failed"}``: trials finished with a score, stopped early, failed (any
    other final outcome); unfinished (interrupted) ones are not counted."""
    counts = {"ok": 0, "pruned": 0, "failed": 0}
    for r in records:
        if r.get("outcome") in FINAL_OUTCOMES:
            counts[r["outcome"] if r["outcome"] in ("ok", "pruned") else "failed"] += 1
    return counts


def crash_warning(record: dict) -> str:
    """The original's warning for a failed trial, plus what failed and where its log is."""
    params = ", ".join(f"{k}={v}" for k, v in record["params"].items())
    return (f"WARNING: Program which was ran with hyperparameters as {params} was crashed! "
            f"({record['outcome']}: {record.get('error')}; log: {record['log']})")


def log_tail(path: str | Path, lines: int = 20) -> str:
    """The last ``lines`` lines of a trial log (what goes to the Prefect task log and so to the
    terminal), with control characters (colour codes, cursor moves, ``\r``) shown as ``?``."""
    try:
        with open(path, "rb") as f:
            f.seek(0, os.SEEK_END)
            f.seek(max(0, f.tell() - 64 * 1024))
            tail = deque(f.read().decode(errors="replace").splitlines(), maxlen=lines)
    except FileNotFoundError:
        return ""
    return "\n".join("".join(ch if ch.isprintable() or ch == "\t" else "?" for ch in line) for line in tail)

