"""GPU telemetry with NVML (``nvidia-ml-py``): a watcher (see ``tasks.watch``).

At search start it prints the GPUs the search uses, one line each, and warns when one is
already busy with another program (pid and command line, from
``nvmlDeviceGetComputeRunningProcesses`` and ``/proc``). While a trial runs, one shared
sampler thread reads its GPU's utilization and memory every ``interval_s`` seconds
(default 2, or ``$AUTOFINETUNE_GPU_SAMPLE_S``) and ``trial_finished`` adds them to the
trial's record, hence to ``trial-<i>.json``::

    "gpu_samples": [{"t": 2.0, "utilization": 97, "memory_used_mib": 1534}, ...]

``t`` is seconds since the trial started. Both numbers are the whole GPU's, as NVML reports
them: with ``--trials-per-gpu 2`` the two trials on a GPU see the same load. A very long
trial keeps fewer than ``MAX_SAMPLES`` samples: when full, every other one is dropped
(the latest is kept) and that trial is sampled half as often.

Without NVML (no driver, no GPU, no library) all of this is skipped with one info line;
a machine without GPUs is normal for this tool, never an error. NVML is passed in
(``nvml=``) so that tests can drive the sampler with a small fake.
"""

from __future__ import annotations

import os
import sys
import threading
import time
from pathlib import Path
from typing import Any, Callable

__all__ = ["GpuTelemetry", "DEFAULT_INTERVAL_S", "INTERVAL_ENV", "MAX_SAMPLES", "interval_from_env", "gpu_line",
           "busy_warning", "process_name", "read_sample"]

DEFAULT_INTERVAL_S = 2.0
INTERVAL_ENV = "AUTOFINETUNE_GPU_SAMPLE_S"
MAX_SAMPLES = 2048  # per trial; beyond it the trial's sampling rate halves
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


