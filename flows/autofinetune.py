"""The top flow ``autofinetune`` and its CLI, ``python -m flows.autofinetune`` (also ``autofinetune``).

    python -m flows.autofinetune train.py --param-file hparam.yaml --gpu 0,1 \\
        --popsize 5 --round 10 --evaluator fulltrail --tuning-strategy pshe2 [KEY VALUE ...]

The flow validates everything first, prepares (or resumes) the run directory, then runs
one ``search_round`` subflow per round and writes the final summary. Exit status of the
CLI: 0 success, 1 no trial produced a score, 2 bad input (nothing was created on disk),
130 stopped by SIGINT/SIGTERM (re-run the same command to resume).
"""

from __future__ import annotations

import argparse
import signal
import sys
from datetime import datetime
from pathlib import Path

import flows  # noqa: F401  (sets the Prefect defaults before Prefect is imported)
from prefect import flow
from prefect.context import FlowRunContext
from prefect.runtime import flow_run
from prefect.task_runners import ThreadPoolTaskRunner

from flows.search_round import search_round
from tasks.rundir import RunDir, RunDirBusy
from tasks.search import SearchInterrupted, check_resume, new_state, record_best
from tasks.settings import (EVALUATORS, KEEP_CHECKPOINTS, Settings, fresh_seed, resolve_settings,
                            split_script_and_extras)
from tasks.artifacts import PrefectArtifacts
from tasks.ephemeral_server import reap_stale_server, record_ephemeral_server
from tasks.slots import SlotPool
from tasks.trial import reap_orphans
from tasks.watch import close_watchers, notify, open_watchers
from tasks.steps import STOP, close_slot_pool, open_slot_pool, select_and_copy_checkpoints
from tuners import TUNER_NAMES

__all__ = ["autofinetune", "main", "build_parser"]


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
                 evaluator: str = "populationbased", tuning_strategy: str = "pshe2",
                 seed: int | None = None, trial_timeout: float | None = None,
                 trials_per_gpu: int = 1, cpu_slots: int = 1, python: str | None = None,
                 extras: list[str] | None = None, trial_retries: int = 0, pbt_epochs: int = 1,
                 keep_checkpoints: str = "all", cwd: str | None = None,
                 output_root: str | None = None) -> dict:
    """Tune ``script``'s hyperparameters over the space in ``param_file``; returns the best.

    ``output_root`` (for scheduled runs): each run writes ``output_<YYYYmmddHHMMSS>`` under
    it, dated by the flow run's schedule slot, so a retry of that run resumes the same dir.
    """
    settings = resolve_settings(
        script=script, param_file=param_file, gpu=gpu, popsize=popsize, rounds=rounds,
        output_dir=output_dir, evaluator=evaluator, tuning_strategy=tuning_strategy, seed=seed,
        trial_timeout=trial_timeout, trials_per_gpu=trials_per_gpu, cpu_slots=cpu_slots,
        python=python, extras=extras, trial_retries=trial_retries, pbt_epochs=pbt_epochs,
        keep_checkpoints=keep_checkpoints, cwd=cwd, output_root=output_root,
        started=_run_created())
    run_dir = RunDir(settings.output_dir)
    run_dir.path.mkdir(parents=True, exist_ok=True)
    out = str(run_dir.path)
    with run_dir.lock():  # a second live search on this dir is refused
        open_watchers(out, build_watchers(run_dir, settings))
        try:
            best = _run_search(run_dir, settings, seed)
            summary = _final_summary(run_dir, list(settings.space.names), best)
            notify(out, "search_finished", summary)
        finally:
            close_watchers(out)
    return summary


def build_watchers(run_dir: RunDir, settings: Settings) -> list:
    """Who is told about the search's progress (see tasks.watch)."""
    from tasks.gpu_telemetry import GpuTelemetry
    from tasks.progress import ProgressDisplay
    from tasks.visualization import VisualDLWatcher

    names = list(settings.space.names)
    progress = ProgressDisplay.from_env()  # None when $AUTOFINETUNE_PROGRESS=off
    # GPU telemetry first: its trial_finished adds "gpu_samples" that later watchers read.
    return [GpuTelemetry.from_env(), PrefectArtifacts(output_dir=str(run_dir.path), names=names),
            VisualDLWatcher(output_dir=str(run_dir.path), names=names),
            *([progress] if progress else [])]


