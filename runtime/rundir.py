"""The run directory (``--output-dir``): the original's layout plus machine-readable state.

```
OUTPUT/
  log_file.txt            every trial's hparams and score; the final best
  best_model/             copy of the best trial's saved_params_dir
  visualization/          VisualDL logs
  round0/ .. roundN/
    log-<i>.info          trial i's stdout+stderr
    model-<i>/            trial i's --saved_params_dir
    trial-<i>.json        params, score or failure kind, exit code, GPU, times, parent
  state.json              tuner state + progress, written atomically after each step
```

Every write that another step reads back is atomic (write a temporary file, fsync,
rename), so a kill at any instant leaves either the old or the new file, never half of one.
"""

from __future__ import annotations

import contextlib
import fcntl
import math
import os
import shutil
import socket
import time
import uuid
from pathlib import Path

from runtime.atomic_files import fsync_dir, read_json, write_json_atomic, write_text_atomic
from runtime.kill_points import kill_point
from runtime.state import RunState

__all__ = ["RunDir", "RunDirBusy", "StopMarker", "TrialStop", "trial_rank_key", "START_FILES"]

# What a run puts in its dir before state.json exists (so a run that failed to start may leave them).
START_FILES = (".lock", ".live", ".prefect-server", ".stop")

_FINAL_BEST_HEADER = "The final best hyperparameters:"


def trial_rank_key(record: dict) -> tuple:
    """Sort key, best first: real scores by value, then failures; ties by (round, candidate).

    A failure ranks below every real score (the original scored a crash 0.0, which beat
    real negative scores).
    """
    score = record.get("score")
    ok = record.get("outcome") == "ok" and score is not None and math.isfinite(score)
    return (0 if ok else 1, -score if ok else 0.0, record["round"], record["candidate"])


class RunDirBusy(RuntimeError):
    """Another live search holds this output directory."""


class StopMarker:
    """A stop request every process sharing the run dir sees: the file ``OUTPUT/.stop``.

    The CLI's Ctrl-C/SIGTERM handler sets it; trials poll ``is_set()`` (a stat) wherever they
    run, launch nothing more and terminate their process groups. A search clears it when it
    starts, so a stop never outlives the run it stopped. Picklable: it is only a path.
    """

    def __init__(self, path: str | os.PathLike) -> None:
        self.path = Path(path)

    def is_set(self) -> bool:
        return self.path.exists()

    def set(self) -> None:
        """Request the stop, as this process (its pid is written into the marker)."""
        try:
            self.path.parent.mkdir(parents=True, exist_ok=True)  # a stop before the run dir exists
            self.path.write_text(f"{os.getpid()}\n")
        except OSError:  # read-only or gone: nothing can run there anyway
            pass

    def clear(self) -> None:
        self.path.unlink(missing_ok=True)

    def clear_stale(self) -> None:
        """Remove a marker some other process left (a stopped or killed earlier run); keep
        one this process set (a Ctrl-C while the search was starting)."""
        if self._owner() not in (None, os.getpid()):
            self.clear()

    def clear_own(self) -> None:
        """Remove the marker if this process set it (its stop is served)."""
        if self._owner() == os.getpid():
            self.clear()

    def _owner(self) -> int | None:
        try:
            return int(self.path.read_text().strip() or -1)
        except (OSError, ValueError):
            return None if not self.path.exists() else -1

    def __repr__(self) -> str:
        return f"StopMarker({str(self.path)!r})"


class TrialStop:
    """A trial's stop check: ``OUTPUT/.stop`` is set, or the search that was live when the check
    was made (``RunDir.live_token``) no longer is: it ended, or another search took the dir.

    The second case is a trial task that outlived its search: on Dask a task cancelled after a
    stop may already be on its way to a worker, and reach its launch after the search exited and
    removed its ``.stop``. It must launch nothing (and a trial running then is terminated). The
    token is read at most once a second; the marker is a stat on every call.
    """

    LIVE_CHECK_S = 1.0

    def __init__(self, run_dir: "RunDir") -> None:
        self.run_dir = run_dir
        self.marker = run_dir.stop
        self.token = run_dir.live_token()
        self._next_check = time.monotonic() + self.LIVE_CHECK_S
        self._gone = self.token is None

    def is_set(self) -> bool:
        if self.marker.is_set():
            return True
        now = time.monotonic()
        if not self._gone and now >= self._next_check:
            self._next_check = now + self.LIVE_CHECK_S
            self._gone = self.run_dir.live_token() != self.token
        return self._gone

    def __repr__(self) -> str:
        return f"TrialStop({str(self.run_dir.path)!r})"


