"""The top flow ``autofinetune``; ``python -m flows.autofinetune`` runs the CLI (``flows.cli``).

    python -m flows.autofinetune train.py --param-file hparam.yaml --gpu 0,1 \\
        --popsize 5 --round 10 --evaluator fulltrail --tuning-strategy hazero [KEY VALUE ...]

The flow validates everything first, prepares (or resumes) the run directory, then runs
one ``search_round`` subflow per round and writes the final summary. A deployment calls
the flow directly (``flows.autofinetune:autofinetune`` in prefect.yaml).
"""

from __future__ import annotations

import sys

if __name__ == "__main__":  # the CLI: answers --help and bad input without importing Prefect
    from flows.cli import main

    sys.exit(main())

import contextlib
import dataclasses
import shutil
from datetime import datetime
from pathlib import Path

from prefect import flow
from prefect.context import FlowRunContext
from prefect.exceptions import CancelledRun
from prefect.runtime import flow_run
from prefect.states import Cancelled
from prefect.task_runners import ThreadPoolTaskRunner

from flows import signals
from flows.artifacts import PrefectArtifacts
from flows.dask_runner import dask_trials
from flows.ephemeral_server import reap_stale_server, record_ephemeral_server
from flows.search_round import TOP_RUN_ID, WATCHERS, heartbeats_off_unless_set, search_round
from runtime.rundir import START_FILES, RunDir
from runtime.search import (SearchInterrupted, check_resume, check_rounds_on_disk, final_summary, new_state,
                            record_best)
from runtime.settings import Settings, fresh_seed, resolve_settings
from runtime.slots import SlotPool
from runtime.trial import reap_orphans
from tasks.steps import plan_parents_and_prune
from watch.watchers import InBackground, Watchers

__all__ = ["autofinetune", "build_watchers"]


def _flow_run_name() -> str:
    """The output dir's name; for a dated run under output_root, ``<root>-<YYYYmmdd-HHMM>``."""
    params = flow_run.parameters
    if params.get("output_dir"):
        return Path(params["output_dir"]).name
    root = Path(params.get("output_root") or ".").resolve().name
    return f"{root}-{flow_run.scheduled_start_time:%Y%m%d-%H%M}"


def _run_created() -> datetime | None:
    """When this flow run was due: its schedule slot (for a manual run, its creation).

    Stable across retries, so a retried dated run resumes its own run dir. Not ``created``:
    Prefect's scheduler creates a deployment's runs days ahead, several in one second, so
    that would name different nights' runs alike.
    """
    context = FlowRunContext.get()
    run = context.flow_run if context else None
    due = run and (run.expected_start_time or run.created)
    return due.astimezone() if due else None


@flow(name="autofinetune", flow_run_name=_flow_run_name)
def autofinetune(script: str = "train.py", param_file: str = "hparam.yaml", gpu: str | None = None,
                 popsize: int = 5, rounds: int = 10, output_dir: str | None = None,
                 evaluator: str = "populationbased", tuning_strategy: str = "hazero",
                 seed: int | None = None, trial_timeout: float | None = None,
                 trials_per_gpu: int = 1, cpu_slots: int = 1, python: str | None = None,
                 trial_retries: int = 0, pbt_epochs: int = 1, keep_checkpoints: str = "all",
                 early_stop: str = "off", early_stop_min_steps: int = 1,
                 early_stop_reduction_factor: int = 3, early_stop_min_resource: int = 1,
                 early_stop_grace: float = 30.0,
                 dask_address: str | None = None, dask_local: int | None = None,
                 extras: list[str] | None = None, cwd: str | None = None,
                 output_root: str | None = None) -> dict:
    """Tune ``script``'s hyperparameters over the space in ``param_file``; returns the best.

    The parameters are ``runtime.options.OPTIONS`` (a unit test keeps them equal), written
    out here because Prefect reads a deployment's parameter schema from this signature.
    ``output_root`` (for scheduled runs): each run writes ``output_<YYYYmmddHHMMSS>`` under
    it, dated by the flow run's schedule slot, so a retry of that run resumes the same dir.
    """
    settings = resolve_settings(dict(locals()), started=_run_created())
    run_dir = RunDir(settings.output_dir)
    created = not run_dir.path.exists()
    run_dir.path.mkdir(parents=True, exist_ok=True)
    stopped = None
    try:
        with run_dir.lock(), signals.stops_search(run_dir.stop):  # a second live search is refused
            run_dir.stop.clear_stale()
            watchers = Watchers(build_watchers(run_dir, settings))
            try:
                best = _run_search(run_dir, settings, watchers)
                summary = _final_summary(run_dir, list(settings.space.names), best)
                watchers.notify("search_finished", summary)
            except SearchInterrupted as exc:
                stopped = exc
            finally:
                watchers.close()
    except BaseException:  # e.g. a cluster refused: a search that never started leaves nothing
        _remove_unstarted(run_dir, created)
        raise
    if stopped is not None:  # Cancelled, not a Failed run with a traceback per flow
        _remove_unstarted(run_dir, created)
        return Cancelled(message=f"{stopped}; re-run the same command to resume")
    return summary


