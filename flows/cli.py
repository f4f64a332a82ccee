"""The command line: ``python -m flows.autofinetune`` (also ``autofinetune``).

    python -m flows.autofinetune train.py --param-file hparam.yaml --gpu 0,1 \\
        --popsize 5 --round 10 --evaluator fulltrail --tuning-strategy hazero [KEY VALUE ...]

Parses the options (declared once, in ``runtime.options``), checks every input before
Prefect is even imported (``--help`` and a bad input answer in well under a second), sets
Prefect's defaults for this process, installs the Ctrl-C/SIGTERM handler and runs the
``autofinetune`` flow in this process. Exit status: 0 success, 1 no trial produced a score,
2 bad input (one line; nothing was created on disk), 130 stopped by SIGINT/SIGTERM
(re-run the same command to resume).
"""

from __future__ import annotations

import argparse
import os
import signal
import sys
from pathlib import Path

from flows import signals
from runtime.options import add_arguments
from runtime.rundir import RunDir, RunDirBusy, StopMarker
from runtime.search import SearchInterrupted, check_resume, check_rounds_on_disk, load_tuner
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


def main(argv: list[str] | None = None) -> int:
    args = vars(build_parser().parse_intermixed_args(argv))
    args["script"], args["extras"] = split_script_and_extras(args.pop("words"))
    try:
        settings = resolve_settings(args)  # before Prefect starts: bad input costs nothing
        run_dir = RunDir(settings.output_dir)
        state = run_dir.read_state()
        if state is not None:
            check_resume(state, settings.search, run_dir.state_path)
            check_rounds_on_disk(run_dir, state)
            try:
                load_tuner(state)  # a damaged tuner state is refused here too, not mid-search
            except ValueError as exc:
                raise ValueError(f"{run_dir.state_path}: field 'tuner': {exc}; restore the file from "
                                 "a backup, or start over with a new --output-dir") from None
            with run_dir.lock():  # refuse a second live search before Prefect even starts
                run_dir.stop.clear()  # a stale stop of an earlier run
    except (ValueError, RunDirBusy) as exc:  # SettingsError, SearchSpaceError, RunStateError, ...
        return _error(exc)
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
    try:
        from prefect.exceptions import TerminationSignal

        from flows.autofinetune import autofinetune

        _start_embedded_api()
        try:
            summary = autofinetune(**args)
        except TerminationSignal:  # a SIGTERM while Prefect's own handler was in force
            handler.requested = True
            run_dir.stop.set()
            raise SearchInterrupted("stopped by SIGTERM") from None
    except SearchInterrupted:
        print(f"autofinetune: stopped; state is saved in {out}. Re-run the same "
              f"command with --output-dir {out} to resume.", file=sys.stderr, flush=True)
        return 130
    except (ValueError, RunDirBusy) as exc:  # e.g. a run dir taken between the check and the start
        return _error(exc)
    finally:
        signals.unregister(previous)
        if handler.requested:
            run_dir.stop.clear()  # the stop is served; a re-run resumes
        if claimed is not None and claimed.is_dir() and not any(claimed.iterdir()):
            claimed.rmdir()  # claimed, but the search never started
    return 0 if summary["best_score"] is not None else 1


if __name__ == "__main__":
    sys.exit(main())
