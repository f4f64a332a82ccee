"""Which GPUs a search may use, as the job sees them: ``CUDA_VISIBLE_DEVICES``, NVML, ``--gpu``.

``select_gpus`` decides, by these rules:

- ``CUDA_VISIBLE_DEVICES`` set and naming GPUs (a Slurm job, a Kubernetes device plugin, a
  container, the user): its entries are the GPUs this search may use, in the ids it uses
  (indices, ``GPU-<uuid>``, ``MIG-<uuid>``). The default slots are its entries, ``--gpu``
  must name a subset of them, and each trial gets its slot's entry exactly as written. As
  CUDA does, the list ends at the first entry that is not an id (``-1`` hides every GPU).
- ``CUDA_VISIBLE_DEVICES=""`` (or ``-1``): no GPU; CPU slots, and ``--gpu`` is refused.
- unset: the GPUs NVML reports, by index; ``--gpu`` is checked against them.
- NVML absent (no library, no driver): a machine without NVIDIA GPUs, normal for this tool.
  ``--gpu`` can then only be checked against ``CUDA_VISIBLE_DEVICES``; without it, refused.
- NVML failing in any other way (no permission, driver/library mismatch, a device that
  ``nvmlDeviceGetCount`` counted but whose handle raises NoPermission, unknown): one
  warning naming the error; the GPUs ``CUDA_VISIBLE_DEVICES`` names, unchecked (none when
  it is unset); a ``--gpu`` that cannot be checked is refused.

When NVML works, every slot's GPU is resolved to its NVML UUID: the per-GPU lock files are
named by it (two containers that number one GPU differently share its locks) and telemetry
reads the GPU by it. NVML indices follow PCI bus order, as the trials' CUDA does
(``CUDA_DEVICE_ORDER=PCI_BUS_ID``, see ``runtime.trial``).

The NVML helpers here (``open_nvml``, ``nvml_handle``, ``memory_info``) are shared by the
sampler (``runtime.gpu_sampling``) and the start-up watcher (``watch.gpu_telemetry``). NVML is
passed in (``nvml=``, default ``import pynvml``, i.e. nvidia-ml-py) so tests can use a fake.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from typing import Any

__all__ = ["GpuInfo", "NvmlProblem", "NvmlView", "GpuChoice", "GpuSelectionError", "detect_gpus",
           "select_gpus", "parse_gpu_ids", "visible_entries", "open_nvml", "close_nvml", "nvml_handle",
           "memory_info", "nvml_error_code", "describe_nvml_error", "gpu_uuid", "NOT_SUPPORTED"]

# NVML's return codes (nvml.h; pynvml's NVML_ERROR_*), for telling failures apart.
NOT_SUPPORTED = 3
_NOT_FOUND, _INVALID_ARGUMENT = 6, 2
_ABSENT = {9: "driver not loaded", 12: "library not found"}  # NVML_ERROR_DRIVER_NOT_LOADED, _LIBRARY_NOT_FOUND
_NO_V2 = {NOT_SUPPORTED, 13, 25}  # NOT_SUPPORTED, FUNCTION_NOT_FOUND, ARGUMENT_VERSION_MISMATCH
_MEMORY_V2 = 0x02000028  # pynvml.nvmlMemory_v2, for bindings that lack the name
_ID = re.compile(r"^(\d+|(?:GPU|MIG)-[0-9A-Za-z][0-9A-Za-z/-]*)$")


class GpuSelectionError(ValueError):
    """``--gpu`` (or ``CUDA_VISIBLE_DEVICES``) names GPUs that are not there, or is malformed."""


@dataclass(frozen=True)
class GpuInfo:
    index: int
    name: str
    memory_total_mib: int
    uuid: str = ""


@dataclass(frozen=True)
class NvmlProblem:
    """Why NVML could not be read. ``absent``: no library or no driver (no NVIDIA GPU here,
    normal); otherwise NVML is there but fails (no permission, version mismatch, ...)."""

    text: str
    absent: bool = False


@dataclass(frozen=True)
class NvmlView:
    """What NVML said: its GPUs and the UUIDs of the ids asked about, or why it could not."""

    gpus: tuple[GpuInfo, ...] | None  # None: NVML could not be read (see ``problem``)
    problem: NvmlProblem | None = None
    driver: str | None = None
    uuids: dict = field(default_factory=dict)  # a UUID id as written -> NVML's UUID of it

    def uuid_of(self, gpu_id: str) -> str | None:
        """NVML's UUID of an index or UUID id; None when NVML does not know it."""
        if self.gpus is None:
            return None
        if gpu_id.isdigit():
            return self.gpus[int(gpu_id)].uuid if int(gpu_id) < len(self.gpus) else None
        return self.uuids.get(gpu_id)

    def describe(self) -> str:
        """``GPUs 0-1`` / ``no GPUs``, for error messages."""
        return f"GPUs 0-{len(self.gpus) - 1}" if self.gpus else "no GPUs"


