"""The CLI's Ctrl-C/SIGTERM handler, kept in force while Prefect runs flows.

Prefect's flow engine installs its own SIGTERM handler around every flow run, subflows
included (``prefect.utilities.engine.capture_sigterm``), which turns SIGTERM into a crash
of the flow run: the CLI's stop (terminate the trials, launch nothing more, save, exit 130)
never happened. The CLI registers its handler here; each flow body calls ``reassert()``
first, so for all but the engine's own set-up and tear-down the CLI's handler is the one
installed. A SIGTERM in those short windows still reaches it: Prefect re-sends the signal
to the process after restoring the previous handler, and the CLI treats the resulting
``TerminationSignal`` as a stop.

Without the CLI (a deployment run started by a worker, whose cancel or stop SIGTERMs the
flow-run process), the top flow's ``stops_search`` defers Prefect's handling: the first
SIGTERM marks the run dir stopped, so the trials' process groups are terminated and the
state is saved as for Ctrl-C; then the run ends Cancelled when it was cancelled in Prefect
(its state is Cancelling), else ``TerminationSignal`` is raised and Prefect's engine ends
it Crashed. (Prefect 3.9.1 loses the worker's "cancel" intent once a nested subflow's
SIGTERM scope has ended, so the run's state on the server decides, not the intent.)
"""

from __future__ import annotations

import contextlib
import signal
import threading
from typing import Callable, Iterator

__all__ = ["register", "unregister", "reassert", "stops_search", "cancelled_in_prefect"]

_handler: Callable | None = None


def register(handler: Callable) -> dict:
    """Install ``handler`` for SIGINT and SIGTERM; returns the handlers it replaced."""
    global _handler
    _handler = handler
    return {sig: signal.signal(sig, handler) for sig in (signal.SIGINT, signal.SIGTERM)}


def unregister(previous: dict) -> None:
    global _handler
    _handler = None
    for sig, handler in previous.items():
        signal.signal(sig, handler)


def reassert() -> None:
    """Put the registered handler back for SIGTERM (only the main thread can)."""
    if _handler is not None and threading.current_thread() is threading.main_thread():
        signal.signal(signal.SIGTERM, _handler)


class _DeferredTermination:
    """SIGTERM while no CLI is in charge: stop the search now, hand the signal to Prefect after."""

    def __init__(self, marker) -> None:
        self.marker = marker
        self.received = False

    def __call__(self, signum, _frame) -> None:
        from prefect.exceptions import TerminationSignal

        if self.received:  # a second SIGTERM: stop waiting for the trials
            raise TerminationSignal(signal=signum)
        self.received = True
        self.marker.set()
        print("autofinetune: SIGTERM received: stopping running trials, launching no more",
              flush=True)


@contextlib.contextmanager
def stops_search(marker) -> Iterator[None]:
    """For the top flow's body: SIGTERM stops the search through ``marker`` (a StopMarker).

    Under the CLI its own handler does that. Otherwise (main thread only) a deferring
    handler is installed for the body and ``TerminationSignal`` is raised at its end if a
    SIGTERM came.
    """
    if _handler is not None or threading.current_thread() is not threading.main_thread():
        reassert()
        yield
        return
    deferred = _DeferredTermination(marker)
    previous = register_sigterm(deferred)
    try:
        yield
    finally:
        unregister(previous)
    if deferred.received:
        marker.clear()  # served: the trials saw it; a retry of this run resumes
        from prefect.context import FlowRunContext
        from prefect.exceptions import TerminationSignal

        context = FlowRunContext.get()
        if context is None or not cancelled_in_prefect(context.client, {context.flow_run.id}):
            raise TerminationSignal(signal=signal.SIGTERM)


def cancelled_in_prefect(client, run_ids) -> bool:
    """Whether any of these flow runs is Cancelling or Cancelled (an API error: no)."""
    try:
        states = [client.read_flow_run(run_id).state for run_id in run_ids]
    except Exception:  # an API hiccup; a dead API is the CLI's watchdog's business
        return False
    return any(state is not None and state.type.value in ("CANCELLING", "CANCELLED") for state in states)


def register_sigterm(handler: Callable) -> dict:
    """Install ``handler`` for SIGTERM only (``reassert`` keeps it in force in subflows)."""
    global _handler
    _handler = handler
    return {signal.SIGTERM: signal.signal(signal.SIGTERM, handler)}
