"""Trials on Dask workers: where a trial runs there, and what the flow checks first.

A worker owns its GPU the way a Dask deployment hands it out: ``dask worker --resources
GPU=1`` started with its own ``CUDA_VISIBLE_DEVICES`` (or ``dask cuda worker``, which sets
it). The flow asks for ``GPU=1/--trials-per-gpu`` per trial when the workers advertise GPUs,
``slot=1`` when they advertise slots, and nothing otherwise (one trial per worker thread);
the Dask scheduler then starts each trial the moment a worker is free.

On the worker, ``WorkerPlacement.acquire`` gives the trial a ``Slot`` whose GPU is the
worker's own ``CUDA_VISIBLE_DEVICES`` (None: a CPU worker) and whose ``worker`` is its
address; a GPU slot also holds the per-GPU ``flock`` of ``runtime.slots`` on the worker's
host (named by the GPU's NVML UUID when NVML tells it), so two searches on one host never
put more than K trials on a GPU.

The run directory must be one shared directory (NFS, Lustre, a shared volume) at the
same path on every worker: ``probe_run_dir`` runs on each worker at start and writes a
probe file that the flow must then see. Imports ``distributed`` only inside the functions
that run on a worker.
"""

from __future__ import annotations

import contextlib
import os
import socket
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator

from runtime.gpus import gpu_uuid
from runtime.slots import Slot, SlotPool, StopCheck

__all__ = ["DaskCluster", "WorkerPlacement", "probe_run_dir", "trial_resources", "worker_gpu"]


@dataclass(frozen=True)
class DaskCluster:
    """Where trials run: an existing scheduler's address, or a local cluster of N workers."""

    address: str | None = None
    local_workers: int | None = None

    def describe(self) -> str:
        return self.address or f"a local Dask cluster of {self.local_workers} workers"


def worker_gpu() -> str | None:
    """The GPU(s) this process may use, as its ``CUDA_VISIBLE_DEVICES`` says; None: none set."""
    return os.environ.get("CUDA_VISIBLE_DEVICES", "").strip() or None


@dataclass(frozen=True)
class WorkerPlacement:
    """The ``Placement`` of a trial on the Dask worker that runs it (picklable: plain fields).

    ``resources`` is what the flow asks the scheduler for, per trial (``dask.annotate``).
    """

    trials_per_gpu: int = 1
    resources: dict | None = None
    lock_dir: str | None = None

    @contextlib.contextmanager
    def acquire(self, stop: StopCheck | None = None) -> Iterator[Slot]:
        from distributed import get_worker

        worker = get_worker().address
        gpu = worker_gpu()
        places = range(self.trials_per_gpu) if gpu is not None else range(1)
        uuid = gpu_uuid(gpu.split(",")[0]) if gpu is not None else None
        # A pool per trial: on a GPU the flocks (per open file) exclude other trials of this
        # worker and of every other process on the host; a CPU worker's concurrency is Dask's.
        pool = SlotPool([Slot(index=0, gpu=gpu, ordinal=j, worker=worker, uuid=uuid) for j in places],
                        lock_dir=Path(self.lock_dir) if self.lock_dir else None)
        with pool.acquire(stop) as slot:
            yield slot

    def __repr__(self) -> str:  # shown as a task parameter
        return f"WorkerPlacement(resources={self.resources})"


def trial_resources(workers: dict, trials_per_gpu: int) -> dict | None:
    """What one trial needs, from the scheduler's ``scheduler_info()["workers"]``."""
    offered = {name for info in workers.values() for name in (info.get("resources") or {})}
    if "GPU" in offered:
        return {"GPU": 1 / trials_per_gpu}
    if "slot" in offered:
        return {"slot": 1}
    return None


def probe_run_dir(run_dir: str, token: str, script: str, dask_worker=None) -> dict:
    """Run on each worker (``Client.run``, which passes ``dask_worker``): write
    ``<run_dir>/.probe-<token>-<pid>-<host>`` and say what it saw. The flow then checks that
    each worker's file is there, at the same path, on its side.
    """
    host = socket.gethostname()
    found = {"host": host, "worker": dask_worker.address if dask_worker is not None else None, "gpu": worker_gpu(), "error": None, "probe": None}
    path = Path(run_dir)
    if not path.is_dir():
        found["error"] = f"the run dir {run_dir} does not exist there"
        return found
    probe = path / f".probe-{token}-{os.getpid()}-{host}"
    try:
        probe.write_text(found["worker"])
    except OSError as exc:
        found["error"] = f"cannot write in the run dir {run_dir} ({exc.strerror})"
        return found
    found["probe"] = str(probe)
    if not os.path.isfile(script):
        found["error"] = f"the script {script} is not there"
    return found
