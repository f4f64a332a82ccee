"""The CLI's Ctrl-C/SIGTERM handler, kept in force while Prefect runs flows.

Prefect's flow engine installs its own SIGTERM handler around every flow run, subflows
included (``prefect.utilities.engine.capture_sigterm``), which turns SIGTERM into a crash
of the flow run: the CLI's stop (terminate the trials, launch nothing more, save, exit 130)
never happened. The CLI registers its handler here; each flow body calls ``reassert()``
first, so for all but the engine's own set-up and tear-down the CLI's handler is the one
installed. A SIGTERM in those short windows still reaches it: Prefect re-sends the signal
to the process after restoring the previous handler, and the CLI treats the resulting
``TerminationSignal`` as a stop. Without a registered handler (a deployment run) nothing
changes.
"""

from __future__ import annotations

import signal
import threading
from typing import Callable

__all__ = ["register", "unregister", "reassert"]

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
