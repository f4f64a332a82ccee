"""GPU discovery with NVML (the ``nvidia-ml-py`` package, imported as ``pynvml``).

Without a driver or a GPU, NVML fails to initialise; that is a normal machine for this
tool (CPU slots stand in), never an error.
"""

from __future__ import annotations

from dataclasses import dataclass

__all__ = ["GpuInfo", "detect_gpus", "parse_gpu_list", "GpuSelectionError"]


class GpuSelectionError(ValueError):
    """``--gpu`` names GPUs that are not there, or is malformed."""


@dataclass(frozen=True)
class GpuInfo:
    index: int
    name: str
    memory_total_mib: int


def detect_gpus() -> list[GpuInfo] | None:
    """The GPUs NVML sees, or None when NVML is unavailable (no driver, no library)."""
    try:
        import pynvml
    except ImportError:
        return None
    try:
        pynvml.nvmlInit()
    except pynvml.NVMLError:
        return None
    try:
        gpus = []
        for index in range(pynvml.nvmlDeviceGetCount()):
            handle = pynvml.nvmlDeviceGetHandleByIndex(index)
            name = pynvml.nvmlDeviceGetName(handle)
            memory = pynvml.nvmlDeviceGetMemoryInfo(handle)
            gpus.append(GpuInfo(index=index, name=name if isinstance(name, str) else name.decode(),
                                memory_total_mib=int(memory.total) // (1024 * 1024)))
        return gpus
    finally:
        pynvml.nvmlShutdown()


def parse_gpu_list(text: str, available: list[GpuInfo] | None) -> list[str]:
    """``"0,1"`` -> ``["0", "1"]``, checked against the GPUs NVML reports (when it reports)."""
    ids = [part.strip() for part in text.split(",")]
    if not ids or any(not part.isdigit() for part in ids):
        raise GpuSelectionError(
            f"--gpu {text!r}: expected comma-separated GPU indices such as '0,1'")
    if len(set(ids)) != len(ids):
        raise GpuSelectionError(f"--gpu {text!r}: a GPU is listed twice; list each GPU once "
                                "and use --trials-per-gpu K to run K trials per GPU")
    if available is not None:
        missing = [i for i in ids if int(i) >= len(available)]
        if missing:
            have = f"GPUs 0-{len(available) - 1}" if available else "no GPUs"
            raise GpuSelectionError(
                f"--gpu {text!r}: GPU {','.join(missing)} does not exist (NVML reports {have}); "
                "pick from those, or omit --gpu to use every GPU")
    return [str(int(i)) for i in ids]
