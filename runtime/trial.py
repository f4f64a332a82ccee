"""One trial: train.py as a real subprocess on one slot, and what became of it.

The child gets an argv list (never a shell): ``--<name>=<value>`` per hyperparameter in
YAML order, ``--saved_params_dir=<dir>``, for Population-Based rounds after the first
``--model_path=<parent dir>`` (and ``--epochs``), then the forwarded extras. It runs in
its own process group with ``CUDA_VISIBLE_DEVICES`` set to its slot's GPU (empty on a CPU
slot), stdout+stderr into ``round<k>/log-<i>.info``, and reports its score by writing the
file named in ``AUTOFINETUNE_RESULT_FILE`` (see ``autofinetune.report_final_result``).

Outcomes (``trial-<i>.json`` field ``outcome``):
  ok             exit 0 and a finite score
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

from autofinetune import RESULT_FILE_ENV
from runtime.gpu_sampling import GpuSampler
from runtime.slots import Slot, StopCheck

__all__ = ["TrialSpec", "build_argv", "run_trial", "FINAL_OUTCOMES", "RETRYABLE_OUTCOMES",
           "crash_warning", "log_tail", "reap_orphans", "reap_one", "read_pid_file", "process_start_time"]

FINAL_OUTCOMES = frozenset({"ok", "crashed", "killed", "no_result", "invalid_score", "timeout",
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


def _run_once(spec: TrialSpec, slot: Slot, stop: StopCheck) -> dict:
    """Launch the child once and wait for it; the record's outcome fields."""
    result_path = Path(spec.result_path)
    result_path.unlink(missing_ok=True)  # a stale score from an interrupted attempt never counts
    Path(spec.saved_params_dir).mkdir(parents=True, exist_ok=True)
    env = dict(os.environ)
    env.update({RESULT_FILE_ENV: str(result_path), "CUDA_VISIBLE_DEVICES": slot.cuda_visible_devices,
                "PYTHONUNBUFFERED": "1"})
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
    why_killed = None
    while True:
        try:
            code = proc.wait(timeout=_POLL_S)
            break
        except subprocess.TimeoutExpired:
            pass
        if why_killed is None and (stop.is_set() or (deadline and time.monotonic() > deadline)):
            why_killed = "interrupted" if stop.is_set() else "timeout"
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
    if why_killed == "timeout":
        return {"outcome": "timeout", "exit_code": code,
                "error": f"ran past --trial-timeout {spec.timeout_s:g}s; process group killed"}
    if why_killed == "interrupted":
        return {"outcome": "interrupted", "exit_code": code, "error": "search stopped"}
    if code < 0:
        return {"outcome": "killed", "exit_code": code,
                "error": f"killed by signal {signal.Signals(-code).name}"}
    if code != 0:
        return {"outcome": "crashed", "exit_code": code, "error": f"exit status {code}"}
    score, why = _read_score(result_path)
    result_path.unlink(missing_ok=True)
    if why is not None:
        outcome, _, detail = why.partition(": ")
        return {"outcome": outcome, "exit_code": code,
                "error": "exit 0 without report_final_result()" if why == "no_result" else detail}
    return {"outcome": "ok", "exit_code": code, "score": score}


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

