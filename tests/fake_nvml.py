"""A fake of the ``pynvml`` module (nvidia-ml-py 13.x) over scripted GPUs, as strict as the real one.

It raises what the real binding raises, built the way the binding builds them:
``pynvml.NVMLError(code)`` gives the code's own subclass (``NVMLError_NoPermission``,
``NVMLError_NotSupported``, ``NVMLError_LibraryNotFound``, ``NVMLError_LibRmVersionMismatch``,
...), whose ``str`` is NVML's text. Names and UUIDs are ``str`` (as in 13.x); a call before
``nvmlInit`` or after the last ``nvmlShutdown`` raises Uninitialized; init is counted, as
NVML counts it; ``nvmlDeviceGetMemoryInfo(handle, version=nvmlMemory_v2)`` reads the v2
struct, whose ``used`` leaves out what the driver reserves (v1's ``used`` counts it).

Constants and exception classes are the real binding's (imported here before any test
replaces ``sys.modules["pynvml"]``). Install one with ``install_nvml(monkeypatch, fake)``;
the autouse fixture in conftest installs ``FakeNvml.absent()``.
"""

from __future__ import annotations

import sys
from types import SimpleNamespace

import pynvml as _real

MIB = 1024 * 1024
ERR = SimpleNamespace(
    UNINITIALIZED=_real.NVML_ERROR_UNINITIALIZED, INVALID_ARGUMENT=_real.NVML_ERROR_INVALID_ARGUMENT,
    NOT_SUPPORTED=_real.NVML_ERROR_NOT_SUPPORTED, NO_PERMISSION=_real.NVML_ERROR_NO_PERMISSION,
    NOT_FOUND=_real.NVML_ERROR_NOT_FOUND, DRIVER_NOT_LOADED=_real.NVML_ERROR_DRIVER_NOT_LOADED,
    LIBRARY_NOT_FOUND=_real.NVML_ERROR_LIBRARY_NOT_FOUND, FUNCTION_NOT_FOUND=_real.NVML_ERROR_FUNCTION_NOT_FOUND,
    GPU_IS_LOST=_real.NVML_ERROR_GPU_IS_LOST, LIB_RM_VERSION_MISMATCH=_real.NVML_ERROR_LIB_RM_VERSION_MISMATCH,
    UNKNOWN=_real.NVML_ERROR_UNKNOWN)


def fake_uuid(index: int) -> str:
    return f"GPU-{index:08x}-1111-2222-3333-444444444444"