class RunDir:
    """Paths and atomic reads/writes of one search's output directory."""

    def __init__(self, path: str | os.PathLike) -> None:
        self.path = Path(path).resolve()

    # -- layout ------------------------------------------------------------------------
    @property
    def state_path(self) -> Path:
        return self.path / "state.json"

    @property
    def log_file(self) -> Path:
        return self.path / "log_file.txt"

    @property
    def best_model(self) -> Path:
        return self.path / "best_model"

    @property
    def visualization(self) -> Path:
        return self.path / "visualization"

    def round_dir(self, k: int) -> Path:
        return self.path / f"round{k}"

    def model_dir(self, k: int, i: int) -> Path:
        return self.round_dir(k) / f"model-{i}"

    def log_path(self, k: int, i: int) -> Path:
        return self.round_dir(k) / f"log-{i}.info"

    def trial_path(self, k: int, i: int) -> Path:
        return self.round_dir(k) / f"trial-{i}.json"

    def result_path(self, k: int, i: int) -> Path:
        """The per-trial file that ``report_final_result`` writes (removed once read)."""
        return self.round_dir(k) / f".result-{i}"

    def report_path(self, k: int, i: int) -> Path:
        """The per-trial file ``report_intermediate`` appends ``<step> <value>`` lines to
        (copied into the record as ``curve``, then removed)."""
        return self.round_dir(k) / f".reports-{i}"

    def prune_path(self, k: int, i: int) -> Path:
        """JSON ``runtime.early_stopping.Decision``: trial i was stopped early; a re-run replays it."""
        return self.round_dir(k) / f".prune-{i}"

    def should_stop_path(self, k: int, i: int) -> Path:
        """Present once trial i was stopped early: what ``should_stop()`` looks for."""
        return self.round_dir(k) / f".should-stop-{i}"

    def pid_path(self, k: int, i: int) -> Path:
        """JSON ``{pid, start, host, slot, gpu, worker}`` of trial i's running process group
        (removed when it ends; ``runtime.trial.read_pid_file``)."""
        return self.round_dir(k) / f".pid-{i}"

    def lost_path(self, k: int, i: int) -> Path:
        """JSON list of trial i's attempts whose Dask worker died under them."""
        return self.round_dir(k) / f".lost-{i}"

    def pid_files(self) -> list[Path]:
        return sorted(self.path.glob("round*/.pid-*"))

    def remove_temp_files(self) -> list[Path]:
        """Remove the half-written temporaries of atomic writes a killed or failed run left
        (``.<name>.tmp-<pid>``, in the run dir and its round dirs); returns them."""
        found = [*self.path.glob(".*.tmp-*"), *self.path.glob("round*/.*.tmp-*")]
        for path in found:
            path.unlink(missing_ok=True)
        return found

    @contextlib.contextmanager
    def lock(self):
        """Hold the run directory for this process: a second live search on it is refused.

        An ``fcntl.flock`` on ``OUTPUT/.lock``: the kernel drops it when the holder dies,
        so a killed search never leaves the directory stuck.
        """
        path = self.path / ".lock"
        fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = os.pread(fd, 64, 0).decode(errors="replace").strip() or "unknown"
            os.close(fd)
            raise RunDirBusy(f"{self.path}: another autofinetune run (pid {holder}) is using this "
                             "output directory; wait for it to finish or choose another --output-dir")
        token = f"{os.getpid()}@{socket.gethostname()} {uuid.uuid4().hex}"
        try:
            os.ftruncate(fd, 0)
            os.pwrite(fd, f"{os.getpid()}\n".encode(), 0)
            write_text_atomic(self.live_path, token + "\n")
            yield
        finally:
            if self.live_token() == token:
                self.live_path.unlink(missing_ok=True)
            os.close(fd)

    @property
    def stop(self) -> StopMarker:
        """``OUTPUT/.stop``: present while a stop is requested."""
        return StopMarker(self.path / ".stop")

    @property
    def live_path(self) -> Path:
        """``OUTPUT/.live``: the token of the process holding ``lock()``, while it holds it."""
        return self.path / ".live"

    def live_token(self) -> str | None:
        """The token of the live search holding the dir (``lock()``), None when there is none.
        A plain file, so a Dask worker on another host sees it whatever the file system's locks
        do; a SIGKILLed holder leaves its token, which the next holder replaces."""
        try:
            return self.live_path.read_text().strip() or None
        except OSError:
            return None

    # -- state -------------------------------------------------------------------------
    def read_state(self) -> RunState | None:
        """``state.json`` as a RunState; None before the first save. RunStateError if damaged."""
        return RunState.load(self.state_path)

    def write_state(self, state: RunState) -> None:
        state.save(self.state_path)

    def read_trial(self, k: int, i: int) -> dict | None:
        return read_json(self.trial_path(k, i))

    def write_trial(self, record: dict) -> None:
        write_json_atomic(self.trial_path(record["round"], record["candidate"]), record)

    def trials(self, rounds: int | None = None, first: int = 0) -> list[dict]:
        """Every recorded trial of rounds ``first .. rounds-1`` (to the last when None), in order."""
        records = []
        k = first
        while (rounds is None or k < rounds) and self.round_dir(k).is_dir():
            files = sorted(self.round_dir(k).glob("trial-*.json"),
                           key=lambda p: int(p.stem.split("-")[1]))
            records.extend(read_json(p) for p in files)
            k += 1
        return records

    # -- best_model --------------------------------------------------------------------
    def replace_best_model(self, src: Path) -> None:
        """Make ``best_model/`` a copy of ``src``, replacing any earlier copy atomically.

        The copy is built beside the target and renamed into place, so ``best_model``
        is always either the old complete copy or the new one (the original failed on
        re-run because the folder already existed).
        """
        src = Path(src)
        staging = self.path / ".best_model.new"
        old = self.path / ".best_model.old"
        for leftover in (staging, old):
            if leftover.exists():
                shutil.rmtree(leftover)
        if src.is_dir():
            shutil.copytree(src, staging)
        else:  # the trial saved nothing: best_model is an empty folder, not an error
            staging.mkdir()
        kill_point("best_model_copied")
        if self.best_model.exists():
            os.rename(self.best_model, old)
        os.rename(staging, self.best_model)
        fsync_dir(self.path)
        if old.exists():
            shutil.rmtree(old)

    def recover_best_model(self) -> None:
        """Finish a ``replace_best_model`` that a kill interrupted between its two renames."""
        old = self.path / ".best_model.old"
        if not self.best_model.exists() and old.exists():
            os.rename(old, self.best_model)
        for leftover in (self.path / ".best_model.new", old):
            if leftover.exists():
                shutil.rmtree(leftover)

    # -- log_file.txt ------------------------------------------------------------------------
    def write_log_file(self, names: list[str], trials: list[dict], *, final: bool,
                       kept: tuple[list[str], dict | None] = ([], None)) -> None:
        """Rewrite ``log_file.txt``: the best so far in the original's wording, then one
        row per trial (hyperparameters, score, saved_params_dir, and what the original
        lacked: round, candidate, outcome and parent checkpoint). A trial stopped early has
        no score; its outcome says the step and value it last reported.

        ``kept``: the rows of the earlier rounds as the file holds them (``kept_log_rows``)
        and the best trial among them; ``trials`` are then only the later rounds' records,
        so that a round's update reads its own records, not every record of the search."""
        rows, best_before = kept
        ok = [t for t in [*trials, *([best_before] if best_before else [])] if t.get("outcome") == "ok"]
        lines = []
        if ok:
            best = min(ok, key=trial_rank_key)
            lines.append(_FINAL_BEST_HEADER if final else "The best hyperparameters so far:")
            lines += [f"{n}\t:\t{best['params'][n]}" for n in names]
            lines.append(f"The final best eval score is {best['score']}." if final
                         else f"The best eval score so far is {best['score']}.")
            lines.append(f"The final best model parameters are saved as {self.best_model} ."
                         if final else f"The best model parameters so far are saved as {self.best_model} .")
        else:
            lines.append("No trial has produced a score yet.")
        lines.append(_log_columns(names))
        lines += rows
        for t in trials:
            score = t["score"] if t.get("outcome") == "ok" else "-"
            outcome = t["outcome"]
            if outcome == "pruned" and t.get("curve"):  # its last reported point
                outcome = f"pruned at step {t['curve'][-1][0]} (last value {t['curve'][-1][1]})"
            lines.append("\t".join([*(str(t["params"][n]) for n in names), str(score),
                                    t["saved_params_dir"], str(t["round"]), str(t["candidate"]),
                                    outcome, t.get("parent") or "-"]))
        write_text_atomic(self.log_file, "\n".join(lines) + "\n")

    def kept_log_rows(self, names: list[str], popsize: int, rounds: int) -> tuple[list[str], int]:
        """The rows ``log_file.txt`` holds for rounds ``0 .. n-1`` (whole rounds, n <= ``rounds``),
        and n; ``([], 0)`` when it is missing or not as ``write_log_file`` writes it."""
        try:
            lines = self.log_file.read_text().splitlines()
            rows = lines[lines.index(_log_columns(names)) + 1:]
        except (OSError, ValueError):  # missing, unreadable, or another header
            return [], 0
        n = min(len(rows) // popsize, rounds)
        rows = rows[:n * popsize]
        width = len(names) + 6
        for j, row in enumerate(rows):  # each row in its place: round j // popsize, candidate j % popsize
            fields = row.split("\t")
            if len(fields) != width or fields[-4:-2] != [str(j // popsize), str(j % popsize)]:
                return [], 0
        return rows, n


def _log_columns(names: list[str]) -> str:
    return "\t".join([*names, "score", "saved_params_dir", "round", "candidate", "outcome", "parent"])
