"""Runs that survive crashes: SIGKILL anywhere, then resume; Ctrl-C; the run-dir lock.

Every run here is the real CLI in its own process, against the session's real Prefect
server. A killed run is resumed with the same command and must end exactly like an
uninterrupted run of the same seed.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from conftest import ROOT, pid_alive

pytestmark = pytest.mark.slow  # real CLI processes killed and resumed

POPSIZE, ROUNDS = 4, 3
ARGS = ["--popsize", str(POPSIZE), "--round", str(ROUNDS), "--cpu-slots", "2", "--seed", "11",
        "--evaluator", "populationbased", "--tuning-strategy", "pshe2"]


def start_cli(toy, env, out, *extra, kill_at=None, new_session=False):
    env = dict(env, PYTHONPATH=str(ROOT))
    env.pop("AUTOFINETUNE_KILL_AT", None)
    if kill_at:
        env["AUTOFINETUNE_KILL_AT"] = kill_at
    log = open(toy / f"cli-{out}-{time.monotonic_ns()}.log", "w+")
    proc = subprocess.Popen([sys.executable, "-m", "flows.autofinetune", "train.py", "--param-file",
                             "hparam.yaml", *ARGS, "--output-dir", out, *extra],
                            cwd=toy, env=env, stdout=log, stderr=subprocess.STDOUT,
                            start_new_session=new_session)
    proc.log = log
    return proc


def finish(proc, timeout=240):
    proc.wait(timeout=timeout)
    proc.log.seek(0)
    return proc.returncode, proc.log.read()


def run_cli(toy, env, out, *extra, kill_at=None):
    return finish(start_cli(toy, env, out, *extra, kill_at=kill_at))


def outcome_of(run: Path) -> dict:
    """What must not depend on interruptions: best, score, log_file rows, lineage."""
    log = (run / "log_file.txt").read_text().replace(str(run), "OUT").splitlines()
    state = json.loads((run / "state.json").read_text())
    trials = [json.loads(p.read_text()) for p in sorted(run.glob("round*/trial-*.json"))]
    return {"log": log, "best": state["best"], "next_round": state["next_round"],
            "best_model": json.loads((run / "best_model" / "weights.json").read_text()),
            "trials": sorted((t["round"], t["candidate"], t["score"], t["parent"], t["outcome"])
                             for t in trials)}


@pytest.fixture(scope="module")
def reference(tmp_path_factory, prefect_server):
    """One uninterrupted run of the search every kill test resumes."""
    toy = tmp_path_factory.mktemp("ref")
    from conftest import SCRIPTS
    (toy / "train.py").write_text((SCRIPTS / "toy_train.py").read_text())
    (toy / "hparam.yaml").write_text(HPARAM)
    code, log = run_cli(toy, prefect_server, "ref")
    assert code == 0, log[-3000:]
    return outcome_of(toy / "ref")


HPARAM = ("param_list:\n"
          "  - name: x\n    init_value: 0.0\n    type: float\n    greater_than: -1.0\n    lower_than: 1.0\n"
          "  - name: n\n    init_value: 1\n    type: int\n    greater_than: 0\n    lower_than: 8\n")


@pytest.fixture
def work(toy):
    (toy / "hparam.yaml").write_text(HPARAM)
    return toy


@pytest.mark.parametrize("kill_at", [
    "trial_recorded#2",    # mid-round 0: two trials recorded, two not
    "trial_recorded#4",    # between the last trial's end and the tuner update
    "round_told#2",        # after round 1 was told, before best_model/log_file/plan
    "best_model_copied#1",  # during the best_model copy (between copy and rename)
    "plan_decided#2",      # after the plan for round 2 was decided, before cleanup
])
def test_sigkill_then_resume_equals_an_uninterrupted_run(work, prefect_server, reference, kill_at):
    code, log = run_cli(work, prefect_server, "run", kill_at=kill_at)
    assert code == -signal.SIGKILL, log[-3000:]
    state = json.loads((work / "run" / "state.json").read_text())  # consistent, parseable
    assert state["next_round"] < ROUNDS or not (work / "run" / "best_model").exists()
    code, log = run_cli(work, prefect_server, "run")
    assert code == 0, log[-3000:]
    assert "Resuming the search" in log
    assert outcome_of(work / "run") == reference
    assert not list((work / "run").glob("round*/.pid-*"))


def test_external_sigkill_mid_round_reaps_orphans_and_resumes(work, prefect_server, reference):
    proc = start_cli(work, prefect_server, "run", "sleep", "3")
    running = work / "run" / "round1" / ".pid-2"  # round 1's third trial has just started
    deadline = time.monotonic() + 180
    while not running.exists() and time.monotonic() < deadline:
        time.sleep(0.02)
    assert running.exists(), "round 1's third trial never started"
    proc.kill()
    _, killed_log = finish(proc)
    orphans = [json.loads(p.read_text())["pid"] for p in (work / "run").glob("round*/.pid-*")]
    assert any(pid_alive(p) for p in orphans), (orphans, killed_log[-3000:])  # the kill left trials running
    code, log = run_cli(work, prefect_server, "run", "sleep", "3")
    assert code == 0, log[-3000:]
    assert not any(pid_alive(p) for p in orphans)
    resumed = outcome_of(work / "run")
    assert resumed["best"] == reference["best"]
    assert [t[:4] for t in resumed["trials"]] == [t[:4] for t in reference["trials"]]


def test_ctrl_c_stops_cleanly_launches_nothing_more_and_resumes(work, prefect_server, reference):
    events = work / "events.txt"
    proc = start_cli(work, prefect_server, "run", "sleep", "60", "events", str(events), new_session=True)
    deadline = time.monotonic() + 180
    while (not events.exists() or events.read_text().count("start") < 2) and time.monotonic() < deadline:
        time.sleep(0.05)
    os.killpg(proc.pid, signal.SIGINT)  # what a terminal's Ctrl-C does: the whole foreground group
    code, log = finish(proc, timeout=60)
    assert code == 130, log[-3000:]
    assert "Re-run the same command" in log
    # The stopped round and search end Cancelled, with no traceback screens before the message.
    assert "Traceback" not in log and "Finished in state Cancelled('stopped during round 0" in log
    started = [line.split() for line in events.read_text().splitlines() if line.startswith("start")]
    assert len(started) == 2  # the two queued candidates were never launched
    assert not any(pid_alive(int(s[2])) for s in started)
    ps = subprocess.run(["ps", "-eo", "pid,args"], capture_output=True, text=True).stdout
    assert str(work / "train.py") not in ps
    state = json.loads((work / "run" / "state.json").read_text())
    assert state["next_round"] == 0 and state["pending_round"] == 0
    code, log = run_cli(work, prefect_server, "run")
    assert code == 0, log[-3000:]
    assert outcome_of(work / "run") == reference


def test_sigterm_to_the_cli_alone_stops_like_ctrl_c_and_resumes(work, prefect_server, reference):
    """systemd, Kubernetes, `timeout` and Slurm send SIGTERM to the main process only; Prefect's
    flow engine installs its own SIGTERM handler, which must not win over the CLI's stop."""
    events = work / "events.txt"
    proc = start_cli(work, prefect_server, "run", "sleep", "60", "events", str(events), new_session=True)
    deadline = time.monotonic() + 180
    while (not events.exists() or events.read_text().count("start") < 2) and time.monotonic() < deadline:
        time.sleep(0.05)
    sent = time.monotonic()
    os.kill(proc.pid, signal.SIGTERM)
    code, log = finish(proc, timeout=60)
    assert code == 130, log[-3000:]
    assert time.monotonic() - sent < 20 and "SIGTERM received" in log and "Re-run the same command" in log
    started = [line.split() for line in events.read_text().splitlines() if line.startswith("start")]
    assert len(started) == 2 and not any(pid_alive(int(s[2])) for s in started)
    assert not (work / "run" / ".stop").exists()
    code, log = run_cli(work, prefect_server, "run")
    assert code == 0, log[-3000:]
    assert outcome_of(work / "run") == reference