def read_sample(nvml: Any, handle: Any, t: float) -> dict:
    """One sample of a GPU: ``{"t", "utilization" (percent), "memory_used_mib"}``."""
    utilization = nvml.nvmlDeviceGetUtilizationRates(handle)
    memory = nvml.nvmlDeviceGetMemoryInfo(handle)
    return {"t": round(t, 3), "utilization": int(utilization.gpu),
            "memory_used_mib": int(memory.used) // _MIB}


def interval_from_env(default: float = DEFAULT_INTERVAL_S) -> float:
    """``$AUTOFINETUNE_GPU_SAMPLE_S`` when it is a positive number, else ``default``."""
    raw = os.environ.get(INTERVAL_ENV, "").strip()
    if not raw:
        return default
    try:
        value = float(raw)
        if not value > 0 or value == float("inf"):
            raise ValueError
    except ValueError:
        _say(f"ignoring {INTERVAL_ENV}={raw!r}: expected a positive number of seconds; "
             f"sampling every {default:g}s")
        return default
    return value


class GpuTelemetry:
    """Watcher: GPU list and busy warning at start, per-trial utilization/memory samples.

    ``nvml``: the NVML module (default: ``import pynvml``, i.e. nvidia-ml-py); tests pass a fake.
    ``say``: where the info and warning lines go (default: stdout, prefixed ``[autofinetune]``).
    """

    def __init__(self, *, interval_s: float = DEFAULT_INTERVAL_S, nvml: Any = None,
                 say: Callable[[str], None] = _say, clock: Callable[[], float] = time.monotonic,
                 proc_root: str | Path = "/proc") -> None:
        if not interval_s > 0:
            raise ValueError(f"GpuTelemetry interval_s must be > 0 seconds, got {interval_s=}")
        self.interval_s = interval_s
        self._nvml = nvml
        self._say = say
        self._clock = clock
        self._proc_root = proc_root
        self.enabled = False
        self._handles: dict[str, Any] = {}  # GPU id (as in CUDA_VISIBLE_DEVICES) -> NVML handle
        self._running: dict[tuple[int, int], dict] = {}
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._failed_gpus: set[str] = set()  # GPUs whose sampling failed (said once)

    @classmethod
    def from_env(cls) -> "GpuTelemetry":
        return cls(interval_s=interval_from_env())

    # -- watcher hooks ----------------------------------------------------------------
    def search_started(self, info: dict) -> None:
        slots = [s for s in info.get("slots") or () if s.get("gpu") is not None]
        nvml, reason = self._open_nvml()
        if nvml is None:
            self._say(f"GPU telemetry off: NVML not available ({reason})")
            return
        if not slots:
            self._say("GPU telemetry off: the trials run on CPU slots")
            self._shutdown(nvml)
            return
        per_gpu: dict[str, int] = {}
        for slot in slots:
            per_gpu[str(slot["gpu"])] = per_gpu.get(str(slot["gpu"]), 0) + 1
        for gpu, count in per_gpu.items():
            try:
                handle = nvml.nvmlDeviceGetHandleByIndex(int(gpu))
                memory = nvml.nvmlDeviceGetMemoryInfo(handle)
                self._say(gpu_line(gpu, _text(nvml.nvmlDeviceGetName(handle)), int(memory.total),
                                   int(memory.used), count))
            except Exception as exc:  # noqa: BLE001 - report and leave that GPU unsampled
                self._say(f"GPU telemetry: GPU {gpu} cannot be read through NVML ({exc})")
                continue
            self._handles[gpu] = handle
            others = self._other_processes(nvml, handle)
            if others:
                self._say(busy_warning(gpu, others))
        if not self._handles:
            self._shutdown(nvml)
            return
        self._nvml, self.enabled = nvml, True
        self._thread = threading.Thread(target=self._sample_loop, name="autofinetune-gpu-telemetry",
                                        daemon=True)
        self._thread.start()

    def trial_started(self, k: int, i: int, slot: dict, params: dict) -> None:
        gpu = slot.get("gpu")
        if not self.enabled or gpu is None or str(gpu) not in self._handles:
            return
        with self._lock:
            self._running[(k, i)] = {"gpu": str(gpu), "t0": self._clock(), "samples": [],
                                     "ticks": 0, "every": 1}

    def trial_finished(self, record: dict) -> None:
        with self._lock:
            trial = self._running.pop((record["round"], record["candidate"]), None)
        if trial is not None:
            record["gpu_samples"] = trial["samples"]

    def round_finished(self, k: int, records: list[dict], best: dict | None) -> None:
        pass

    def search_finished(self, summary: dict) -> None:
        pass

    def close(self) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout=max(5.0, 2 * self.interval_s))
            self._thread = None
        if self.enabled:
            self.enabled = False
            self._shutdown(self._nvml)

    # -- NVML ------------------------------------------------------------------------------
    def _open_nvml(self) -> tuple[Any, str | None]:
        nvml = self._nvml
        if nvml is None:
            try:
                import pynvml as nvml
            except ImportError as exc:
                return None, f"nvidia-ml-py is not installed: {exc}"
        try:
            nvml.nvmlInit()
        except Exception as exc:  # noqa: BLE001 - NVMLError (no driver/library), OSError, ...
            return None, str(exc) or type(exc).__name__
        return nvml, None

    @staticmethod
    def _shutdown(nvml: Any) -> None:
        try:
            nvml.nvmlShutdown()
        except Exception:  # noqa: BLE001
            pass

    def _other_processes(self, nvml: Any, handle: Any) -> list[tuple[int, str | None, int | None]]:
        try:
            processes = nvml.nvmlDeviceGetComputeRunningProcesses(handle)
        except Exception:  # noqa: BLE001 - e.g. not supported on this GPU: no warning
            return []
        me = os.getpid()
        return [(int(p.pid), process_name(int(p.pid), self._proc_root),
                 p.usedGpuMemory if isinstance(p.usedGpuMemory, int) else None)
                for p in processes if int(p.pid) != me]

    # -- sampling --------------------------------------------------------------------------
    def sample_now(self) -> None:
        """Take one sample of every running trial's GPU (the sampler thread's step)."""
        with self._lock:
            gpus = {trial["gpu"] for trial in self._running.values()}
        readings: dict[str, dict] = {}
        for gpu in sorted(gpus):
            try:
                readings[gpu] = read_sample(self._nvml, self._handles[gpu], 0.0)
            except Exception as exc:  # noqa: BLE001 - a GPU that fails is skipped, said once
                if gpu not in self._failed_gpus:
                    self._failed_gpus.add(gpu)
                    self._say(f"GPU telemetry: sampling GPU {gpu} failed ({exc}); skipping it")
        now = self._clock()
        with self._lock:
            for trial in self._running.values():
                reading = readings.get(trial["gpu"])
                if reading is None:
                    continue
                trial["ticks"] += 1
                if trial["ticks"] % trial["every"]:
                    continue
                samples = trial["samples"]
                samples.append(dict(reading, t=round(now - trial["t0"], 3)))
                if len(samples) >= MAX_SAMPLES:  # keep every other one, and the latest
                    samples[:] = samples[:-1:2] + samples[-1:]
                    trial["every"] *= 2

    def _sample_loop(self) -> None:
        while not self._stop.wait(self.interval_s):
            self.sample_now()
