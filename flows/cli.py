"""The command line: ``python -m flows.autofinetune`` (also ``autofinetune``).

    python -m flows.autofinetune train.py --param-file hparam.yaml --gpu 0,1 \\
        --popsize 5 --round 10 --evaluator fulltrail --tuning-strategy hazero [KEY VALUE ...]

Parses the options (declared once, in ``runtime.options``), checks every input before
Prefect is even imported (``--help`` and a bad input answer in well under a second), sets
Prefect's defaults for this process, installs the Ctrl-C/SIGTERM handler and runs the
``autofinetune`` flow in this process. The command of a finished search (``--round`` not
raised) is answered from the run dir without Prefect: the final summary, exit 0. Exit status: 0 success, 1 no trial produced a score,
2 bad input (one line; nothing was created on disk), 3 could not run (the environment
failed: an unwritable or full disk, an unreachable or dead Prefect API; one line with the
cause and the fix; re-run to resume), 130 stopped by SIGINT/SIGTERM or cancelled in the
Prefect UI (re-run the same command to resume).
"""

from __future__ import annotations

import argparse
import os
import signal
import sys
from pathlib import Path

from flows import signals
from flows.environment import (EXIT_COULD_NOT_RUN, ApiWatchdog, CouldNotRun, QuietConsole, check_writable,
                               dead_after_s, describe_failure, probe_api)
from runtime.options import add_arguments
from runtime.rundir import RunDir, RunDirBusy, StopMarker
from runtime.search import (SearchInterrupted, check_resume, check_rounds_on_disk, final_summary, load_tuner,
                            record_best)
from runtime.settings import resolve_settings, split_script_and_extras

__all__ = ["main", "build_parser", "PREFECT_DEFAULTS"]

# Set for this process (unless the user set them) before Prefect is imported: a longer
# start-up timeout for the embedded (ephemeral) API server, which takes 18-21 s on a fresh
# database here next to Prefect's default of 20 s; and no telemetry, which only logs
# errors on a machine without internet.
PREFECT_DEFAULTS = {"PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS": "120",
                    "PREFECT_SERVER_ANALYTICS_ENABLED": "false"}


class _OneLineParser(argparse.ArgumentParser):
    def error(self, message: str):  # argparse's default prints the whole usage block
        self.exit(2, f"autofinetune: error: {message} (see --help)\n")


def build_parser() -> argparse.ArgumentParser:
    p = _OneLineParser(prog="python -m flows.autofinetune",
                       description="Automatic hyperparameter search for a training script, on Prefect.")
    p.add_argument("words", nargs="*", metavar="[SCRIPT] [KEY VALUE ...]",
                   help="the training script (default train.py), then extra KEY VALUE pairs "
                        "forwarded to it as --KEY=VALUE")
    add_arguments(p)
    return p


class _StopHandler:
    """Ctrl-C / SIGTERM: mark the run dir stopped (every trial sees it); a second one stops waiting."""

    def __init__(self, marker: StopMarker) -> None:
        self.marker = marker
        self.requested = False

    def __call__(self, signum, _frame) -> None:
        if self.requested:  # a second Ctrl-C: stop waiting for a clean shutdown
            raise KeyboardInterrupt
        self.requested = True
        self.marker.set()
        print(f"\nautofinetune: {signal.Signals(signum).name} received: stopping running trials, "
              "launching no more", file=sys.stderr, flush=True)


def _start_embedded_api(warm_up) -> str | None:
    """Start Prefect's embedded API now, with SIGINT blocked in it, and run ``warm_up`` (the
    imports the first trial needs) while it starts.

    Prefect starts it lazily as a child in our process group, so a terminal's Ctrl-C
    reached it too and killed the API the search needs to record its stop. A blocked
    signal stays blocked across exec, so the server ignores Ctrl-C and is stopped by
    Prefect (SIGTERM) when the search exits. The server is started from a thread of its own
    that blocks SIGINT (a thread's mask is what its child inherits) and then only waits for
    the server's /health, so this thread imports meanwhile. Returns the API's URL:
    PREFECT_API_URL's, checked to answer (else ``CouldNotRun``), or the embedded server's.
    """
    from prefect.settings import PREFECT_API_URL, PREFECT_SERVER_EPHEMERAL_ENABLED

    url = PREFECT_API_URL.value()
    if url:
        why = probe_api(url)
        if why is not None:
            raise CouldNotRun(f"the Prefect API at {url} (PREFECT_API_URL) does not answer ({why}); "
                              "start it (prefect server start), or unset PREFECT_API_URL to use an "
                              "embedded one")
        warm_up()
        return url
    if not PREFECT_SERVER_EPHEMERAL_ENABLED.value():
        warm_up()
        return None
    import threading

    from prefect.server.api.server import SubprocessASGIServer

    server = SubprocessASGIServer()  # the instance Prefect's client will reuse
    failed: list[BaseException] = []

    def start() -> None:
        signal.pthread_sigmask(signal.SIG_BLOCK, {signal.SIGINT})
        try:
            server.start()
        except BaseException as exc:  # raised below, in the CLI's thread
            failed.append(exc)

    starting = threading.Thread(target=start, name="prefect-embedded-api", daemon=True)
    starting.start()
    try:
        warm_up()
    finally:
        starting.join()
    if failed:
        raise failed[0]
    return server.api_url


