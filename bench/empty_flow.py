"""Prefect's own floor: an empty ``@flow`` whose body writes the time it started running.

    python bench/empty_flow.py FILE

The time from the command's start to the body's start is what Prefect itself needs to run
a flow (import, API connection or the embedded server's start, the flow run's creation),
against which ``bench/orchestration.py`` and ``bench/scale.py`` measure the search's start.
"""

import sys
import time

from prefect import flow


@flow(name="empty")
def empty(path: str) -> None:
    with open(path, "w") as f:
        f.write(f"{time.time():.6f}\n")


if __name__ == "__main__":
    empty(sys.argv[1])
