"""Faults of the environment and of operators, through the real CLI (issue 9).

Exit status 3 ("could not run") for an unwritable or full disk and an unreachable or dead
Prefect API; a cancel in the Prefect UI stops a command-line search like Ctrl-C. Each
test checks what a user would: the exit status, the one line, the process table, the run
dir after the event, and that the same command then resumes to the uninterrupted result.
"""

from __future__ import annotations

import asyncio
import json
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest

from conftest import ROOT, SCRIPTS, free_port, pid_alive
from test_resume import ARGS, finish, outcome_of, reference, run_cli, start_cli  # noqa: F401 (a fixture)

CLI = [sys.executable, "-m", "flows.autofinetune", "train.py", "--param-file", "hparam.yaml", *ARGS]


@pytest.fixture
def work(toy):
    from test_resume import HPARAM
    (toy / "hparam.yaml").write_text(HPARAM)
    return toy


def can_mount() -> bool:
    done = subprocess.run(["unshare", "-m", "sh", "-c", "mount -t tmpfs tmpfs /mnt"], capture_output=True)
    return done.returncode == 0


needs_mount = pytest.mark.skipif(not can_mount(), reason="needs `unshare -m` with mount rights "
                                 "(root in a container that allows mount namespaces)")


def wait_until(predicate, timeout=180, what="the condition"):
    deadline = time.monotonic() + timeout
    while not predicate():
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        time.sleep(0.05)


def starts(events: Path) -> list[list[str]]:
    if not events.exists():
        return []
    return [line.split() for line in events.read_text().splitlines() if line.startswith("start")]


def assert_no_trial_left(work: Path, events: Path) -> None:
    assert not any(pid_alive(int(s[2])) for s in starts(events))
    ps = subprocess.run(["ps", "-eo", "pid,args"], capture_output=True, text=True).stdout
    assert str(work / "train.py") not in ps


def test_an_unreachable_api_at_start_is_one_line_exit_3_and_creates_nothing(work):
    url = f"http://127.0.0.1:{free_port()}/api"  # nothing listens there
    env = dict(os.environ, PREFECT_API_URL=url, PYTHONPATH=str(ROOT))
    done = subprocess.run([*CLI, "--output-dir", "run"], cwd=work, env=env, capture_output=True,
                          text=True, timeout=120)
    assert done.returncode == 3, done.stderr[-3000:]
    assert done.stderr.strip().splitlines() == [
        f"autofinetune: could not run: the Prefect API at {url} (PREFECT_API_URL) does not answer "
        "(Connection refused); start it (prefect server start), or unset PREFECT_API_URL to use "
        "an embedded one"]
    assert not (work / "run").exists()


@needs_mount
def test_a_read_only_output_dir_is_one_line_exit_3_and_creates_nothing(work):
    ro = work / "ro"
    ro.mkdir()
    script = f'mount -t tmpfs -o ro tmpfs {ro} && exec "$@"'
    done = subprocess.run(["unshare", "-m", "sh", "-c", script, "sh", *CLI, "--output-dir", "ro/run"],
                          cwd=work, env=dict(os.environ, PYTHONPATH=str(ROOT)), capture_output=True,
                          text=True, timeout=60)
    assert done.returncode == 3, done.stderr
    assert done.stderr.strip().splitlines() == [
        f"autofinetune: could not run: --output-dir {ro / 'run'}: cannot write to {ro} (read-only file "
        "system); pick a writable --output-dir, or fix that directory's permissions"]
    assert not list(ro.iterdir())