def test_mismatched_resume_is_refused_and_round_can_be_raised(work, prefect_server, reference):
    code, log = run_cli(work, prefect_server, "run")
    assert code == 0
    before = outcome_of(work / "run")
    for extra, says in [(["--popsize", "3"], "--popsize was 4, now 3"),
                        (["--tuning-strategy", "hazero"], "--tuning-strategy was pshe2, now hazero"),
                        (["--evaluator", "fulltrail"], "--evaluator was populationbased, now fulltrail")]:
        code, log = run_cli(work, prefect_server, "run", *extra)
        assert code == 2 and says in log and log.strip().count("\n") == 0, log
    (work / "hparam.yaml").write_text(HPARAM.replace("lower_than: 8", "lower_than: 9"))
    code, log = run_cli(work, prefect_server, "run")
    assert code == 2 and "the search space (--param-file) changed: n" in log
    assert outcome_of(work / "run") == before  # nothing touched
    (work / "hparam.yaml").write_text(HPARAM)
    code, log = run_cli(work, prefect_server, "run", "--round", str(ROUNDS + 1))
    assert code == 0, log[-3000:]
    state = json.loads((work / "run" / "state.json").read_text())
    assert state["next_round"] == ROUNDS + 1
    assert (work / "run" / f"round{ROUNDS}" / "trial-3.json").exists()


