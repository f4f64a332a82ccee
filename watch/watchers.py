"""Watchers: what the terminal, VisualDL and the Prefect UI are told about a search.

The flow holds one ``Watchers`` for its search and notifies every watcher in it at five
moments, in the flow's own process, with small plain data (dicts as written to the run
dir). Tasks never call watchers: what a trial has to say comes back in its record or
through the run dir (its pid file says it started). A watcher that raises is logged and
skipped: watching a search must never break it.

    search_started(info)          info: output_dir, names, rounds, popsize, next_round,
                                  slots, resumed, trials (records already on disk)
    trial_started(k, i, slot, params)   slot: {"index", "gpu"}; seen by the flow
    trial_finished(record)        the record the trial's task returned (as written)
    round_finished(k, records, best)    in the round's subflow (Prefect run context)
    search_finished(summary)      in the top flow
"""

from __future__ import annotations

import logging
import queue
import threading
from typing import Any, Protocol

__all__ = ["Watcher", "Watchers", "InBackground"]

_log = logging.getLogger("autofinetune.watch")


class Watcher(Protocol):
    def search_started(self, info: dict) -> None: ...
    def trial_started(self, k: int, i: int, slot: dict, params: dict) -> None: ...
    def trial_finished(self, record: dict) -> None: ...
    def round_finished(self, k: int, records: list[dict], best: dict | None) -> None: ...
    def search_finished(self, summary: dict) -> None: ...
    def close(self) -> None: ...


class Watchers:
    """The watchers of one search; ``notify`` calls each one that has the event's method."""

    def __init__(self, watchers: list[Any] | None = None) -> None:
        self._watchers = list(watchers or [])
        self._lock = threading.Lock()

    def __len__(self) -> int:
        return len(self._watchers)

    def notify(self, event: str, *args: Any) -> None:
        with self._lock:
            watchers = list(self._watchers)
        for watcher in watchers:
            _call(watcher, event, *args)

    def close(self) -> None:
        with self._lock:
            watchers, self._watchers = self._watchers, []
        for watcher in watchers:
            _call(watcher, "close")

    def __repr__(self) -> str:  # shown as the subflow's parameter
        return f"Watchers({', '.join(type(w).__name__ for w in self._watchers)})"


class InBackground:
    """A watcher whose events run on a thread of their own, in order, so that a slow one keeps
    no round waiting (VisualDL encodes ~4 ms per run it appends to: 0.2-1 s a round at popsize
    20-100). ``close`` waits for what is queued, then closes the watcher."""

    def __init__(self, watcher: Any) -> None:
        self.watcher = watcher
        self._queue: queue.SimpleQueue = queue.SimpleQueue()
        self._thread = threading.Thread(target=self._run, name=f"watch-{type(watcher).__name__}", daemon=True)
        self._thread.start()

    def _run(self) -> None:
        while (item := self._queue.get()) is not None:
            _call(self.watcher, *item)

    def search_started(self, info: dict) -> None:
        self._queue.put(("search_started", info))

    def trial_started(self, k: int, i: int, slot: dict, params: dict) -> None:
        self._queue.put(("trial_started", k, i, slot, params))

    def trial_finished(self, record: dict) -> None:
        self._queue.put(("trial_finished", record))

    def round_finished(self, k: int, records: list[dict], best: dict | None) -> None:
        self._queue.put(("round_finished", k, records, best))

    def search_finished(self, summary: dict) -> None:
        self._queue.put(("search_finished", summary))

    def close(self) -> None:
        self._queue.put(("close",))
        self._queue.put(None)
        self._thread.join()


def _call(watcher: Any, event: str, *args: Any) -> None:
    method = getattr(watcher, event, None)
    if method is None:
        return
    try:
        method(*args)
    except Exception:  # noqa: BLE001 - a broken display must not stop a search
        _log.warning("watcher %s failed on %s", type(watcher).__name__, event, exc_info=True)
