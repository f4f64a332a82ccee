"""GPU telemetry at search start, with NVML (``nvidia-ml-py``): a watcher (see ``watch.watchers``).

At search start it prints the GPUs the search uses, one line each, and warns when one is
already busy with another program (pid and command line, from
``nvmlDeviceGetComputeRunningProcesses`` and ``/proc``). The per-trial utilization and
memory samples are taken where the trial runs (``runtime.gpu_sampling``) and arrive in
the trial's record.

Without NVML (no driver, no GPU, no library) one info line says so; a machine without
GPUs is normal for this tool, never an error. A GPU is read by its NVML UUID when the
search resolved one (``runtime.gpus``), else by its id (an index or a UUID). NVML is passed in (``nvml=``) so that tests
can drive the watcher with a small fake.
"""

from __future__ import annotations

import os
import sys
from pathlib import Path
from typing import Any, Callable

from runtime.gpu_sampling import DEFAULT_INTERVAL_S, INTERVAL_ENV, interval_from_env
from runtime.gpus import close_nvml, describe_nvml_error, memory_info, nvml_handle, open_nvml

__all__ = ["GpuTelemetry", "gpu_line", "busy_warning", "process_name"]

_MIB = 1024 * 1024
_PREFIX = "[autofinetune]"


def _say(line: str) -> None:
    """Print to the current stdout (the live progress panel proxies it); never raise."""
    try:
        print(f"{_PREFIX} {line}", file=sys.stdout, flush=True)
    except (OSError, ValueError, AttributeError):
        pass


def _text(value: Any) -> str:
    return value.decode(errors="replace") if isinstance(value, bytes) else str(value)


def gpu_line(index: int | str, name: str, memory_total_bytes: int, memory_used_bytes: int,
             slots: int) -> str:
    """``GPU 0: NVIDIA H100 80GB HBM3, 81559 MiB (4 MiB in use), 2 trial slots``."""
    return (f"GPU {index}: {name}, {memory_total_bytes // _MIB} MiB ({memory_used_bytes // _MIB} MiB "
            f"in use), {slots} trial slot{'s' if slots != 1 else ''}")


def process_name(pid: int, proc_root: str | Path = "/proc", width: int = 80) -> str | None:
    """A process's command line (or its name) from /proc; None when it is not visible here
    (NVML reports host pids, which a container's /proc does not have)."""
    base = Path(proc_root) / str(pid)
    try:
        argv = (base / "cmdline").read_bytes().split(b"\0")
        text = " ".join(_text(a) for a in argv if a)
        if not text:
            text = (base / "comm").read_text().strip()
    except OSError:
        return None
    text = "".join(ch if ch.isprintable() else "?" for ch in text)
    return text if len(text) <= width else text[:width - 3] + "..."


def busy_warning(gpu: int | str, processes: list[tuple[int, str | None, int | None]]) -> str:
    """The warning for a requested GPU that other programs already compute on.

    ``processes``: ``(pid, command line or None, used GPU memory in bytes or None)``.
    """
    parts = []
    for pid, name, used in processes:
        memory = f", {used // _MIB} MiB" if isinstance(used, int) else ""
        who = name if name is not None else "not visible from here, e.g. another container"
        parts.append(f"pid {pid} ({who}{memory})")
    return (f"WARNING: GPU {gpu} is already in use by another program: {'; '.join(parts)}. "
            "Trials on it will share its memory and compute; pick another with --gpu, or "
            "stop that program")


class GpuTelemetry:
    """Watcher: the GPU list and busy warnings at search start.

    ``nvml``: the NVML module (default: ``import pynvml``, i.e. nvidia-ml-py); tests pass a fake.
    ``say``: where the info and warning lines go (default: stdout, prefixed ``[autofinetune]``).
    """

    def __init__(self, *, nvml: Any = None, say: Callable[[str], None] = _say,
                 proc_root: str | Path = "/proc") -> None:
        self._nvml = nvml
        self._say = say
        self._proc_root = proc_root
        self.gpus: list[str] = []  # the GPUs read at start

    @classmethod
    def from_env(cls) -> "GpuTelemetry":
        return cls()

    # -- watcher hooks ----------------------------------------------------------------
    def search_started(self, info: dict) -> None:
        raw = os.environ.get(INTERVAL_ENV, "").strip()
        if raw and interval_from_env(default=-1.0) == -1.0:  # set, but not a usable interval
            self._say(f"ignoring {INTERVAL_ENV}={raw!r}: expected a positive number of seconds; "
                      f"sampling every {DEFAULT_INTERVAL_S:g}s")
        if any(s.get("worker") for s in info.get("slots") or ()):
            self._say("GPU telemetry: the trials run on Dask workers; each samples its own GPU into its trial record")
            return
        slots = [s for s in info.get("slots") or () if s.get("gpu") is not None]
        nvml, problem = open_nvml(self._nvml)
        if nvml is None:
            self._say(f"GPU telemetry off: NVML not available ({problem.text})")
            return
        if not slots:
            self._say("GPU telemetry off: the trials run on CPU slots")
            close_nvml(nvml)
            return
        per_gpu: dict[str, list] = {}  # id -> [how NVML reads it, slots]
        for slot in slots:
            entry = per_gpu.setdefault(str(slot["gpu"]), [slot.get("uuid") or str(slot["gpu"]), 0])
            entry[1] += 1
        for gpu, (readable, count) in per_gpu.items():
            try:
                handle = nvml_handle(nvml, readable)
                memory = memory_info(nvml, handle)
                self._say(gpu_line(gpu, _text(nvml.nvmlDeviceGetName(handle)), int(memory.total),
                                   int(memory.used), count))
            except Exception as exc:  # noqa: BLE001 - report and leave that GPU unsampled
                self._say(f"GPU telemetry: GPU {gpu} cannot be read through NVML ({describe_nvml_error(exc)})")
                continue
            self.gpus.append(gpu)
            others = self._other_processes(nvml, handle)
            if others:
                self._say(busy_warning(gpu, others))
        close_nvml(nvml)

    # -- NVML ------------------------------------------------------------------------------

    def _other_processes(self, nvml: Any, handle: Any) -> list[tuple[int, str | None, int | None]]:
        try:
            processes = nvml.nvmlDeviceGetComputeRunningProcesses(handle)
        except Exception:  # noqa: BLE001 - e.g. not supported on this GPU: no warning
            return []
        me = os.getpid()
        return [(int(p.pid), process_name(int(p.pid), self._proc_root),
                 p.usedGpuMemory if isinstance(p.usedGpuMemory, int) else None)
                for p in processes if int(p.pid) != me]
