"""The nightly deployment (prefect.yaml), and retrying its runs after a crash.

Everything goes through the documented commands, as subprocesses pointed at the session's
real Prefect server: ``prefect work-pool create``, ``prefect deploy``, ``prefect deployment
run``, ``prefect worker start`` (a process worker, started outside the repo: the
deployment's pull step must bring runs back to the checkout), ``prefect flow-run retry``
(what the UI's Retry button does) and ``python -m flows.automations``. The server's view is
read with Prefect's client.
"""

from __future__ import annotations

import asyncio
import json
import os
import re
import signal
import subprocess
import sys
import time
from collections import Counter
from datetime import datetime, timedelta
from pathlib import Path
from zoneinfo import ZoneInfo

import pytest
import yaml

from conftest import ROOT, SCRIPTS, descendants, pid_alive

# Real servers, workers and heartbeat windows: slow, and kept on one xdist worker (their
# module fixture deploys once).
pytestmark = [pytest.mark.slow, pytest.mark.xdist_group("deployments")]

PREFECT = str(Path(sys.executable).parent / "prefect")
SPEC = yaml.safe_load((ROOT / "prefect.yaml").read_text())["deployments"][0]
POOL = SPEC["work_pool"]["name"]
DEPLOYMENT = f"autofinetune/{SPEC['name']}"
HPARAM = ("param_list:\n"
          "  - name: x\n    init_value: 0.0\n    type: float\n    greater_than: -1.0\n    lower_than: 1.0\n"
          "  - name: n\n    init_value: 1\n    type: int\n    greater_than: 0\n    lower_than: 8\n")


def prefect(env, *args, cwd=ROOT, timeout=120) -> str:
    done = subprocess.run([PREFECT, *args], cwd=cwd, env=env, capture_output=True, text=True,
                          timeout=timeout)
    assert done.returncode == 0, f"prefect {' '.join(args)}:\n{done.stdout[-3000:]}{done.stderr[-3000:]}"
    return done.stdout


def client_call(env, fn):
    """Run ``await fn(client)`` with a Prefect client on the session's server."""
    import flows  # noqa: F401  (the project's Prefect defaults)
    from prefect.client.orchestration import get_client
    from prefect.settings import PREFECT_API_URL, temporary_settings

    async def call():
        async with get_client() as client:
            return await fn(client)

    with temporary_settings({PREFECT_API_URL: env["PREFECT_API_URL"]}):
        return asyncio.run(call())


def wait_for_state(env, run_id, types: set[str], timeout: float):
    """Poll the flow run until its state type is one of ``types``; returns the flow run."""
    async def poll(client):
        deadline = time.monotonic() + timeout
        while True:
            run = await client.read_flow_run(run_id)
            if run.state_type.value in types or time.monotonic() > deadline:
                return run
            await asyncio.sleep(0.5)

    return client_call(env, poll)


