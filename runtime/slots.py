"""GPU slots: where each trial runs, and at most K trials per GPU across processes.

``--gpu 0,1 --trials-per-gpu 2`` gives four slots: (gpu 0, #0), (gpu 0, #1), (gpu 1, #0),
(gpu 1, #1). Without ``--gpu`` the GPUs NVML reports are used; with none, ``--cpu-slots N``
CPU slots run trials with ``CUDA_VISIBLE_DEVICES`` set to the empty string.

A trial takes a slot the moment one frees (the original ran candidates in waves of
``len(gpus)`` and left GPUs idle while a wave's slowest trial ran). Each GPU slot also
holds an exclusive ``fcntl.flock`` on a per-(GPU, #) lock file, so two searches on one
host with overlapping ``--gpu`` lists never put more than K trials on one GPU; the
kernel drops the lock when its holder dies, so a killed search leaves nothing stuck.
A lock file is named by the GPU's NVML UUID when NVML told it (else by the id as given), so
two containers that number one GPU differently still share its locks.

The lock files are shared by every user's searches on the host: the lock dir is created
world-writable and sticky (as /tmp), each file read-writable by all (``fchmod`` after
creating it, whatever the umask). An existing file is opened without ``O_CREAT`` first:
with ``fs.protected_regular`` (on by default in many distributions) opening another user's
file in a sticky world-writable dir with ``O_CREAT`` fails with EACCES, even for root.

The interface a trial needs is small, ``Placement``: ``acquire(stop)``, a context manager
yielding a ``Slot``. The flow hands one to every ``train_candidate`` task as an argument:
``SlotPool`` (threads of the flow's process) today; a Dask cluster whose workers each own a
GPU can provide the same.
"""

from __future__ import annotations

import contextlib
import fcntl
import os
import tempfile
import threading
from dataclasses import dataclass
from pathlib import Path
from typing import ContextManager, Iterator, Protocol

__all__ = ["Slot", "SlotPool", "SlotWaitInterrupted", "Placement", "StopCheck", "make_slots",
           "default_lock_dir", "open_lock_file"]

LOCK_DIR_ENV = "AUTOFINETUNE_LOCK_DIR"
_POLL_S = 0.1  # how often a waiter re-tries GPU locks held by another process


@dataclass(frozen=True)
class Slot:
    index: int  # position in the pool, 0-based
    gpu: str | None  # GPU id given to the trial as CUDA_VISIBLE_DEVICES; None = CPU slot
    ordinal: int = 0  # which of the GPU's --trials-per-gpu places this is
    worker: str | None = None  # the Dask worker's address; None: a thread of the flow's process
    uuid: str | None = None  # NVML's UUID of the (first) GPU, when NVML told it

    @property
    def cuda_visible_devices(self) -> str:
        return "" if self.gpu is None else self.gpu

    @property
    def lock_name(self) -> str:
        """The per-GPU lock file's name: by NVML UUID, else by id (a worker's list "1,2,0"
        locks its first GPU)."""
        name = (self.uuid or self.gpu.split(",")[0]).replace("/", "_")  # an old-style MIG id has '/'
        return f"gpu-{name}.{self.ordinal}.lock"

    def describe(self) -> str:
        where = f"cpu-slot {self.index}" if self.gpu is None else f"gpu {self.gpu} (place {self.ordinal})"
        if self.worker is not None:
            where = f"worker {self.worker}" if self.gpu is None else f"gpu {self.gpu} of worker {self.worker}"
        return where


class StopCheck(Protocol):
    """A stop request to poll: ``runtime.rundir.StopMarker`` (any process), a threading.Event."""

    def is_set(self) -> bool: ...


class Placement(Protocol):
    """Where a trial runs: blocks until a slot is free, yields it, frees it on exit."""

    def acquire(self, stop: StopCheck | None = None) -> ContextManager[Slot]: ...


class SlotWaitInterrupted(Exception):
    """A stop was requested while waiting for a slot: the trial must not start."""