@dataclass(frozen=True)
class GpuChoice:
    """The GPUs a search runs on: one entry per GPU, in slot order; none = CPU slots."""

    gpus: tuple[str, ...]  # each GPU's CUDA_VISIBLE_DEVICES value, as written
    uuids: tuple[str | None, ...]  # NVML's UUID of each, when NVML could tell
    warning: str | None = None  # one line for the user: NVML failed, so ids went unchecked


# -- NVML ---------------------------------------------------------------------------------

def nvml_error_code(exc: BaseException) -> int | None:
    """The NVML return code of an ``NVMLError`` (its ``value``), else None."""
    value = getattr(exc, "value", None)
    return value if isinstance(value, int) else None


def describe_nvml_error(exc: BaseException) -> str:
    """``Insufficient Permissions (NVMLError_NoPermission)``: the text and the error's name."""
    text = str(exc) or type(exc).__name__
    return text if type(exc).__name__ in text else f"{text} ({type(exc).__name__})"


def open_nvml(nvml: Any = None) -> tuple[Any, NvmlProblem | None]:
    """Import and initialise NVML: ``(module, None)``, or ``(None, problem)``; never raises.
    Close an opened one with ``close_nvml``."""
    if nvml is None:
        try:
            import pynvml as nvml
        except ImportError as exc:
            return None, NvmlProblem(f"nvidia-ml-py is not installed: {exc}", absent=True)
    try:
        nvml.nvmlInit()
    except Exception as exc:  # noqa: BLE001 - NVMLError of any kind, OSError from the loader, ...
        return None, NvmlProblem(describe_nvml_error(exc), absent=nvml_error_code(exc) in _ABSENT)
    return nvml, None


def close_nvml(nvml: Any) -> None:
    try:
        nvml.nvmlShutdown()
    except Exception:  # noqa: BLE001
        pass


def nvml_handle(nvml: Any, gpu_id: str) -> Any:
    """The NVML handle of an index (``"2"``) or a UUID (``"GPU-..."``, ``"MIG-..."``)."""
    gpu_id = str(gpu_id)
    if gpu_id.isdigit():
        return nvml.nvmlDeviceGetHandleByIndex(int(gpu_id))
    return nvml.nvmlDeviceGetHandleByUUID(gpu_id)


def memory_info(nvml: Any, handle: Any) -> Any:
    """The GPU's memory (``.total``, ``.used`` in bytes), read with the v2 struct, whose
    ``used`` leaves out what the driver reserves; the v1 struct where v2 is not there."""
    try:
        return nvml.nvmlDeviceGetMemoryInfo(handle, version=getattr(nvml, "nvmlMemory_v2", _MEMORY_V2))
    except TypeError:  # a binding without the version argument
        pass
    except Exception as exc:  # noqa: BLE001
        if nvml_error_code(exc) not in _NO_V2:
            raise
    return nvml.nvmlDeviceGetMemoryInfo(handle)


def _text(value: Any) -> str:
    return value.decode(errors="replace") if isinstance(value, bytes) else str(value)