def _warm_up(settings) -> None:
    """Import what the first trial needs (Prefect's flow engine, the round's tasks, the
    watchers, the tuner's backend: cmaes and scipy for HAZero), while the API starts."""
    import flows.autofinetune  # noqa: F401
    import watch.gpu_telemetry  # noqa: F401
    import watch.progress  # noqa: F401
    from tuners import SearchSpace, make_tuner

    search = settings.search
    make_tuner(search.strategy, SearchSpace.from_dict(search.space), popsize=search.popsize, seed=0)


def _quiet_console(watchdog: ApiWatchdog | None) -> None:
    """``QuietConsole`` on every stream handler Prefect's logging set up."""
    import logging

    loggers = [logging.getLogger(), *logging.Logger.manager.loggerDict.values()]
    for handler in {h for lg in loggers for h in getattr(lg, "handlers", ())}:
        if isinstance(handler, logging.StreamHandler) and not isinstance(handler, logging.FileHandler):
            handler.addFilter(QuietConsole(watchdog))


def _give_up_on_dead_api(run_dir: RunDir, url: str, out: Path):
    """The watchdog's verdict: stop the trials, leave the run dir resumable, exit 3 at once
    (the flow's thread is stuck in the Prefect client's retries and cannot unwind)."""
    def give_up(reason: str) -> None:
        import time

        from flows.ephemeral_server import kill_own_servers
        from runtime.trial import reap_orphans

        print(f"\nautofinetune: could not run: the Prefect API at {url} stopped answering ({reason}); "
              "stopping running trials", file=sys.stderr, flush=True)
        run_dir.stop.set()
        deadline = time.monotonic() + 15  # each trial's runner terminates its group and says so
        while run_dir.pid_files() and time.monotonic() < deadline:
            time.sleep(0.2)
        reap_orphans(run_dir.pid_files())
        kill_own_servers()  # a wedged embedded server would outlive this process
        run_dir.remove_temp_files()
        run_dir.stop.clear_own()
        print(f"autofinetune: state is saved in {out}; bring the API back (or unset PREFECT_API_URL), "
              f"then re-run the same command with --output-dir {out} to resume.", file=sys.stderr, flush=True)
        os._exit(EXIT_COULD_NOT_RUN)

    return give_up


def _answer_finished(run_dir: RunDir, settings, state) -> int:
    """A search that already ran its rounds (``--round`` not raised): finish what a kill at its
    very end left undone, as a resume would, and print the final summary; no Prefect at all.
    (The Prefect artifact of the best stays as the run that finished wrote it.)"""
    from flows.ephemeral_server import reap_stale_server
    from runtime.trial import reap_orphans
    from watch.visualization import VisualDLLogs, VisualDLWatcher

    names = list(settings.space.names)
    with run_dir.lock():  # a live search on the dir is refused here too
        reap_stale_server(run_dir.path / ".prefect-server")
        reap_orphans(run_dir.pid_files())
        run_dir.remove_temp_files()
        run_dir.stop.clear()
        best = record_best(run_dir, names, final=True)
        if VisualDLLogs(run_dir.visualization).rounds_written < state.next_round:
            VisualDLWatcher(output_dir=run_dir.path, names=names).search_started({"next_round": state.next_round})
    text, _ = final_summary(run_dir, names, best)
    print(text, flush=True)
    print(f"autofinetune: the search in {run_dir.path} already ran its {state.next_round} rounds; "
          "raise --round to extend it.", file=sys.stderr, flush=True)
    return 0 if best is not None else 1


