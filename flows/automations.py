"""Mark a dead deployment run Crashed, so that it can be retried: a Prefect automation.

When only a flow run's process dies, the process worker that started it sees the exit
status and reports the run Crashed at once. When the worker dies with it (a reboot, an
OOM kill of the host, a lost container), nobody is left to tell Prefect, and the run shows
"Running" forever: the UI offers no Retry. Prefect's remedy ("How to detect and respond to
zombie flows") is heartbeats plus an automation, which this module creates:

- deployment runs emit a ``prefect.flow-run.heartbeat`` event every 30 s
  (``PREFECT_FLOWS_HEARTBEAT_FREQUENCY``, set in prefect.yaml's job variables);
- the automation here (a proactive event trigger) marks a run Crashed when ``within``
  (90 s) passes after a heartbeat with neither another heartbeat nor a final state.

A Crashed run is retried from the UI (Retry) or with ``prefect flow-run retry <id>``; a
worker starts it again and it resumes its run directory (see flows/autofinetune.py).

    python -m flows.automations            # create or update it on $PREFECT_API_URL's server

Unlike Prefect's example, the trigger only watches runs tagged ``HEARTBEAT_TAG``: every flow
run emits heartbeats, by default every 180 s, so an unscoped 90 s window would mark healthy
CLI searches and ``round-<k>`` subflows Crashed. The tag goes with the 30 s heartbeat in
prefect.yaml. The state change is not forced: a run already final is never touched.
"""

from __future__ import annotations

import argparse
import sys
from datetime import timedelta

from prefect.automations import Automation
from prefect.client.schemas.objects import StateType
from prefect.events.actions import ChangeFlowRunState
from prefect.events.schemas.automations import EventTrigger, Posture
from prefect.events.schemas.events import ResourceSpecification

__all__ = ["AUTOMATION_NAME", "HEARTBEAT_TAG", "crash_silent_runs", "ensure_crash_silent_runs", "main"]

AUTOMATION_NAME = "autofinetune: crash runs without heartbeats"
HEARTBEAT_TAG = "heartbeat-30s"  # deployments that set PREFECT_FLOWS_HEARTBEAT_FREQUENCY=30
WITHIN = timedelta(seconds=90)  # three missed heartbeats
_FINAL = ("Completed", "Failed", "Cancelled", "Crashed")


def crash_silent_runs(*, within: timedelta = WITHIN, tag: str = HEARTBEAT_TAG) -> Automation:
    """The automation (not yet on a server): a run tagged ``tag`` that emitted a heartbeat
    and then nothing for ``within`` is set Crashed."""
    if within <= timedelta(seconds=30):
        raise ValueError(f"within must exceed the 30 s heartbeat interval, got {within=}")
    return Automation(
        name=AUTOMATION_NAME,
        description=(f"Marks a flow run tagged {tag!r} Crashed when it sends no heartbeat for "
                     f"{within.total_seconds():.0f} s (its process died with its worker), so "
                     "that it can be retried. Created by `python -m flows.automations`."),
        trigger=EventTrigger(
            after={"prefect.flow-run.heartbeat"},
            expect={"prefect.flow-run.heartbeat", *(f"prefect.flow-run.{s}" for s in _FINAL)},
            match=ResourceSpecification({"prefect.resource.id": ["prefect.flow-run.*"]}),
            match_related=ResourceSpecification({"prefect.resource.role": "tag",
                                                 "prefect.resource.id": f"prefect.tag.{tag}"}),
            for_each={"prefect.resource.id"},
            posture=Posture.Proactive,
            threshold=1,
            within=within,
        ),
        actions=[ChangeFlowRunState(
            state=StateType.CRASHED,
            message=(f"No heartbeat for {within.total_seconds():.0f} s: the flow run's process "
                     "died. Retry it to resume its run directory."))],
    )


def ensure_crash_silent_runs(*, within: timedelta = WITHIN, tag: str = HEARTBEAT_TAG) -> Automation:
    """Create the automation on the current Prefect server, or bring the one of that name
    up to date; idempotent. Returns it, with its id."""
    wanted = crash_silent_runs(within=within, tag=tag)
    try:
        existing = Automation.read(name=AUTOMATION_NAME)
    except ValueError:  # Prefect's "not found"
        return wanted.create()
    wanted.id = existing.id
    wanted.update()
    return wanted


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m flows.automations",
        description="Create (or update) the automation that marks deployment runs without "
                    "heartbeats Crashed, on the server of PREFECT_API_URL.")
    parser.add_argument("--within", type=float, default=WITHIN.total_seconds(), metavar="S",
                        help="seconds without a heartbeat before a run is Crashed "
                             f"(default {WITHIN.total_seconds():.0f}; more than 30)")
    args = parser.parse_args(argv)
    from prefect.settings import PREFECT_API_URL

    if not PREFECT_API_URL.value():
        print("python -m flows.automations: error: PREFECT_API_URL is not set; point it at your "
              "Prefect server, e.g. PREFECT_API_URL=http://127.0.0.1:4200/api", file=sys.stderr)
        return 2
    try:
        automation = ensure_crash_silent_runs(within=timedelta(seconds=args.within))
    except ValueError as exc:
        print(f"python -m flows.automations: error: {exc}", file=sys.stderr)
        return 2
    print(f"Automation {automation.name!r} ({automation.id}) is active: runs tagged "
          f"{HEARTBEAT_TAG!r} are marked Crashed after {args.within:.0f} s without a heartbeat.")
    return 0


if __name__ == "__main__":
    sys.exit(main())
