"""The subflow of one round: ask, fan out ``train_candidate`` onto the slots, gather, tell.

Prefect UI names: ``round-<k>`` for the subflow run, ``train-r<k>-c<i>`` for each trial.
The task runner has one worker per slot and every trial takes a slot the moment one
frees, so no slot idles while another trial of the round still runs (the original ran
waves of ``len(gpus)`` trials). While the round runs, this flow tells the watchers when
a trial starts (its pid file appears in the run dir) and when it finishes (its task
returns), so the tasks themselves never touch a watcher.
"""

from __future__ import annotations

import contextlib
import contextvars
import queue
import time
from typing import Any

from prefect import flow
from prefect.states import Cancelled

from flows import signals
from runtime.rundir import RunDir, trial_rank_key
from runtime.search import finished_trial, parents_for, propose
from runtime.trial import crash_warning, outcome_counts, read_pid_file
from tasks.steps import plan_parents_and_prune, tell_tuner, train_candidate
from watch.watchers import Watchers

__all__ = ["search_round", "round_summary", "WATCHERS", "TOP_RUN_ID", "heartbeats_off_unless_set"]

_POLL_S = 0.25  # how often the round looks for trials that started
_CANCEL_POLL_S = 2.0  # how often it asks the API whether the run was cancelled in the UI


class _CancelWatch:
    """Whether this round's run or the search's top run was cancelled in the Prefect UI or
    API. A worker SIGTERMs the runs it started; a run started from the command line has
    nobody to do that, so the round asks, every ``_CANCEL_POLL_S``."""

    def __init__(self) -> None:
        from prefect.context import FlowRunContext

        context = FlowRunContext.get()
        self.client = context.client if context else None
        self.ids = set()
        if context:  # the top run's id as the top flow handed it (a lookup costs two API calls)
            self.ids = {context.flow_run.id, TOP_RUN_ID.get() or _root_flow_run_id()}
        self.next_check = time.monotonic() + _CANCEL_POLL_S

    def requested(self) -> bool:
        if self.client is None or time.monotonic() < self.next_check:
            return False
        self.next_check = time.monotonic() + _CANCEL_POLL_S
        return signals.cancelled_in_prefect(self.client, self.ids)


def _root_flow_run_id():
    from prefect.runtime import flow_run

    return flow_run.root_flow_run_id


def round_summary(k: int, records: list[dict], names: list[str]) -> str:
    """The original's per-round console lines, plus a count of failed trials."""
    ok = [r for r in records if r["outcome"] == "ok"]
    counts = outcome_counts(records)
    pruned, failed = counts["pruned"], counts["failed"]
    stopped = f" ({pruned} of {len(records)} trials of the {k}-th round were stopped early.)" if pruned else ""
    if not ok:
        return (f"No trial of the {k}-th round finished with a score: {pruned} stopped early, {failed} "
                "failed; see the lines above." if pruned else
                f"All {len(records)} trials of the {k}-th round failed; see the warnings above.")
    best = min(ok, key=trial_rank_key)
    lines = [f"The local best eval value in the {k}-th round is {best['score']}.",
             "The local best hyperparameters are as:"]
    lines += [f"{name}={best['params'][name]}" for name in names]
    if failed:
        lines.append(f"({failed} of {len(records)} trials of the {k}-th round failed.)")
    if stopped:
        lines.append(stopped.strip())
    return "\n".join(lines)


def _gather(run_dir: RunDir, k: int, futures: list, candidates: list[dict], watchers: Watchers) -> list[dict]:
    """Every trial's record, in candidate order; tells the watchers as trials start and end.

    Trials finished in an earlier run were already reported at search start (their records
    are on disk) and are not announced again.
    """
    earlier = {i for i in range(len(futures)) if finished_trial(run_dir, k, i) is not None}
    done: queue.SimpleQueue = queue.SimpleQueue()
    for i, future in enumerate(futures):
        future.add_done_callback(lambda _f, i=i: done.put(i))
    records: list[dict | None] = [None] * len(futures)
    started = set(earlier)
    left = len(futures)
    cancelled: set[int] = set()
    ui_cancel = _CancelWatch()
    while left:
        try:
            finished = [done.get(timeout=_POLL_S)]
        except queue.Empty:
            finished = []
        pid_files = {int(p.name.rsplit("-", 1)[1]): p for p in run_dir.round_dir(k).glob(".pid-*")}
        if not run_dir.stop.is_set() and ui_cancel.requested():
            run_dir.stop.set()
            print("autofinetune: the flow run was cancelled in Prefect: stopping running trials, "
                  "launching no more", flush=True)
        if run_dir.stop.is_set() and not cancelled:
            cancelled = _cancel_queued(futures, started | set(finished) | set(pid_files))
        for i, path in pid_files.items():
            info = read_pid_file(path)
            if i not in started and info is not None and i < len(futures):
                started.add(i)
                watchers.notify("trial_started", k, i, {"index": info.get("slot"), "gpu": info.get("gpu"),
                                                        "worker": info.get("worker")}, candidates[i])
        for i in finished:
            left -= 1
            try:
                record = futures[i].result()
            except Exception:
                if i not in cancelled:
                    raise
                record = {"round": k, "candidate": i, "params": candidates[i], "outcome": "interrupted",
                          "score": None, "error": "cancelled before launch"}
            records[i] = record
            if i in earlier:
                continue
            if i not in started and "slot" in record:  # too quick to be seen running
                started.add(i)
                watchers.notify("trial_started", k, i, {"index": record["slot"], "gpu": record["gpu"],
                                                        "worker": record.get("worker")}, candidates[i])
            if record.get("lost_workers"):
                then = ("no retry left" if record["outcome"] == "worker_lost"
                        else f"it ran again on {record.get('worker')}")
                lost = ", ".join(map(str, record["lost_workers"]))
                print(f"[autofinetune] r{k}c{i}: Dask worker(s) {lost} died while running it; {then}", flush=True)
            if record["outcome"] == "pruned":
                print(f"[autofinetune] r{k}c{i}: {record['error']}", flush=True)
            elif record["outcome"] not in ("ok", "interrupted"):
                print(crash_warning(record), flush=True)
            watchers.notify("trial_finished", record)
    return records