def _resolve_uuid(nvml: Any, gpu_id: str, gpus: list[GpuInfo]) -> str | None:
    """NVML's UUID of a ``GPU-``/``MIG-`` id (a unique prefix of a GPU's UUID also counts, as
    in CUDA); None when NVML does not know it. Other NVML errors propagate."""
    try:
        return _text(nvml.nvmlDeviceGetUUID(nvml.nvmlDeviceGetHandleByUUID(gpu_id)))
    except Exception as exc:  # noqa: BLE001
        if nvml_error_code(exc) not in (_NOT_FOUND, _INVALID_ARGUMENT):
            raise
    matches = [g.uuid for g in gpus if g.uuid.startswith(gpu_id)]
    return matches[0] if len(matches) == 1 else None


def detect_gpus(ids: tuple[str, ...] | list[str] = (), *, nvml: Any = None) -> NvmlView:
    """The GPUs NVML sees, and the UUIDs of the ``GPU-``/``MIG-`` ``ids``; never raises.

    Any failure after ``nvmlInit`` (a device it counted whose handle raises NoPermission,
    ...) makes the whole view a problem: half an answer would check ids wrongly.
    """
    nvml, problem = open_nvml(nvml)
    if nvml is None:
        return NvmlView(gpus=None, problem=problem)
    try:
        gpus = []
        for index in range(nvml.nvmlDeviceGetCount()):
            handle = nvml.nvmlDeviceGetHandleByIndex(index)
            gpus.append(GpuInfo(index=index, name=_text(nvml.nvmlDeviceGetName(handle)),
                                memory_total_mib=int(memory_info(nvml, handle).total) // (1024 * 1024),
                                uuid=_text(nvml.nvmlDeviceGetUUID(handle))))
        uuids = {gpu_id: _resolve_uuid(nvml, gpu_id, gpus) for gpu_id in ids if not gpu_id.isdigit()}
        try:
            driver = _text(nvml.nvmlSystemGetDriverVersion())
        except Exception:  # noqa: BLE001 - only shown by bench/gpu_check.py
            driver = None
        return NvmlView(gpus=tuple(gpus), driver=driver,
                        uuids={k: v for k, v in uuids.items() if v is not None})
    except Exception as exc:  # noqa: BLE001 - NoPermission, Unknown, GPU is lost, ...
        return NvmlView(gpus=None, problem=NvmlProblem(describe_nvml_error(exc)))
    finally:
        close_nvml(nvml)


def gpu_uuid(gpu_id: str, *, nvml: Any = None) -> str | None:
    """NVML's UUID of one GPU id (an index or a UUID), or None when NVML cannot tell."""
    nvml, _ = open_nvml(nvml)
    if nvml is None:
        return None
    try:
        return _text(nvml.nvmlDeviceGetUUID(nvml_handle(nvml, gpu_id)))
    except Exception:  # noqa: BLE001 - no such GPU, no permission: the id stands for itself
        return None
    finally:
        close_nvml(nvml)


# -- selection ----------------------------------------------------------------------------

def visible_entries(value: str | None) -> list[str] | None:
    """``CUDA_VISIBLE_DEVICES`` as CUDA reads it: None when unset; its ids up to the first
    entry that is not one (``""`` and ``"-1"`` give none), each once."""
    if value is None:
        return None
    entries: list[str] = []
    for part in value.split(","):
        part = part.strip()
        if not _ID.match(part):
            break
        if part not in entries:
            entries.append(part)
    return entries


def parse_gpu_ids(text: str) -> list[str]:
    """``--gpu "0, 1"`` -> ``["0", "1"]``; ``GPU-``/``MIG-`` UUIDs are kept as written."""
    ids = [part.strip() for part in str(text).split(",")]
    if not ids or any(not _ID.match(part) for part in ids):
        raise GpuSelectionError(
            f"--gpu {text!r}: expected comma-separated GPU ids: indices such as '0,1', or UUIDs as "
            "`nvidia-smi -L` prints them (GPU-..., MIG-...)")
    ids = [str(int(part)) if part.isdigit() else part for part in ids]
    if len(set(ids)) != len(ids):
        raise GpuSelectionError(f"--gpu {text!r}: a GPU is listed twice; list each GPU once "
                                "and use --trials-per-gpu K to run K trials per GPU")
    return ids


def _same_gpu(a: str, b: str, view: NvmlView) -> bool:
    if a == b or (a.isdigit() and b.isdigit() and int(a) == int(b)):
        return True
    ua, ub = view.uuid_of(a), view.uuid_of(b)
    return ua is not None and ua == ub