def _claim(path: Path) -> Path | None:
    """Create ``path`` (or ``path-2``, ``-3``, ...) exclusively; None when none is free."""
    for n in range(1, 100):
        candidate = path if n == 1 else path.with_name(f"{path.name}-{n}")
        try:
            candidate.mkdir(parents=True)
            return candidate
        except FileExistsError:
            continue
    return None


def _error(exc: Exception) -> int:
    print(f"autofinetune: error: {exc}", file=sys.stderr)
    return 2


def _could_not_run(why: str) -> int:
    print(f"autofinetune: could not run: {why}", file=sys.stderr, flush=True)
    return EXIT_COULD_NOT_RUN


def main(argv: list[str] | None = None) -> int:
    args = vars(build_parser().parse_intermixed_args(argv))
    args["script"], args["extras"] = split_script_and_extras(args.pop("words"))
    try:
        settings = resolve_settings(args)  # before Prefect starts: bad input costs nothing
        check_writable(settings.output_dir)
        run_dir = RunDir(settings.output_dir)
        state = run_dir.read_state()
        if state is not None:
            check_resume(state, settings.search, run_dir.state_path)
            check_rounds_on_disk(run_dir, state)
            if state.next_round >= settings.rounds:  # finished: answer from the run dir (no tuner)
                return _answer_finished(run_dir, settings, state)
            try:
                load_tuner(state)  # a damaged tuner state is refused here too, not mid-search
            except ValueError as exc:
                raise ValueError(f"{run_dir.state_path}: field 'tuner': {exc}; restore the file from "
                                 "a backup, or start over with a new --output-dir") from None
            with run_dir.lock():  # refuse a second live search before Prefect even starts
                run_dir.stop.clear()  # a stale stop of an earlier run
    except (ValueError, RunDirBusy) as exc:  # SettingsError, SearchSpaceError, RunStateError, ...
        return _error(exc)
    except CouldNotRun as exc:
        return _could_not_run(str(exc))
    claimed = None
    if not args.get("output_dir"):  # the default output_<stamp>: claim it now, so that a search
        claimed = _claim(settings.output_dir)  # started in the same second takes another name
        if claimed is None:
            return _error(ValueError(f"--output-dir {settings.output_dir}: taken by another search "
                                     "started at the same moment; run again"))
    out = claimed or settings.output_dir
    run_dir = RunDir(out)
    args.update(output_dir=str(out), cwd=str(Path.cwd()))
    for key, value in PREFECT_DEFAULTS.items():
        os.environ.setdefault(key, value)
    handler = _StopHandler(run_dir.stop)
    previous = signals.register(handler)
    api_url = watchdog = None
    try:
        from prefect.exceptions import CancelledRun, TerminationSignal

        api_url = _start_embedded_api(lambda: _warm_up(settings))
        from flows.autofinetune import autofinetune
        from flows.search_round import heartbeats_off_unless_set

        if api_url:
            watchdog = ApiWatchdog(api_url, _give_up_on_dead_api(run_dir, api_url, out), dead_after_s())
            watchdog.start()
        _quiet_console(watchdog)
        try:
            with heartbeats_off_unless_set():
                summary = autofinetune(**args)
        except TerminationSignal:  # a SIGTERM while Prefect's own handler was in force
            handler.requested = True
            run_dir.stop.set()
            raise SearchInterrupted("stopped by SIGTERM") from None
    except (SearchInterrupted, CancelledRun):
        print(f"autofinetune: stopped; state is saved in {out}. Re-run the same "
              f"command with --output-dir {out} to resume.", file=sys.stderr, flush=True)
        return 130
    except (ValueError, RunDirBusy) as exc:  # e.g. a run dir taken between the check and the start
        return _error(exc)
    except Exception as exc:
        why = describe_failure(exc, out, api_url)
        if why is None:
            raise
        if run_dir.path.is_dir():
            run_dir.remove_temp_files()
        return _could_not_run(why)
    finally:
        if watchdog is not None:
            watchdog.stop()
        signals.unregister(previous)
        run_dir.stop.clear_own()  # the stop is served; a re-run resumes
        if claimed is not None and claimed.is_dir() and not any(claimed.iterdir()):
            claimed.rmdir()  # claimed, but the search never started
    return 0 if summary["best_score"] is not None else 1


if __name__ == "__main__":
    sys.exit(main())
