"""Trials on a Dask cluster, through prefect-dask's ``DaskTaskRunner``.

``--dask-address tcp://HOST:PORT`` connects to a running cluster (plain ``dask scheduler`` /
``dask worker``, dask-cuda, dask-jobqueue, dask-kubernetes); ``--dask-local N`` starts N
single-thread worker processes here, every listener (scheduler, workers, nannies,
dashboard) on 127.0.0.1. Before any trial runs, each worker writes a probe file into the
run dir (``runtime.cluster.probe_run_dir``) that this process must see, so a worker that
does not share the run dir at the same path is refused with one line naming it. Prefect
enters a fresh copy of the task runner for every flow run (``duplicate``), so each round
would connect a new Dask client; ``_SharedClientRunner`` hands every round the one client
of the search instead (measured: about 0.5 s less per round).
"""

from __future__ import annotations

import contextlib
import importlib
import logging
import secrets
from pathlib import Path
from typing import Iterator

from runtime.cluster import DaskCluster, WorkerPlacement, probe_run_dir, trial_resources
from runtime.rundir import RunDir
from runtime.settings import SettingsError

__all__ = ["ClusterError", "dask_trials"]

_CONNECT_TIMEOUT_S = 20
_WORKER_WAIT_S = 60


class ClusterError(SettingsError):
    """The cluster cannot run this search: unreachable, no workers, or no shared run dir."""


@contextlib.contextmanager
def dask_trials(cluster: DaskCluster, run_dir: RunDir, script: str, *, trials_per_gpu: int,
                say=print) -> Iterator[tuple]:
    """Yields ``(task_runner, placement, slots, client)`` for the search's rounds."""
    from distributed import LocalCluster
    from prefect_dask.client import PrefectDaskClient

    with contextlib.ExitStack() as stack:
        address = cluster.address
        if cluster.local_workers:
            local = stack.enter_context(LocalCluster(
                n_workers=cluster.local_workers, threads_per_worker=1, processes=True, host="127.0.0.1",
                dashboard_address="127.0.0.1:0", resources={"slot": 1}, silence_logs=logging.WARNING))
            address = local.scheduler_address
        try:
            client = stack.enter_context(PrefectDaskClient(address, timeout=_CONNECT_TIMEOUT_S,
                                                           set_as_default=False))
        except (OSError, TimeoutError) as exc:
            raise ClusterError(f"--dask-address {address}: no Dask scheduler answers there ({exc}); start "
                               "one (`dask scheduler`) or correct the address") from None
        try:
            client.wait_for_workers(1, timeout=_WORKER_WAIT_S)
        except TimeoutError:
            raise ClusterError(f"--dask-address {address}: the scheduler has no workers after "
                               f"{_WORKER_WAIT_S} s; start them, e.g. `dask worker {address} --nthreads 1 "
                               "--resources GPU=1` with CUDA_VISIBLE_DEVICES set, one per GPU") from None
        workers = client.scheduler_info(n_workers=-1)["workers"]
        seen = _check_shared_run_dir(client, run_dir, script)
        # Import the task (and Prefect) on every worker now, in parallel, rather than inside
        # each worker's first trial (seconds on a busy host).
        client.run(importlib.import_module, "tasks.steps")
        resources = trial_resources(workers, trials_per_gpu)
        placement = WorkerPlacement(trials_per_gpu=trials_per_gpu, resources=resources)
        say(f"[autofinetune] Dask: {len(workers)} workers at {address}, each trial needs "
            f"{resources or 'a worker thread'}; dashboard {client.dashboard_link}")
        slots = [{"index": n, "gpu": seen.get(addr, {}).get("gpu"), "ordinal": 0, "worker": addr}
                 for n, addr in enumerate(sorted(workers))]
        yield _shared_client_runner(client), placement, slots, client


def _shared_client_runner(client):
    """A ``DaskTaskRunner`` whose every copy submits through ``client`` and never closes it."""
    from prefect_dask import DaskTaskRunner

    class _SharedClientRunner(DaskTaskRunner):
        def __init__(self) -> None:
            super().__init__(address=client.scheduler.address)
            self._client = client  # the property returns it; the exit stack never owns it

        def duplicate(self):
            return _SharedClientRunner()

        def __eq__(self, other: object) -> bool:
            return isinstance(other, _SharedClientRunner)

        def __reduce__(self):  # shipped with the flow to workers, which never use it
            return DaskTaskRunner, (), {"address": self.address}

    return _SharedClientRunner()


def _check_shared_run_dir(client, run_dir: RunDir, script: str) -> dict:
    """Every worker must see the run dir (and the script) at the same path as this process;
    returns what each worker reported (host, GPU), by address."""
    token = secrets.token_hex(6)
    seen = client.run(probe_run_dir, str(run_dir.path), token, script)
    try:
        for address, found in sorted(seen.items()):
            where = f"Dask worker {address} on {found['host']}"
            if found["error"]:
                raise ClusterError(f"{where}: {found['error']}; the run dir and the script must be on a "
                                   "filesystem every worker shares at the same path (NFS, Lustre, a shared volume)")
            if not Path(found["probe"]).is_file():
                raise ClusterError(f"{where} wrote {found['probe']}, which is not visible here: its "
                                   f"{run_dir.path} is another directory; put the run dir on a filesystem "
                                   "every worker shares at the same path")
    finally:
        for path in run_dir.path.glob(f".probe-{token}-*"):
            path.unlink(missing_ok=True)
    return seen