def _remove_unstarted(run_dir: RunDir, created: bool) -> None:
    """A search that never wrote its state leaves nothing behind."""
    if run_dir.state_path.exists():
        return
    if created:
        shutil.rmtree(run_dir.path, ignore_errors=True)
    else:  # the user's own (empty) dir: only what this run put there
        for name in START_FILES:
            (run_dir.path / name).unlink(missing_ok=True)


def build_watchers(run_dir: RunDir, settings: Settings) -> list:
    """Who is told about the search's progress (see watch.watchers)."""
    from watch.gpu_telemetry import GpuTelemetry
    from watch.progress import ProgressDisplay
    from watch.visualization import VisualDLWatcher

    names = list(settings.space.names)
    progress = ProgressDisplay.from_env()  # None when $AUTOFINETUNE_PROGRESS=off
    return [GpuTelemetry.from_env(), PrefectArtifacts(output_dir=str(run_dir.path), names=names),
            InBackground(VisualDLWatcher(output_dir=str(run_dir.path), names=names)),
            *([progress] if progress else [])]


@contextlib.contextmanager
def _trial_runner(run_dir: RunDir, settings: Settings):
    """``(task_runner, placement, slots, dask_client)``: threads on this host's slots, or Dask."""
    if settings.cluster is None:
        yield (ThreadPoolTaskRunner(max_workers=len(settings.slots)), SlotPool(settings.slots),
               settings.run.slots, None)
        return
    with dask_trials(settings.cluster, run_dir, settings.run.script,
                     trials_per_gpu=settings.trials_per_gpu) as trials:
        yield trials


def _run_search(run_dir: RunDir, settings: Settings, watchers: Watchers) -> dict | None:
    # A search killed with SIGKILL leaves its trials and its ephemeral Prefect server
    # running; stop them before anything else touches the run dir.
    reap_stale_server(run_dir.path / ".prefect-server")
    reap_orphans(run_dir.pid_files())
    run_dir.remove_temp_files()
    record_ephemeral_server(run_dir.path / ".prefect-server")
    with _trial_runner(run_dir, settings) as (runner, placement, slots, client):
        run = dataclasses.replace(settings.run, slots=slots)
        state = run_dir.read_state()
        if state is None:
            search = settings.search
            if search.seed is None:
                search = dataclasses.replace(search, seed=fresh_seed())
            state = new_state(search, settings.rounds, run)
        else:
            check_resume(state, settings.search, run_dir.state_path)
            check_rounds_on_disk(run_dir, state)
            print(f"Resuming the search in {run_dir.path} at round {state.next_round}.", flush=True)
            state.rounds, state.run = settings.rounds, run  # --round may extend a search
        run_dir.write_state(state)
        names = list(settings.space.names)
        out = str(run_dir.path)
        if settings.gpu_warning:
            print(f"[autofinetune] {settings.gpu_warning}", flush=True)
        if "epochs" in names and state.search.evaluator == "populationbased" and state.run.pbt_epochs:
            print("[autofinetune] 'epochs' is searched: Population-Based children train for their own "
                  "searched epochs; --pbt-epochs is not applied", flush=True)
        on_disk = run_dir.trials()
        watchers.notify("search_started", {
            "output_dir": out, "names": names, "rounds": settings.rounds,
            "popsize": state.search.popsize, "next_round": state.next_round,
            "slots": state.run.slots, "resumed": state.next_round > 0 or bool(on_disk),
            "trials": on_disk})
        # Finish what a killed run left half done: best_model/, log_file.txt, the next plan.
        record_best(run_dir, names, final=False)
        if state.next_round > 0:
            plan_parents_and_prune(out, state.next_round - 1)
        context = FlowRunContext.get()
        round_flow = search_round.with_options(task_runner=runner)
        with heartbeats_off_unless_set():
            for k in range(state.next_round, settings.rounds):
                if run_dir.stop.is_set():
                    raise SearchInterrupted(f"stopped before round {k}")
                try:
                    tokens = WATCHERS.set(watchers), TOP_RUN_ID.set(context and context.flow_run.id)
                    try:
                        round_flow(out, k, names, placement)
                    finally:
                        WATCHERS.reset(tokens[0])
                        TOP_RUN_ID.reset(tokens[1])
                except CancelledRun as exc:
                    raise SearchInterrupted(str(exc) or f"stopped during round {k}") from None
                except Exception:
                    if client is not None and client.status != "running":
                        run_dir.stop.set()  # whatever still runs on the workers stops
                        raise SearchInterrupted(f"the Dask scheduler went away during round {k}") from None
                    raise
    return record_best(run_dir, names, final=True)


def _final_summary(run_dir: RunDir, names: list[str], best: dict | None) -> dict:
    text, summary = final_summary(run_dir, names, best)
    print(text, flush=True)
    return summary
