"""Prefect's embedded (ephemeral) API server, when a search was killed.

Without ``PREFECT_API_URL`` a search starts Prefect's API as a child process. Measured:
after a SIGKILL of the CLI that child keeps running (holding the dead parent's stdout),
so each kill-and-resume would leave one more server behind. The search records its
server's pid in the run dir; the next run on that dir stops the recorded server when its
parent is gone.
"""

from __future__ import annotations

import os
import signal
import time
from pathlib import Path

from runtime.trial import process_start_time

__all__ = ["record_ephemeral_server", "reap_stale_server", "kill_own_servers", "children_serving_prefect"]

_MARK = b"prefect.server.api.server:create_app"


def children_serving_prefect(parent: int) -> list[int]:
    """The pids of ``parent``'s children that serve Prefect's API (an embedded server)."""
    found = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            ppid = int((entry / "stat").read_text().rsplit(")", 1)[1].split()[1])
            if ppid == parent and _MARK in (entry / "cmdline").read_bytes():
                found.append(int(entry.name))
        except (FileNotFoundError, ProcessLookupError, PermissionError, IndexError):
            continue
    return found


def record_ephemeral_server(path: Path) -> int | None:
    """Write ``<pid> <start time>`` of this process's ephemeral Prefect server (if any)."""
    servers = children_serving_prefect(os.getpid())
    if not servers:
        path.unlink(missing_ok=True)
        return None
    path.write_text(f"{servers[0]} {process_start_time(servers[0])}\n")
    return servers[0]


def reap_stale_server(path: Path) -> int | None:
    """Stop the server recorded in ``path`` if it outlived the search that started it."""
    try:
        pid_text, start = path.read_text().split()
    except (FileNotFoundError, ValueError):
        return None
    pid = int(pid_text)
    path.unlink(missing_ok=True)
    if process_start_time(pid) != start:
        return None  # gone, or the pid now belongs to another process
    try:
        if _MARK not in Path(f"/proc/{pid}/cmdline").read_bytes():
            return None
        os.kill(pid, signal.SIGTERM)
    except (FileNotFoundError, ProcessLookupError):
        return None
    deadline = time.monotonic() + 10
    while process_start_time(pid) == start and time.monotonic() < deadline:
        time.sleep(0.1)
    if process_start_time(pid) == start:
        os.kill(pid, signal.SIGKILL)
    return pid


def kill_own_servers() -> list[int]:
    """SIGKILL this process's embedded servers (when it must exit at once)."""
    servers = children_serving_prefect(os.getpid())
    for pid in servers:
        try:
            os.kill(pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
    return servers