def _run_search(run_dir: RunDir, settings: Settings, seed: int | None) -> dict | None:
    # A search killed with SIGKILL leaves its trials and its ephemeral Prefect server
    # running; stop them before anything else touches the run dir.
    reap_stale_server(run_dir.path / ".prefect-server")
    reap_orphans(run_dir.pid_files())
    record_ephemeral_server(run_dir.path / ".prefect-server")
    state = run_dir.read_state()
    if state is None:
        search = dict(settings.search, seed=fresh_seed() if seed is None else seed)
        state = new_state(search, settings.rounds, settings.run)
    else:
        check_resume(state, settings.search, run_dir.state_path)
        print(f"Resuming the search in {run_dir.path} at round {state['next_round']}.", flush=True)
        state.update(rounds=settings.rounds, run=settings.run)  # --round may extend a search
    run_dir.write_state(state)
    names = list(settings.space.names)
    out = str(run_dir.path)
    on_disk = run_dir.trials()
    notify(out, "search_started", {
        "output_dir": out, "names": names, "rounds": settings.rounds,
        "popsize": state["search"]["popsize"], "next_round": state["next_round"],
        "slots": state["run"]["slots"], "resumed": state["next_round"] > 0 or bool(on_disk),
        "trials": on_disk})
    open_slot_pool(out, SlotPool(settings.slots))
    try:
        # Finish what a killed run left half done: best_model/, log_file.txt, the next plan.
        record_best(run_dir, names, final=False)
        if state["next_round"] > 0:
            select_and_copy_checkpoints(out, state["next_round"] - 1)
        runner = ThreadPoolTaskRunner(max_workers=len(settings.slots))
        for k in range(state["next_round"], settings.rounds):
            if STOP.is_set():
                raise SearchInterrupted(f"stopped before round {k}")
            search_round.with_options(task_runner=runner)(out, k, names)
    finally:
        close_slot_pool(out)
    return record_best(run_dir, names, final=True)


def _final_summary(run_dir: RunDir, names: list[str], best: dict | None) -> dict:
    if best is None:
        print(f"No trial produced a score; see the logs under {run_dir.path}.", flush=True)
        return {"output_dir": str(run_dir.path), "best_params": None, "best_score": None,
                "best_model": None}
    print("The final best hyperparameters:")
    for name in names:
        print(f"{name}={best['params'][name]}")
    print(f"The final best eval score is {best['score']}.")
    print(f"The final best model parameters are saved as {run_dir.best_model} .", flush=True)
    return {"output_dir": str(run_dir.path), "best_params": best["params"],
            "best_score": best["score"], "best_model": str(run_dir.best_model),
            "best_trial": {"round": best["round"], "candidate": best["candidate"]}}


class _OneLineParser(argparse.ArgumentParser):
    def error(self, message: str):  # argparse's default prints the whole usage block
        self.exit(2, f"autofinetune: error: {message} (see --help)\n")


def build_parser() -> argparse.ArgumentParser:
    p = _OneLineParser(prog="python -m flows.autofinetune",
                       description="Automatic hyperparameter search for a training script, on Prefect.")
    p.add_argument("words", nargs="*", metavar="[SCRIPT] [KEY VALUE ...]",
                   help="the training script (default train.py), then extra KEY VALUE pairs "
                        "forwarded to it as --KEY=VALUE")
    p.add_argument("--param-file", "--param_file", dest="param_file", default="hparam.yaml",
                   help="the search space YAML (default hparam.yaml)")
    p.add_argument("--gpu", default=None,
                   help="comma-separated GPU ids, e.g. 0,1 (default: every GPU NVML sees; "
                        "CPU slots when there is none)")
    p.add_argument("--popsize", type=int, default=5, help="candidates per round (default 5)")
    p.add_argument("--round", dest="rounds", type=int, default=10, help="rounds (default 10)")
    p.add_argument("--output-dir", "--output_dir", dest="output_dir", default=None,
                   help="run directory (default output_<YYYYmmddHHMMSS>); an existing one is resumed")
    p.add_argument("--evaluator", default="populationbased", type=str.lower,
                   help=f"{' | '.join(EVALUATORS)} (default populationbased)")
    p.add_argument("--tuning-strategy", "--tuning_strategy", dest="tuning_strategy",
                   default="pshe2", type=str.lower, help=f"{' | '.join(TUNER_NAMES)} (default pshe2)")
    p.add_argument("--seed", type=int, default=None,
                   help="random seed of the tuner (default: a fresh one, recorded in state.json)")
    p.add_argument("--trial-timeout", type=float, default=None, metavar="S",
                   help="kill a trial's whole process group after S seconds (default: no limit)")
    p.add_argument("--trials-per-gpu", type=int, default=1, metavar="K",
                   help="trials that share one GPU (default 1)")
    p.add_argument("--cpu-slots", type=int, default=1, metavar="N",
                   help="parallel trials when there is no GPU (default 1)")
    p.add_argument("--python", default=None,
                   help="interpreter that runs the script (default: the one running this CLI)")
    p.add_argument("--trial-retries", type=int, default=0, metavar="N",
                   help="re-run a trial whose process failed to start or was killed by a signal")
    p.add_argument("--pbt-epochs", type=int, default=1, metavar="N",
                   help="populationbased: --epochs=N for trials that continue from a parent "
                        "(default 1, as the original; 0 passes nothing; a forwarded epochs extra wins)")
    p.add_argument("--keep-checkpoints", default="all", type=str.lower,
                   help=f"{' | '.join(KEEP_CHECKPOINTS)}: 'needed' deletes model dirs that are neither "
                        "a live parent nor best_model (default all, as the original)")
    return p


