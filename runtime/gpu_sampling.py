"""GPU utilization and memory of one running trial, sampled on the trial's own host.

While a trial runs on a GPU slot, a thread reads that GPU through NVML (``nvidia-ml-py``)
every ``interval_s`` seconds (default 2, or ``$AUTOFINETUNE_GPU_SAMPLE_S``); the samples
land in the trial's record, hence in ``trial-<i>.json``::

    "gpu_samples": [{"t": 2.0, "utilization": 97, "memory_used_mib": 1534}, ...]

``t`` is seconds since the trial started. Both numbers are the whole GPU's, as NVML reports
them: with ``--trials-per-gpu 2`` the two trials on a GPU see the same load. Memory used is
read with NVML's v2 struct (without what the driver reserves; v1 where v2 is missing). Each
field is read on its own: one the GPU does not support (utilization of a MIG device raises
NotSupported) is left out of the sample, and the others are kept. A very long
trial keeps fewer than ``MAX_SAMPLES`` samples: when full, every other one is dropped (the
latest is kept) and the trial is sampled half as often. It runs where the trial runs (a
thread of the flow's process, or a Dask worker), which is the only place that sees the GPU.

Without NVML (no driver, no GPU, no library) nothing is sampled and the record has no
``gpu_samples``; when a reading fails mid-trial (or the GPU supports neither field),
sampling stops and the record says why in ``gpu_sampling_error``. NVML is passed in (``nvml=``) so tests can drive it with a fake.
"""

from __future__ import annotations

import os
import threading
import time
from typing import Any, Callable

from runtime.gpus import (NOT_SUPPORTED, close_nvml, describe_nvml_error, memory_info, nvml_error_code,
                          nvml_handle, open_nvml)

__all__ = ["GpuSampler", "read_sample", "interval_from_env", "DEFAULT_INTERVAL_S", "INTERVAL_ENV",
           "MAX_SAMPLES"]

DEFAULT_INTERVAL_S = 2.0
INTERVAL_ENV = "AUTOFINETUNE_GPU_SAMPLE_S"
MAX_SAMPLES = 2048  # per trial; beyond it the trial's sampling rate halves
_MIB = 1024 * 1024
_FIELDS = (("utilization", lambda nvml, handle: int(nvml.nvmlDeviceGetUtilizationRates(handle).gpu)),
           ("memory_used_mib", lambda nvml, handle: int(memory_info(nvml, handle).used) // _MIB))


def read_sample(nvml: Any, handle: Any, t: float) -> dict:
    """One sample of a GPU: ``{"t", "utilization" (percent), "memory_used_mib"}``, without a
    field the GPU does not support. Raises when a read fails otherwise, or when no field is
    supported."""
    sample: dict = {"t": round(t, 3)}
    unsupported = None
    for name, read in _FIELDS:
        try:
            sample[name] = read(nvml, handle)
        except Exception as exc:  # noqa: BLE001 - NVMLError
            if nvml_error_code(exc) != NOT_SUPPORTED:
                raise
            unsupported = exc
    if len(sample) == 1:
        raise unsupported
    return sample


def interval_from_env(default: float = DEFAULT_INTERVAL_S) -> float:
    """``$AUTOFINETUNE_GPU_SAMPLE_S`` when it is a positive finite number, else ``default``."""
    raw = os.environ.get(INTERVAL_ENV, "").strip()
    try:
        value = float(raw)
    except ValueError:
        return default
    return value if 0 < value < float("inf") else default


class GpuSampler:
    """Samples one GPU from ``start()`` to ``stop()``; ``samples`` and ``error`` hold the result.

    ``gpu`` is the trial's GPU as NVML can read it: an index or a ``GPU-``/``MIG-`` UUID
    (``Slot.uuid`` when known); ``None`` (a CPU slot) or anything else samples nothing.
    """

    def __init__(self, gpu: str | None, *, interval_s: float | None = None, nvml: Any = None,
                 clock: Callable[[], float] = time.monotonic) -> None:
        self.gpu = gpu
        self.interval_s = interval_from_env() if interval_s is None else interval_s
        if not self.interval_s > 0:
            raise ValueError(f"GpuSampler interval_s must be > 0 seconds, got interval_s={self.interval_s}")
        self.samples: list[dict] = []
        self.error: str | None = None
        self.enabled = False  # NVML open and the thread running
        self.sampled = False  # it ran for this trial: the record gets "gpu_samples", maybe empty
        self._nvml, self._clock = nvml, clock
        self._handle = None
        self._t0 = 0.0
        self._ticks, self._every = 0, 1
        self._halt = threading.Event()
        self._thread: threading.Thread | None = None

    def start(self) -> GpuSampler:
        if self.gpu is None or "," in str(self.gpu):
            return self
        nvml, _ = open_nvml(self._nvml)
        if nvml is None:  # no NVML, or a failing one (the search said so once, at start)
            return self
        try:
            self._handle = nvml_handle(nvml, str(self.gpu))
        except Exception as exc:  # noqa: BLE001
            self.error = f"GPU {self.gpu} cannot be read through NVML ({describe_nvml_error(exc)})"
            close_nvml(nvml)
            return self
        self._nvml, self.enabled, self.sampled, self._t0 = nvml, True, True, self._clock()
        self._thread = threading.Thread(target=self._loop, name=f"autofinetune-gpu-{self.gpu}", daemon=True)
        self._thread.start()
        return self

    def sample_now(self) -> None:
        """Take one sample (the thread's step); a failure stops sampling and is kept in ``error``."""
        self._ticks += 1
        if self._ticks % self._every:
            return
        try:
            sample = read_sample(self._nvml, self._handle, self._clock() - self._t0)
        except Exception as exc:  # noqa: BLE001
            self.error = f"sampling GPU {self.gpu} failed ({describe_nvml_error(exc)}); stopped sampling it"
            self._halt.set()
            return
        self.samples.append(sample)
        if len(self.samples) >= MAX_SAMPLES:  # keep every other one, and the latest
            self.samples[:] = self.samples[:-1:2] + self.samples[-1:]
            self._every *= 2

    def _loop(self) -> None:
        while not self._halt.wait(self.interval_s):
            self.sample_now()

    def stop(self) -> None:
        self._halt.set()
        if self._thread is not None:
            self._thread.join(timeout=max(5.0, 2 * self.interval_s))
            self._thread = None
        if self.enabled:
            self.enabled = False
            close_nvml(self._nvml)

    def __enter__(self) -> GpuSampler:
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()

