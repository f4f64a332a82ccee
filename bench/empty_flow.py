"""Prefect's own floor: an empty ``@flow`` whose body writes the time it started running.

    python bench/empty_flow.py FILE                 # FILE: the body's start (unix time)
    python bench/empty_flow.py FILE --subflows N    # FILE: JSON, ms per empty subflow run / task run

The time from the command's start to the body's start is what Prefect itself needs to run
a flow (import, API connection or the embedded server's start, the flow run's creation),
against which ``bench/orchestration.py`` and ``bench/scale.py`` measure the search's start.
With ``--subflows N`` the body then calls N empty subflows (named ``round-<k>``, without
the flow-run heartbeat, as autofinetune's rounds run) and N empty tasks, and writes what
each costs: the floor of a round's overhead while a round is one subflow run.
"""

import json
import sys
import time

from prefect import flow, task
from prefect.settings import PREFECT_FLOWS_HEARTBEAT_FREQUENCY, temporary_settings


@task(name="empty_task")
def empty_task(k: int) -> int:
    return k


@flow(name="empty_round", flow_run_name="round-{k}")
def empty_round(k: int) -> int:
    return k


@flow(name="empty")
def empty(path: str, subflows: int = 0) -> None:
    started = time.time()
    if not subflows:
        with open(path, "w") as f:
            f.write(f"{started:.6f}\n")
        return
    empty_round(-1), empty_task(-1)  # first calls register the flow and the task
    with temporary_settings(updates={PREFECT_FLOWS_HEARTBEAT_FREQUENCY: None}):
        t = time.perf_counter()
        for k in range(subflows):
            empty_round(k)
        subflow_ms = (time.perf_counter() - t) / subflows * 1000
        t = time.perf_counter()
        for k in range(subflows):
            empty_task(k)
        task_ms = (time.perf_counter() - t) / subflows * 1000
    with open(path, "w") as f:
        json.dump({"subflow_ms": subflow_ms, "task_ms": task_ms, "n": subflows}, f)


if __name__ == "__main__":
    empty(sys.argv[1], int(sys.argv[3]) if sys.argv[2:3] == ["--subflows"] else 0)