def test_a_second_live_run_on_one_output_dir_is_refused(work, prefect_server):
    first = start_cli(work, prefect_server, "run", "sleep", "30", new_session=True)
    deadline = time.monotonic() + 120
    while not (work / "run" / "round0" / "log-0.info").exists() and time.monotonic() < deadline:
        time.sleep(0.05)
    code, log = run_cli(work, prefect_server, "run")
    assert code == 2 and f"another autofinetune run (pid {first.pid})" in log
    first.kill()
    finish(first)
    # The kernel dropped the dead run's lock: the directory is usable again at once.
    from runtime.rundir import RunDir
    with RunDir(work / "run").lock():
        pass


def test_embedded_api_survives_ctrl_c_and_a_killed_runs_server_is_reaped(work, tmp_path):
    """The default set-up, Prefect's embedded API: a SIGKILLed search leaves its server
    running; the next run on the dir stops it. A terminal Ctrl-C (SIGINT to the whole
    group) stops the search cleanly, because the embedded server ignores it."""
    env = dict(os.environ, PREFECT_HOME=str(tmp_path / "home"), PREFECT_SERVER_ANALYTICS_ENABLED="false")
    env.pop("PREFECT_API_URL", None)
    started = work / "run" / "round0" / ".pid-1"

    def wait_for(path):
        deadline = time.monotonic() + 180
        while not path.exists() and time.monotonic() < deadline:
            time.sleep(0.05)
        assert path.exists()

    first = start_cli(work, env, "run", "sleep", "30", new_session=True)
    wait_for(started)
    first.kill()
    finish(first)
    server_pid = int((work / "run" / ".prefect-server").read_text().split()[0])
    assert pid_alive(server_pid)  # what Prefect leaves behind after a SIGKILL

    started.unlink()
    second = start_cli(work, env, "run", "sleep", "30", new_session=True)
    wait_for(started)
    assert not pid_alive(server_pid)  # reaped by the resumed run
    own_server = int((work / "run" / ".prefect-server").read_text().split()[0])
    os.killpg(second.pid, signal.SIGINT)
    code, log = finish(second, timeout=60)
    assert code == 130, log[-3000:]
    assert "Re-run the same command" in log
    assert not pid_alive(own_server)  # stopped on the way out, not orphaned
    ps = subprocess.run(["ps", "-eo", "pid,args"], capture_output=True, text=True).stdout
    assert str(work / "train.py") not in ps
