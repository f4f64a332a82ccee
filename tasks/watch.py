"""Watchers: what the terminal, VisualDL, the Prefect UI and GPU telemetry are told.

A search notifies every watcher registered for its output dir at five moments, with
small plain data (dicts as written to the run dir). A watcher that raises is logged and
skipped: watching a search must never break it.

    search_started(info)          info: output_dir, names, rounds, popsize, next_round,
                                  slots, resumed, trials (records already on disk)
    trial_started(k, i, slot, params)   slot: {"index", "gpu"}; called on the trial's thread
    trial_finished(record)        before the record is written: a watcher may add fields
                                  (GPU telemetry adds "gpu_samples"); on the trial's thread
    round_finished(k, records, best)    in the round's subflow (Prefect run context)
    search_finished(summary)      in the top flow
"""

from __future__ import annotations

import logging
import threading
from typing import Any, Protocol

__all__ = ["Watcher", "open_watchers", "close_watchers", "notify"]

_log = logging.getLogger("autofinetune.watch")
_WATCHERS: dict[str, list["Watcher"]] = {}
_lock = threading.Lock()


class Watcher(Protocol):
    def search_started(self, info: dict) -> None: ...
    def trial_started(self, k: int, i: int, slot: dict, params: dict) -> None: ...
    def trial_finished(self, record: dict) -> None: ...
    def round_finished(self, k: int, records: list[dict], best: dict | None) -> None: ...
    def search_finished(self, summary: dict) -> None: ...
    def close(self) -> None: ...


def open_watchers(output_dir: str, watchers: list[Any]) -> None:
    with _lock:
        _WATCHERS[output_dir] = list(watchers)


def close_watchers(output_dir: str) -> None:
    with _lock:
        watchers = _WATCHERS.pop(output_dir, [])
    for watcher in watchers:
        _call(watcher, "close")


def notify(output_dir: str, event: str, *args: Any) -> None:
    with _lock:
        watchers = list(_WATCHERS.get(output_dir, ()))
    for watcher in watchers:
        _call(watcher, event, *args)


def _call(watcher: Any, event: str, *args: Any) -> None:
    method = getattr(watcher, event, None)
    if method is None:
        return
    try:
        method(*args)
    except Exception:  # noqa: BLE001 - a broken display must not stop a search
        _log.warning("watcher %s failed on %s", type(watcher).__name__, event, exc_info=True)
