"""Failures of the environment, not of the input: the CLI's exit status 3, "could not run".

A read-only or unwritable output dir, a full disk, a Prefect API that cannot be reached at
start or stops answering mid-search. Each becomes one or two lines naming the cause and
the fix, with the resume hint; the run dir is left resumable (its state is only ever
replaced atomically) and free of half-written ``.tmp`` files.

A dead API is detected here, not by Prefect's client: the client retries each call with
back-off for about five minutes, during which the search neither progresses nor stops.
``ApiWatchdog`` asks the API's ``/health`` every ``PROBE_EVERY_S`` and declares it dead
after ``dead_after_s`` without an answer (``AUTOFINETUNE_API_DEAD_AFTER_S``, default 20 s:
a healthy server answers ``/health`` in milliseconds even on a loaded 2-core machine, and
20 s rides out a stalled event loop; a real outage is then reported within about 30 s).
"""

from __future__ import annotations

import errno
import logging
import os
import threading
import time
import urllib.error
import urllib.request
from pathlib import Path
from typing import Callable

__all__ = ["EXIT_COULD_NOT_RUN", "CouldNotRun", "check_writable", "describe_failure", "probe_api",
           "ApiWatchdog", "QuietConsole", "dead_after_s"]

EXIT_COULD_NOT_RUN = 3
PROBE_EVERY_S = 2.0
_PROBE_TIMEOUT_S = 5.0
_NO_SPACE = {errno.ENOSPC, errno.EDQUOT}
_NOT_WRITABLE = {errno.EROFS, errno.EACCES, errno.EPERM}
_ENVIRONMENT_ERRNOS = _NO_SPACE | _NOT_WRITABLE | {errno.EIO}


class CouldNotRun(Exception):
    """The environment refuses (exit 3); the message names the cause and the fix."""


def dead_after_s() -> float:
    return float(os.environ.get("AUTOFINETUNE_API_DEAD_AFTER_S", "20"))


def check_writable(output_dir: Path) -> None:
    """Refuse an output dir this process cannot write to, before anything is created."""
    existing = Path(output_dir).absolute()
    while not existing.exists():
        existing = existing.parent
    if os.access(existing, os.W_OK | os.X_OK) and existing.is_dir():
        return
    if not existing.is_dir():
        why = "not a directory"
    elif os.statvfs(existing).f_flag & os.ST_RDONLY:
        why = "read-only file system"
    else:
        why = "permission denied"
    raise CouldNotRun(f"--output-dir {output_dir}: cannot write to {existing} ({why}); pick a "
                      "writable --output-dir, or fix that directory's permissions")


def _causes(exc: BaseException):
    seen = set()
    stack = [exc]
    while stack:
        e = stack.pop()
        if e is None or id(e) in seen:
            continue
        seen.add(id(e))
        yield e
        stack += [e.__cause__, e.__context__, *getattr(e, "exceptions", ())]


def _api_failure(exc: BaseException) -> bool:
    name = type(exc).__module__ + "." + type(exc).__name__
    return (name.startswith("httpx.") and ("Connect" in name or "Timeout" in name or "Network" in name)
            or isinstance(exc, RuntimeError) and str(exc).startswith("Failed to reach API"))


def describe_failure(exc: BaseException, output_dir: Path, api_url: str | None) -> str | None:
    """The one-line cause and fix when ``exc`` is the environment's failure, else None."""
    resume = f"then re-run the same command with --output-dir {output_dir} to resume"
    for e in _causes(exc):
        if isinstance(e, CouldNotRun):
            return str(e)
        if isinstance(e, OSError) and e.errno in _ENVIRONMENT_ERRNOS:
            where = f" writing {e.filename}" if e.filename else ""
            if e.errno in _NO_SPACE:
                return f"no space left on the device{where}; free space there, {resume}"
            if e.errno == errno.EIO:
                return f"input/output error{where}; check the disk, {resume}"
            return f"cannot write{where} ({e.strerror}); fix the permissions or the mount, {resume}"
    for e in _causes(exc):
        if _api_failure(e):
            return (f"the Prefect API at {api_url or 'PREFECT_API_URL'} did not answer ({e}); "
                    f"start it again, {resume}")
    return None


def probe_api(api_url: str, timeout: float = _PROBE_TIMEOUT_S) -> str | None:
    """None when ``{api_url}/health`` answers 200, else why not (one short phrase)."""
    opener = urllib.request.build_opener(urllib.request.ProxyHandler({}))
    try:
        with opener.open(api_url.rstrip("/") + "/health", timeout=timeout) as response:
            return None if response.status == 200 else f"HTTP {response.status}"
    except urllib.error.HTTPError as exc:
        return f"HTTP {exc.code}"
    except (urllib.error.URLError, OSError) as exc:
        reason = getattr(exc, "reason", exc)
        return str(reason.strerror if isinstance(reason, OSError) and reason.strerror else reason)


class ApiWatchdog(threading.Thread):
    """Probes the API in the background; calls ``on_dead(reason)`` once it stays silent for
    ``dead_after`` seconds. ``down`` is true from the first failed probe to the next good one."""

    def __init__(self, api_url: str, on_dead: Callable[[str], None], dead_after: float) -> None:
        super().__init__(name="autofinetune-api-watchdog", daemon=True)
        self.api_url, self.on_dead, self.dead_after = api_url, on_dead, dead_after
        self.down = False
        self._stopping = threading.Event()

    def run(self) -> None:
        last_answer = time.monotonic()
        while not self._stopping.wait(PROBE_EVERY_S):
            reason = probe_api(self.api_url, timeout=min(_PROBE_TIMEOUT_S, self.dead_after))
            if reason is None:
                last_answer, self.down = time.monotonic(), False
                continue
            self.down = True
            if time.monotonic() - last_answer >= self.dead_after:
                self.on_dead(f"no answer for {time.monotonic() - last_answer:.0f} s: {reason}")
                return

    def stop(self) -> None:
        self._stopping.set()


class QuietConsole(logging.Filter):
    """On Prefect's console handler: no traceback screens for an environment failure (the
    CLI prints the cause once), and no event-delivery noise while the API is known down.
    The records still reach Prefect's API log handler untouched."""

    _NOISY = ("prefect.events.clients", "prefect._internal.concurrency")

    def __init__(self, watchdog: ApiWatchdog | None = None) -> None:
        super().__init__()
        self.watchdog = watchdog

    def filter(self, record: logging.LogRecord) -> bool:
        if self.watchdog is not None and self.watchdog.down and record.name.startswith(self._NOISY):
            return False
        exc = record.exc_info[1] if record.exc_info else None
        return exc is None or describe_failure(exc, Path("."), None) is None