@pytest.mark.slow
@needs_mount
def test_a_full_disk_mid_search_is_exit_3_resumable_and_leaves_no_temporaries(work, prefect_server):
    done = subprocess.run(["unshare", "-m", sys.executable, str(SCRIPTS / "full_disk.py"), str(work),
                           str(work / "disk"), "train.py", "--param-file", "hparam.yaml", *ARGS],
                          cwd=work, env=dict(prefect_server, PYTHONPATH=str(ROOT)), capture_output=True,
                          text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    seen = json.loads(done.stdout.strip().splitlines()[-1])
    first, second = seen["first"], seen["second"]
    assert first["code"] == 3, first["log"]
    assert "autofinetune: could not run: no space left on the device writing " in first["log"]
    assert "re-run the same command with --output-dir" in first["log"]
    assert "Traceback" not in first["log"]
    assert first["state"]["next_round"] >= 1  # round 0's results survived the full disk
    assert first["temp_files"] == [] and first["pid_files"] == []
    assert second["code"] == 0, second["log"]
    assert second["resumed"] and second["state"]["next_round"] == 3


@pytest.mark.slow
def test_a_cancel_in_the_prefect_ui_stops_a_cli_search_like_ctrl_c_and_resumes(work, prefect_server, reference):
    """The UI's Cancel sets the flow run Cancelling; no worker runs a command-line search to
    SIGTERM it, so the round notices and stops: trials terminated, exit 130, state Cancelled."""
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.filters import FlowRunFilter, FlowRunFilterName, FlowRunFilterState
    from prefect.client.schemas.filters import FlowRunFilterStateType
    from prefect.settings import PREFECT_API_URL, temporary_settings
    from prefect.states import Cancelling

    events = work / "events.txt"
    proc = start_cli(work, prefect_server, "uicancel", "sleep", "60", "events", str(events))
    wait_until(lambda: len(starts(events)) == 2, what="two trials running")

    async def cancel():
        async with get_client() as client:
            (run,) = await client.read_flow_runs(flow_run_filter=FlowRunFilter(
                name=FlowRunFilterName(any_=["uicancel"]),
                state=FlowRunFilterState(type=FlowRunFilterStateType(any_=["RUNNING"]))))
            await client.set_flow_run_state(run.id, Cancelling())  # what the UI's Cancel does
            return run.id

    async def state_of(run_id):
        async with get_client() as client:
            return (await client.read_flow_run(run_id)).state

    with temporary_settings({PREFECT_API_URL: prefect_server["PREFECT_API_URL"]}):
        run_id = asyncio.run(cancel())
        sent = time.monotonic()
        code, log = finish(proc, timeout=60)
        assert code == 130, log[-3000:]
        assert time.monotonic() - sent < 20
        assert "cancelled in Prefect: stopping running trials" in log and "Traceback" not in log
        assert asyncio.run(state_of(run_id)).type.value == "CANCELLED"
    assert len(starts(events)) == 2  # nothing launched after the cancel
    assert_no_trial_left(work, events)
    assert not (work / "uicancel" / ".stop").exists()
    code, log = run_cli(work, prefect_server, "uicancel")
    assert code == 0, log[-3000:]
    assert outcome_of(work / "uicancel") == reference


@pytest.mark.slow
def test_a_dead_api_is_detected_within_its_bound_and_the_search_resumes(work, tmp_path, prefect_server, reference):
    """The embedded API dies mid-search (SIGKILL): the watchdog gives up after
    AUTOFINETUNE_API_DEAD_AFTER_S without an answer, instead of the Prefect client's ~5 min of
    retries: trials stopped, exit 3, one cause line and the resume hint, no temporaries."""
    env = dict(os.environ, PREFECT_HOME=str(tmp_path / "home"), PREFECT_SERVER_ANALYTICS_ENABLED="false",
               AUTOFINETUNE_API_DEAD_AFTER_S="5")
    env.pop("PREFECT_API_URL", None)
    events = work / "events.txt"
    proc = start_cli(work, env, "dead", "sleep", "60", "events", str(events))
    wait_until(lambda: len(starts(events)) == 2, what="two trials running")
    server = int((work / "dead" / ".prefect-server").read_text().split()[0])
    os.kill(server, 9)
    killed = time.monotonic()
    code, log = finish(proc, timeout=120)
    assert code == 3, log[-3000:]
    # 5 s without an answer, probes every 2 s, then the trials' groups are terminated.
    assert time.monotonic() - killed < 25
    assert "autofinetune: could not run: the Prefect API at http://127.0.0.1:" in log
    assert "stopped answering (no answer for " in log
    assert f"re-run the same command with --output-dir {work / 'dead'} to resume" in log
    assert "Traceback" not in log
    assert_no_trial_left(work, events)
    run = work / "dead"
    assert not list(run.rglob("*.tmp-*")) and not list(run.glob("round*/.pid-*"))
    assert not (run / ".stop").exists()
    assert json.loads((run / "state.json").read_text())["next_round"] == 0
    code, log = run_cli(work, prefect_server, "dead")
    assert code == 0, log[-3000:]
    assert outcome_of(run) == reference