class FakeNvml:
    """Scripted GPUs behind NVML's calls. ``gpus``: their names (index order).

    ``init_error``: the code ``nvmlInit`` raises (LIBRARY_NOT_FOUND: no driver library here).
    ``denied``: indices that ``nvmlDeviceGetCount`` counts but whose handle raises NoPermission
    (a cgroup-restricted job). ``migs``: ``{"MIG-...": parent index}``, devices reachable by
    UUID only, whose utilization raises NotSupported. ``no_utilization``: indices whose
    utilization raises NotSupported. ``no_memory_v2``: the v2 call raises FunctionNotFound.
    """

    def __init__(self, gpus=("Fake GPU A", "Fake GPU B"), *, init_error: int | None = None, denied=(),
                 migs=None, no_utilization=(), no_memory_v2=False, processes=None, driver="580.95.05"):
        self.names = list(gpus)
        self.init_error = init_error
        self.denied = set(denied)
        self.migs = dict(migs or {})
        self.no_utilization = set(no_utilization)
        self.no_memory_v2 = no_memory_v2
        self.processes = processes or {}
        self.driver = driver
        self.utilization = {i: [50] for i in range(len(gpus))}  # readings, the last repeats
        self.used = {i: 1024 * MIB for i in range(len(gpus))}  # v2 "used"
        self.reserved = 300 * MIB  # v1 "used" also counts this
        self.broken: set = set()  # indices or MIG UUIDs whose reads raise GPU is lost
        self.inits = self.shutdowns = 0
        self._open = 0

    @classmethod
    def absent(cls) -> "FakeNvml":
        """NVML as on a machine without an NVIDIA driver: nvmlInit raises LibraryNotFound."""
        return cls(gpus=(), init_error=ERR.LIBRARY_NOT_FOUND)

    def __getattr__(self, name: str):
        """The real binding's constants and exception classes; no real NVML call."""
        if name.startswith(("NVML", "nvmlMemory_v")):
            return getattr(_real, name)
        raise AttributeError(f"FakeNvml has no {name}")

    # -- what a test looks at ---------------------------------------------------------------
    @property
    def uuids(self) -> list[str]:
        return [fake_uuid(i) for i in range(len(self.names))]

    def error(self, code: int) -> Exception:
        return _real.NVMLError(code)

    def _check_open(self) -> None:
        if self._open <= 0:
            raise self.error(ERR.UNINITIALIZED)

    def _key(self, handle):
        self._check_open()
        if not (isinstance(handle, tuple) and handle and handle[0] == "fake-handle"):
            raise self.error(ERR.INVALID_ARGUMENT)
        if handle[1] in self.broken:
            raise self.error(ERR.GPU_IS_LOST)
        return handle[1]

    # -- NVML ----------------------------------------------------------------------------------
    def nvmlInit(self):
        if self.init_error is not None:
            raise self.error(self.init_error)
        self._open += 1
        self.inits += 1

    def nvmlShutdown(self):
        self._check_open()
        self._open -= 1
        self.shutdowns += 1

    def nvmlSystemGetDriverVersion(self):
        self._check_open()
        return self.driver

    def nvmlDeviceGetCount(self):
        self._check_open()
        return len(self.names)

    def nvmlDeviceGetHandleByIndex(self, index):
        self._check_open()
        if not isinstance(index, int) or not 0 <= index < len(self.names):
            raise self.error(ERR.INVALID_ARGUMENT)
        if index in self.denied:
            raise self.error(ERR.NO_PERMISSION)
        return ("fake-handle", index)

    def nvmlDeviceGetHandleByUUID(self, uuid):
        self._check_open()
        if not isinstance(uuid, str):
            raise self.error(ERR.INVALID_ARGUMENT)
        if uuid in self.migs:
            return ("fake-handle", uuid)
        if uuid in self.uuids:
            index = self.uuids.index(uuid)
            if index in self.denied:
                raise self.error(ERR.NO_PERMISSION)
            return ("fake-handle", index)
        raise self.error(ERR.NOT_FOUND)

    def nvmlDeviceGetName(self, handle):
        key = self._key(handle)
        return f"{self.names[self.migs[key]]} MIG 1g.10gb" if key in self.migs else self.names[key]

    def nvmlDeviceGetUUID(self, handle):
        key = self._key(handle)
        return key if key in self.migs else fake_uuid(key)

    def nvmlDeviceGetMemoryInfo(self, handle, version=None):
        key = self._key(handle)
        used = self.used[self.migs.get(key, key)]
        if version is None:
            return SimpleNamespace(total=81559 * MIB, used=used + self.reserved, free=0)
        if self.no_memory_v2:
            raise self.error(ERR.FUNCTION_NOT_FOUND)
        if version != _real.nvmlMemory_v2:
            raise self.error(_real.NVML_ERROR_ARGUMENT_VERSION_MISMATCH)
        return SimpleNamespace(version=version, total=81559 * MIB, reserved=self.reserved, used=used, free=0)

    def nvmlDeviceGetUtilizationRates(self, handle):
        key = self._key(handle)
        if key in self.migs or key in self.no_utilization:
            raise self.error(ERR.NOT_SUPPORTED)
        readings = self.utilization[key]
        return SimpleNamespace(gpu=readings.pop(0) if len(readings) > 1 else readings[0], memory=0)

    def nvmlDeviceGetComputeRunningProcesses(self, handle):
        key = self._key(handle)
        return [SimpleNamespace(pid=pid, usedGpuMemory=used) for pid, used in self.processes.get(key, [])]


def install_nvml(monkeypatch, nvml) -> None:
    """Make ``import pynvml`` give ``nvml`` for the rest of the test."""
    monkeypatch.setitem(sys.modules, "pynvml", nvml)