class Worker:
    """``prefect worker start --pool POOL`` in ``cwd``; ``stop()`` kills it and everything it
    started (flow-run processes live in their own sessions, trials in their own groups)."""

    def __init__(self, env, cwd: Path, *args):
        self.log_path = cwd / f"worker-{time.monotonic_ns()}.log"
        self.log = open(self.log_path, "w")
        self.proc = subprocess.Popen(
            [PREFECT, "worker", "start", "--pool", POOL, *args], cwd=cwd,
            env=dict(env, PREFECT_WORKER_QUERY_SECONDS="1"), stdout=self.log,
            stderr=subprocess.STDOUT, start_new_session=True)

    def output(self) -> str:
        return self.log_path.read_text()[-4000:]

    def wait_for_line(self, text: str, timeout: float = 60) -> None:
        """Wait until the worker has logged ``text`` (anywhere in its log)."""
        deadline = time.monotonic() + timeout
        while text not in self.log_path.read_text():
            assert time.monotonic() < deadline, self.output()
            time.sleep(0.2)

    def stop(self) -> None:
        for pid in [self.proc.pid, *descendants(self.proc.pid)]:
            try:
                os.kill(pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
        self.proc.wait(timeout=30)
        self.log.close()


@pytest.fixture(scope="module")
def deployed(prefect_server):
    """The work pool and the deployments of prefect.yaml, as README's "Run nightly" makes
    them; yields (env, the deployment as the server stored it). Its schedule is then paused,
    so that no real nightly run is picked up by the tests' workers."""
    env = prefect_server
    prefect(env, "work-pool", "create", POOL, "--type", "process")
    prefect(env, "--no-prompt", "deploy", "--all")

    async def read_and_pause(client):
        deployment = await client.read_deployment_by_name(DEPLOYMENT)
        for schedule in deployment.schedules:
            await client.update_deployment_schedule(deployment.id, schedule.id, active=False)
        return deployment

    yield env, client_call(env, read_and_pause)


def toy_work(tmp_path) -> Path:
    (tmp_path / "train.py").write_text((SCRIPTS / "toy_train.py").read_text())
    (tmp_path / "hparam.yaml").write_text(HPARAM)
    return tmp_path


def run_toy_search(env, work: Path, root: Path, events: Path, sleep: float = 3) -> str:
    """``prefect deployment run`` of a small toy search (2 rounds x 2 trials on one CPU slot,
    ``sleep`` s each); returns the flow run's id."""
    extras = {"extras": ["sleep", str(sleep), "events", str(events)]}
    out = prefect(env, "deployment", "run", DEPLOYMENT, "--param", f"script={work / 'train.py'}",
                  "--param", f"param_file={work / 'hparam.yaml'}", "--param", "popsize=2",
                  "--param", "rounds=2", "--param", "cpu_slots=1", "--param", "seed=3",
                  "--param", f"output_root={root}", "--params", json.dumps(extras))
    return re.search(r"UUID: ([0-9a-f-]{36})", out).group(1)


def wait_mid_round_1(root: Path, events: Path, worker: Worker) -> Path:
    """Wait until round 1's first trial is recorded and its second has started; returns
    the run dir."""
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline:
        run_dirs = list(root.glob("output_*"))
        if (run_dirs and (run_dirs[0] / "round1" / "trial-0.json").exists() and events.exists()
                and "start" in {line.split()[0] for line in events.read_text().splitlines()
                                if line.split()[3:5] == ["1", "1"]}):
            return run_dirs[0]
        time.sleep(0.1)
    raise AssertionError(f"the search never reached round 1:\n{worker.output()}")


def trial_starts(events: Path) -> Counter:
    return Counter((int(w[3]), int(w[4])) for w in map(str.split, events.read_text().splitlines())
                   if w[0] == "start")


def retry_and_check_resumed(env, run_id, run_dir: Path, events: Path, worker: Worker) -> None:
    """``prefect flow-run retry``: a worker runs it again, in the same run dir, and only the
    interrupted trial runs a second time."""
    assert "scheduled for retry" in " ".join(prefect(env, "flow-run", "retry", run_id).split())
    run = wait_for_state(env, run_id, {"COMPLETED", "FAILED", "CRASHED"}, timeout=150)
    assert run.state_type.value == "COMPLETED", worker.output()
    assert run.run_count == 2
    assert list(run_dir.parent.iterdir()) == [run_dir]  # resumed, not a new dated dir
    state = json.loads((run_dir / "state.json").read_text())
    assert state["next_round"] == 2 and (run_dir / "best_model" / "weights.json").is_file()
    assert trial_starts(events) == {(0, 0): 1, (0, 1): 1, (1, 0): 1, (1, 1): 2}
    assert len(list(run_dir.glob("round*/trial-*.json"))) == 4
    assert not list(run_dir.glob("round*/.pid-*"))


def test_prefect_yaml_deploys_the_nightly_schedule_and_its_parameters(deployed):
    env, deployment = deployed
    (schedule,) = deployment.schedules
    assert schedule.schedule.cron == SPEC["schedules"][0]["cron"] == "0 3 * * *"
    assert schedule.schedule.timezone == SPEC["schedules"][0]["timezone"] == "Europe/Berlin"
    assert schedule.active
    assert deployment.parameters == SPEC["parameters"]
    assert deployment.parameters["script"] == "examples/digits/train.py"
    assert deployment.work_pool_name == POOL
    assert deployment.entrypoint == "flows.autofinetune:autofinetune"
    # The code stays where it is: no push, and runs start in the checkout deploy ran in.
    assert deployment.pull_steps == [
        {"prefect.deployments.steps.set_working_directory": {"directory": str(ROOT)}}]
    assert deployment.job_variables["env"]["PREFECT_FLOWS_HEARTBEAT_FREQUENCY"] == "30"
    assert "heartbeat-30s" in deployment.tags


def test_a_nightly_run_tunes_the_digits_example_into_a_dated_run_dir(deployed, tmp_path):
    """Last night's 03:00 run, picked up late by a worker started outside the repo: the
    deployment's relative paths resolve against the checkout, and the run dir is dated by
    the schedule slot (not by when the run was created, days ahead, by the scheduler)."""
    env, deployment = deployed
    from prefect.states import Scheduled

    now = datetime.now(ZoneInfo("Europe/Berlin"))
    slot = now.replace(hour=3, minute=0, second=0, microsecond=0)
    slot -= timedelta(days=1) if slot > now else timedelta(0)
    root = tmp_path / "nightly"

    async def create(client):
        return await client.create_flow_run_from_deployment(
            deployment.id, parameters={"popsize": 2, "rounds": 1, "output_root": str(root)},
            state=Scheduled(scheduled_time=slot))

    run = client_call(env, create)
    worker = Worker(env, tmp_path, "--run-once")
    try:
        worker.proc.wait(timeout=180)
        run = wait_for_state(env, run.id, {"COMPLETED", "FAILED", "CRASHED"}, timeout=10)
        assert run.state_type.value == "COMPLETED", worker.output()
    finally:
        worker.stop()
    run_dir = root / f"output_{slot.astimezone():%Y%m%d%H%M%S}"
    assert list(root.iterdir()) == [run_dir]
    assert run.name.startswith("nightly-")
    state = json.loads((run_dir / "state.json").read_text())
    assert state["next_round"] == 1 and state["search"]["popsize"] == 2
    assert state["run"]["script"] == str(ROOT / "examples" / "digits" / "train.py")
    assert sorted(p.name for p in (run_dir / "round0").glob("trial-*.json")) == ["trial-0.json", "trial-1.json"]
    assert any((run_dir / "best_model").iterdir())


def test_a_killed_run_is_crashed_by_its_worker_and_retry_resumes_it(deployed, tmp_path):
    """SIGKILL of the flow-run process mid-round: the worker reports the run Crashed at
    once; ``prefect flow-run retry`` resumes its run dir, finished trials are not re-run."""
    env, _ = deployed
    work, root, events = toy_work(tmp_path), tmp_path / "runs", tmp_path / "events.txt"
    worker = Worker(env, tmp_path)
    try:
        run_id = run_toy_search(env, work, root, events)
        run_dir = wait_mid_round_1(root, events, worker)
        flow_pid = int((run_dir / ".lock").read_text())  # the flow-run process holds the lock
        assert flow_pid in descendants(worker.proc.pid)
        os.kill(flow_pid, signal.SIGKILL)
        killed = time.monotonic()
        run = wait_for_state(env, run_id, {"CRASHED", "FAILED", "COMPLETED"}, timeout=60)
        assert run.state_type.value == "CRASHED", worker.output()
        assert "status code: -9" in run.state.message
        assert time.monotonic() - killed < 30
        assert pid_alive(worker.proc.pid)
        # The flow-run executor reports the crash at once, the worker once more ~10 s later
        # (after trying to run on_crashed hooks): a retry in between is crashed by that late
        # report (Prefect 3.9.1). Retry after it, as a person in the UI would.
        worker.wait_for_line("prefect.flow_runs.worker - Check whether")
        retry_and_check_resumed(env, run_id, run_dir, events, worker)
    finally:
        worker.stop()


@pytest.mark.parametrize("how, final", [("cancel", "CANCELLED"), ("sigterm", "CRASHED")])
def test_a_cancelled_or_stopped_run_stops_its_trials_and_retry_resumes_it(deployed, tmp_path, how, final):
    """Cancel in the UI (the run set Cancelling; its worker then SIGTERMs the flow-run
    process) or stop the process as a service manager stopping the worker's host would
    (SIGTERM): the running trial's group is terminated, nothing more launches, the run ends
    Cancelled or Crashed, and ``prefect flow-run retry`` resumes it."""
    env, _ = deployed
    from prefect.states import Cancelling

    work, root, events = toy_work(tmp_path), tmp_path / "runs", tmp_path / "events.txt"
    worker = Worker(env, tmp_path)
    try:
        run_id = run_toy_search(env, work, root, events, sleep=12)  # round 1 is still running when the test acts
        run_dir = wait_mid_round_1(root, events, worker)
        flow_pid = int((run_dir / ".lock").read_text())
        trial_pids = [int(w[2]) for w in map(str.split, events.read_text().splitlines()) if w[0] == "start"]
        if how == "cancel":  # what the UI's Cancel and `prefect flow-run cancel` do
            client_call(env, lambda client: client.set_flow_run_state(run_id, Cancelling()))
        else:
            os.kill(flow_pid, signal.SIGTERM)
        sent = time.monotonic()
        run = wait_for_state(env, run_id, {"CANCELLED", "CRASHED", "FAILED", "COMPLETED"}, timeout=90)
        assert run.state_type.value == final, worker.output()
        deadline = time.monotonic() + 30
        while pid_alive(flow_pid) and time.monotonic() < deadline:
            time.sleep(0.1)
        assert not pid_alive(flow_pid) and time.monotonic() - sent < 60
        assert not any(pid_alive(pid) for pid in trial_pids)  # no orphaned trial
        assert trial_starts(events) == {(0, 0): 1, (0, 1): 1, (1, 0): 1, (1, 1): 1}  # nothing launched after
        assert not list(run_dir.glob("round*/.pid-*")) and not (run_dir / ".stop").exists()
        state = json.loads((run_dir / "state.json").read_text())
        assert state["next_round"] == 1
        assert json.loads((run_dir / "round1" / "trial-1.json").read_text())["outcome"] == "interrupted"
        assert pid_alive(worker.proc.pid)
        if how == "cancel":
            # The worker's cancellation manager finishes after the run is Cancelled and proposes
            # Cancelled once more: a retry in between is cancelled again (Prefect 3.9.1). Retry
            # after its "Cancelled flow run" line, as a person watching the worker would.
            worker.wait_for_line("prefect.runner.cancellation_manager - Cancelled flow run")
        retry_and_check_resumed(env, run_id, run_dir, events, worker)
    finally:
        worker.stop()


@pytest.mark.slow
def test_a_run_whose_worker_died_too_is_crashed_by_the_automation_and_resumes(deployed, tmp_path):
    """The host dies: worker and flow run are SIGKILLed together, so nobody reports the run.
    The automation of ``python -m flows.automations`` marks it Crashed once its heartbeats
    stop; a new worker runs the retry, reaps the dead run's trials, and resumes."""
    env, _ = deployed
    from prefect.events.schemas.events import ResourceSpecification

    from flows.automations import AUTOMATION_NAME

    def automations(client):
        return client.read_automations_by_name(AUTOMATION_NAME)

    cli = [sys.executable, "-m", "flows.automations"]
    subprocess.run(cli, cwd=ROOT, env=env, check=True, capture_output=True)
    (shipped,) = client_call(env, automations)
    assert shipped.trigger.within == timedelta(seconds=90)
    assert shipped.trigger.posture == "Proactive"
    assert shipped.trigger.match_related == ResourceSpecification(
        {"prefect.resource.role": "tag", "prefect.resource.id": "prefect.tag.heartbeat-30s"})
    assert shipped.actions[0].state.value == "CRASHED" and not shipped.actions[0].force
    # Run again, the test waits for a shorter window: the same automation, updated in place.
    subprocess.run(cli + ["--within", "50"], cwd=ROOT, env=env, check=True, capture_output=True)
    (automation,) = client_call(env, automations)
    assert automation.id == shipped.id and automation.trigger.within == timedelta(seconds=50)

    work, root, events = toy_work(tmp_path), tmp_path / "runs", tmp_path / "events.txt"
    worker = Worker(env, tmp_path)
    second = None
    try:
        run_id = run_toy_search(env, work, root, events)
        run_dir = wait_mid_round_1(root, events, worker)
        flow_pid = int((run_dir / ".lock").read_text())
        os.kill(worker.proc.pid, signal.SIGKILL)  # the worker first: it must not report
        os.kill(flow_pid, signal.SIGKILL)
        killed = time.monotonic()
        second = Worker(env, tmp_path)  # the host is back: a new worker, idle until the retry
        run = wait_for_state(env, run_id, {"CRASHED", "FAILED", "COMPLETED"}, timeout=120)
        assert run.state_type.value == "CRASHED", worker.output()
        assert run.state.message.startswith("No heartbeat for 50 s")
        print(f"Crashed by the automation {time.monotonic() - killed:.0f} s after the kill")
        retry_and_check_resumed(env, run_id, run_dir, events, second)
    finally:
        worker.stop()
        if second:
            second.stop()
        client_call(env, lambda client: client.delete_automation(automation.id))


def test_the_automation_refuses_a_window_heartbeats_cannot_fill_and_a_missing_server(capsys):
    from prefect.settings import PREFECT_API_URL, temporary_settings

    from flows.automations import crash_silent_runs, main

    with pytest.raises(ValueError, match="within must exceed the 30 s heartbeat interval"):
        crash_silent_runs(within=timedelta(seconds=30))
    with temporary_settings(restore_defaults={PREFECT_API_URL}):  # not Prefect's ephemeral API
        assert main([]) == 2
    assert "PREFECT_API_URL is not set" in capsys.readouterr().err