def make_slots(gpus: list[str] | None, *, trials_per_gpu: int, cpu_slots: int,
               uuids: list[str | None] | None = None) -> list[Slot]:
    """One slot per GPU per place (GPU-major order, so trials spread over GPUs first);
    ``uuids``: NVML's UUID of each GPU, when known."""
    if gpus:
        uuid_of = dict(zip(gpus, uuids or ()))
        places = [(gpu, j) for j in range(trials_per_gpu) for gpu in gpus]
        return [Slot(index=n, gpu=gpu, ordinal=j, uuid=uuid_of.get(gpu)) for n, (gpu, j) in enumerate(places)]
    return [Slot(index=n, gpu=None) for n in range(cpu_slots)]


def default_lock_dir() -> Path:
    return Path(os.environ.get(LOCK_DIR_ENV) or Path(tempfile.gettempdir()) / "autofinetune-gpu-locks")


def _make_shared_dir(path: Path) -> None:
    """Create the lock dir (and its parents) world-writable and sticky, as /tmp; an existing
    one is left as it is (it may be another user's)."""
    if path.is_dir():
        return
    _make_shared_dir(path.parent)
    try:
        os.mkdir(path, 0o1777)
    except FileExistsError:
        return
    os.chmod(path, 0o1777)  # mkdir's mode went through the umask


def open_lock_file(path: Path) -> int:
    """A descriptor of the lock file at ``path`` for ``flock``, the file created shared (0666)
    if it is not there yet. Another user's existing file is opened without ``O_CREAT`` (see
    the module docstring), read-only when it is not writable (``flock`` needs no write access).
    """
    _make_shared_dir(path.parent)
    while True:
        for flags in (os.O_RDWR, os.O_RDONLY):
            try:
                return os.open(path, flags)
            except FileNotFoundError:
                break
            except PermissionError:
                continue
        else:
            raise PermissionError(f"cannot open the GPU lock file {path}: ask its owner to make it "
                                  f"readable (chmod 666), or set ${LOCK_DIR_ENV} to another dir")
        try:
            fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_EXCL, 0o666)
        except FileExistsError:  # another process created it meanwhile: open that one
            continue
        os.fchmod(fd, 0o666)  # the mode went through the umask
        return fd


class SlotPool:
    """Hands out free slots to threads; GPU slots are also locked across processes."""

    def __init__(self, slots: list[Slot], *, lock_dir: Path | None = None) -> None:
        if not slots:
            raise ValueError("a SlotPool needs at least one slot")
        self.slots = list(slots)
        self._free = list(slots)
        self._cond = threading.Condition()
        self._lock_dir = Path(lock_dir) if lock_dir else default_lock_dir()
        self._held: dict[int, int] = {}  # slot index -> fd of its flock'ed file

    def __len__(self) -> int:
        return len(self.slots)

    def _try_lock(self, slot: Slot) -> bool:
        if slot.gpu is None:
            return True
        fd = open_lock_file(self._lock_dir / slot.lock_name)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            os.close(fd)
            return False
        self._held[slot.index] = fd
        return True

    @contextlib.contextmanager
    def acquire(self, stop: StopCheck | None = None) -> Iterator[Slot]:
        """Block until a slot is free (here and, for GPUs, in every other process)."""
        slot = self._take(stop)
        try:
            yield slot
        finally:
            self._give_back(slot)

    def _take(self, stop: StopCheck | None) -> Slot:
        with self._cond:
            while True:
                if stop is not None and stop.is_set():
                    raise SlotWaitInterrupted()
                for slot in self._free:
                    if self._try_lock(slot):
                        self._free.remove(slot)
                        return slot
                self._cond.wait(timeout=_POLL_S)

    def _give_back(self, slot: Slot) -> None:
        with self._cond:
            fd = self._held.pop(slot.index, None)
            if fd is not None:
                os.close(fd)  # closing the descriptor releases the flock
            self._free.append(slot)
            self._free.sort(key=lambda s: s.index)
            self._cond.notify()