def _cancel_queued(futures: list, started: set[int]) -> set[int]:
    """After a stop: cancel the task of every trial not yet started (on Dask, a queued future
    leaves the scheduler's queue). One that starts anyway sees the stop file and launches
    nothing. Returns the candidates whose futures were cancelled."""
    cancelled = set()
    for i, future in enumerate(futures):
        wrapped = getattr(future, "wrapped_future", None)
        if i in started or wrapped is None or wrapped.done():
            continue
        if wrapped.cancel() is not False:
            cancelled.add(i)
    return cancelled


def _asking_for(resources: dict | None):
    """Dask resources each trial needs (GPU=1/K or slot=1), as a ``dask.annotate`` context."""
    if not resources:
        return contextlib.nullcontext()
    import dask

    return dask.annotate(resources=resources)


# The search's watchers, set by the top flow for its rounds. Not a subflow parameter: Prefect
# ships a flow run's parameters, and the flow itself (pickled by value, with the globals its
# body names), with every task it submits to Dask; the watchers (terminal, VisualDL writers)
# stay in this process. The body reaches them through a module function, which pickles by name.
WATCHERS: contextvars.ContextVar[Watchers] = contextvars.ContextVar("autofinetune_watchers",
                                                                    default=Watchers())


# The id of the search's top flow run, set by the top flow: a cancel of it stops the round.
TOP_RUN_ID: contextvars.ContextVar[Any] = contextvars.ContextVar("autofinetune_top_run_id", default=None)


def current_watchers() -> Watchers:
    return WATCHERS.get()


def heartbeats_off_unless_set():
    """A context for flow runs (the CLI's top flow, every round): Prefect's settings without
    the flow-run heartbeat, unless it was set (a deployment's ``PREFECT_FLOWS_HEARTBEAT_FREQUENCY``,
    which ``flows.automations`` watches). Prefect's engine joins a run's heartbeat thread when
    the run ends, and that thread sleeps in whole seconds from the run's start: every round
    would last until its next whole second, 0.5 s on average, for heartbeats nobody watches
    (Prefect's default is one per 180 s). Enter it once, not per run: a copy of the settings
    costs 0.1-0.3 s."""
    from prefect.settings import PREFECT_FLOWS_HEARTBEAT_FREQUENCY, get_current_settings, temporary_settings

    if "heartbeat_frequency" in get_current_settings().flows.model_fields_set:
        return contextlib.nullcontext()
    return temporary_settings(updates={PREFECT_FLOWS_HEARTBEAT_FREQUENCY: None})


@flow(name="search_round", flow_run_name="round-{k}")
def search_round(output_dir: str, k: int, names: list[str], placement: Any) -> dict | None:
    """Round k; returns the best trial so far. ``placement`` hands out slots
    (``runtime.slots.Placement``: the flow process's slot pool, or a Dask worker's GPU); the
    watchers are the caller's ``WATCHERS``. Not the round's records: Prefect keeps what a
    subflow returns (and each item of it) linked to its state in the caller's run context
    for the whole search, ~3.5 KB a trial (17 MB at 5,000 trials); they are in the run dir.

    A stopped round ends Cancelled (not Failed with a traceback): calling it then raises
    ``prefect.exceptions.CancelledRun``."""
    signals.reassert()  # the CLI's Ctrl-C/SIGTERM handler, over the one Prefect just installed
    watchers = current_watchers()
    run_dir = RunDir(output_dir)
    candidates = propose(run_dir, k)  # in the body: a task run would cost the round ~20 ms
    state = run_dir.read_state()
    parents = parents_for(state, k)
    with _asking_for(getattr(placement, "resources", None)):
        futures = [train_candidate.with_options(task_run_name=f"train-r{k}-c{i}")
                   .submit(output_dir, k, i, params, parents[i], placement)
                   for i, params in enumerate(candidates)]
    records = _gather(run_dir, k, futures, candidates, watchers)
    if run_dir.stop.is_set() or any(r["outcome"] == "interrupted" for r in records):
        return Cancelled(message=f"stopped during round {k}")
    best = tell_tuner(output_dir, k, records, names)
    if state.search.evaluator == "populationbased" or state.run.keep_checkpoints == "needed":
        plan_parents_and_prune(output_dir, k)  # else it has nothing to decide or delete
    print(round_summary(k, records, names), flush=True)
    watchers.notify("round_finished", k, records, best)
    return best