def select_gpus(requested: str | None, visible: str | None, *, nvml: Any = None) -> GpuChoice:
    """The GPUs of a search from ``--gpu`` (None or blank: the default) and the parent's
    ``CUDA_VISIBLE_DEVICES`` (None: unset), by the rules in the module docstring.

    Raises ``GpuSelectionError`` (one line naming the flag and the fix) for a ``--gpu`` that
    is malformed, names a GPU the job may not use, or cannot be checked.
    """
    ids = parse_gpu_ids(requested) if requested is not None and str(requested).strip() else None
    entries = visible_entries(visible)
    view = detect_gpus([*(ids or ()), *(entries or ())], nvml=nvml)
    failed = view.problem is not None and not view.problem.absent
    if entries is not None:  # the job's own GPUs
        if not entries:
            if ids:
                raise GpuSelectionError(
                    f"--gpu {requested!r}: CUDA_VISIBLE_DEVICES={visible!r} gives this job no GPU; drop "
                    "--gpu to run on --cpu-slots, or set CUDA_VISIBLE_DEVICES to the GPUs to use")
            return GpuChoice((), ())
        if view.gpus is not None:
            unknown = [e for e in entries if view.uuid_of(e) is None]
            if unknown:
                raise GpuSelectionError(
                    f"CUDA_VISIBLE_DEVICES={visible!r}: GPU {','.join(unknown)} is not one NVML reports "
                    f"({view.describe()}); fix CUDA_VISIBLE_DEVICES or unset it to use every GPU")
        chosen = list(entries)
        if ids is not None:
            chosen = []
            for gpu_id in ids:
                match = next((e for e in entries if _same_gpu(gpu_id, e, view)), None)
                if match is None:
                    raise GpuSelectionError(
                        f"--gpu {requested!r}: GPU {gpu_id} is not one this job may use "
                        f"(CUDA_VISIBLE_DEVICES={visible!r}); pick from {','.join(entries)}, or omit "
                        "--gpu to use them all")
                if match in chosen:
                    raise GpuSelectionError(f"--gpu {requested!r}: {gpu_id} names GPU {match} again; "
                                            "list each GPU once")
                chosen.append(match)
        warning = None
        if failed:
            warning = (f"WARNING: NVML failed ({view.problem.text}): using the GPUs CUDA_VISIBLE_DEVICES "
                       f"names ({','.join(chosen)}) without checking them; GPU telemetry may be off")
        return GpuChoice(tuple(chosen), tuple(view.uuid_of(g) for g in chosen), warning)
    if view.gpus is None:  # no NVML, nothing set: nothing to check --gpu against
        if ids:
            raise GpuSelectionError(
                f"--gpu {requested!r}: cannot check GPU ids: NVML "
                f"{'not available' if view.problem.absent else 'failed'} ({view.problem.text}) and "
                f"CUDA_VISIBLE_DEVICES is not set; set CUDA_VISIBLE_DEVICES={','.join(ids)} to name the "
                "GPUs this search may use, or drop --gpu to run on --cpu-slots")
        warning = None
        if failed:
            warning = (f"WARNING: NVML failed ({view.problem.text}): cannot tell which GPUs to use, so the "
                       "trials run on CPU slots; set CUDA_VISIBLE_DEVICES to the GPUs to use, or fix NVML")
        return GpuChoice((), (), warning)
    if ids is None:
        return GpuChoice(tuple(str(g.index) for g in view.gpus), tuple(g.uuid for g in view.gpus))
    missing = [gpu_id for gpu_id in ids if view.uuid_of(gpu_id) is None]
    if missing:
        raise GpuSelectionError(
            f"--gpu {requested!r}: GPU {','.join(missing)} does not exist (NVML reports "
            f"{view.describe()}); pick from those (`nvidia-smi -L`), or omit --gpu to use every GPU")
    uuids = [view.uuid_of(gpu_id) for gpu_id in ids]
    if len(set(uuids)) != len(uuids):
        raise GpuSelectionError(f"--gpu {requested!r}: two ids name the same GPU; list each GPU once")
    return GpuChoice(tuple(ids), tuple(uuids))