def _request_stop(signum, _frame) -> None:
    if STOP.is_set():  # a second Ctrl-C: stop waiting for a clean shutdown
        raise KeyboardInterrupt
    STOP.set()
    print(f"\nautofinetune: {signal.Signals(signum).name} received: stopping running trials, "
          "launching no more", file=sys.stderr, flush=True)


def _start_embedded_api() -> None:
    """Start Prefect's embedded API now, with SIGINT blocked in it.

    Prefect starts it lazily as a child in our process group, so a terminal's Ctrl-C
    reached it too and killed the API the search needs to record its stop. A blocked
    signal stays blocked across exec, so the server ignores Ctrl-C and is stopped by
    Prefect (SIGTERM) when the search exits. With PREFECT_API_URL set this does nothing.
    """
    from prefect.settings import PREFECT_API_URL, PREFECT_SERVER_EPHEMERAL_ENABLED

    if PREFECT_API_URL.value() or not PREFECT_SERVER_EPHEMERAL_ENABLED.value():
        return
    from prefect.server.api.server import SubprocessASGIServer

    previous = signal.pthread_sigmask(signal.SIG_BLOCK, {signal.SIGINT})
    try:
        SubprocessASGIServer().start()  # the instance Prefect's client will reuse
    finally:
        signal.pthread_sigmask(signal.SIG_SETMASK, previous)


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_intermixed_args(argv)
    script, extras = split_script_and_extras(args.words)
    options = dict(script=script, param_file=args.param_file, gpu=args.gpu, popsize=args.popsize,
                   rounds=args.rounds, output_dir=args.output_dir, evaluator=args.evaluator,
                   tuning_strategy=args.tuning_strategy, seed=args.seed,
                   trial_timeout=args.trial_timeout, trials_per_gpu=args.trials_per_gpu,
                   cpu_slots=args.cpu_slots, python=args.python, extras=extras,
                   trial_retries=args.trial_retries, pbt_epochs=args.pbt_epochs,
                   keep_checkpoints=args.keep_checkpoints)
    try:
        settings = resolve_settings(**options)  # before Prefect starts: bad input costs nothing
        run_dir = RunDir(settings.output_dir)
        state = run_dir.read_state()
        if state is not None:
            check_resume(state, settings.search, run_dir.state_path)
            with run_dir.lock():  # refuse a second live search before Prefect even starts
                pass
    except (ValueError, RunDirBusy) as exc:
        print(f"autofinetune: error: {exc}", file=sys.stderr)
        return 2
    options["output_dir"] = str(settings.output_dir)
    options["cwd"] = str(Path.cwd())
    STOP.clear()
    previous = {sig: signal.signal(sig, _request_stop) for sig in (signal.SIGINT, signal.SIGTERM)}
    try:
        _start_embedded_api()
        summary = autofinetune(**options)
    except SearchInterrupted:
        print(f"autofinetune: stopped; state is saved in {settings.output_dir}. Re-run the same "
              f"command with --output-dir {settings.output_dir} to resume.", file=sys.stderr, flush=True)
        return 130
    except (ValueError, RunDirBusy) as exc:  # e.g. a run dir taken between the check and the start
        print(f"autofinetune: error: {exc}", file=sys.stderr)
        return 2
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)
    return 0 if summary["best_score"] is not None else 1


if __name__ == "__main__":
    sys.exit(main())
