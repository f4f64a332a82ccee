"""Trials on a Dask cluster: real ``dask scheduler`` / ``dask worker`` processes on 127.0.0.1,
each worker with its own ``CUDA_VISIBLE_DEVICES`` (no GPU needed: the toy train.py says what
it saw), and the CLI as a subprocess pointed at the session's Prefect server."""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from prefect.settings import PREFECT_API_URL, temporary_settings

from conftest import ROOT, SCRIPTS, descendants, free_port, pid_alive, stop_group

pytestmark = pytest.mark.slow

DASK = str(Path(sys.executable).parent / "dask")
HPARAM = ("param_list:\n"
          "  - name: x\n    init_value: 0.0\n    type: float\n    greater_than: -1.0\n    lower_than: 1.0\n"
          "  - name: n\n    init_value: 1\n    type: int\n    greater_than: 0\n    lower_than: 8\n")


class Cluster:
    """A scheduler and its workers, each in its own session (killable as a group)."""

    def __init__(self, tmp: Path, env: dict) -> None:
        self.tmp, self.env = tmp, dict(env, PYTHONPATH=str(ROOT))
        self.port = free_port()
        self.address = f"tcp://127.0.0.1:{self.port}"
        self.logs = []
        self.scheduler = self._start("scheduler", [DASK, "scheduler", "--host", "127.0.0.1", "--port",
                                                   str(self.port), "--dashboard-address", "127.0.0.1:0"])
        self.workers: dict[str, subprocess.Popen] = {}  # CUDA_VISIBLE_DEVICES -> process

    def _start(self, name, argv, env=None, prefix=()):
        log = open(self.tmp / f"{name}.log", "wb")
        self.logs.append(log)
        return subprocess.Popen([*prefix, *argv], env=env or self.env, stdout=log, stderr=subprocess.STDOUT,
                                start_new_session=True)

    def add_worker(self, cuda: str, prefix=()) -> subprocess.Popen:
        env = dict(self.env, CUDA_VISIBLE_DEVICES=cuda)
        proc = self._start(f"worker-{cuda}", [DASK, "worker", self.address, "--nthreads", "1", "--no-nanny",
                                               "--resources", "GPU=1", "--host", "127.0.0.1",
                                               "--dashboard-address", "127.0.0.1:0", "--name", f"gpu{cuda}"],
                           env=env, prefix=prefix)
        self.workers[cuda] = proc
        return proc

    def wait_for(self, n: int) -> dict:
        """The workers' addresses by name (``gpu<cuda>``), once n are connected."""
        from distributed import Client

        with Client(self.address, timeout=60) as client:
            client.wait_for_workers(n, timeout=120)
            return {info["name"]: addr for addr, info in client.scheduler_info(n_workers=-1)["workers"].items()}

    def close(self) -> None:
        for proc in [*self.workers.values(), self.scheduler]:
            if proc.poll() is None:
                stop_group(proc)
        for log in self.logs:
            log.close()


@pytest.fixture(scope="module")
def cluster(tmp_path_factory, prefect_server):
    c = Cluster(tmp_path_factory.mktemp("dask"), prefect_server)
    c.add_worker("0")
    c.add_worker("1")
    c.wait_for(2)
    yield c
    c.close()


@pytest.fixture
def work(tmp_path):
    (tmp_path / "train.py").write_text((SCRIPTS / "toy_train.py").read_text())
    (tmp_path / "hparam.yaml").write_text(HPARAM)
    return tmp_path


def cli(work, env, *args, wait=True):
    log = open(work / f"cli-{time.monotonic_ns()}.log", "w+")
    proc = subprocess.Popen([sys.executable, "-m", "flows.autofinetune", "train.py", "--param-file",
                             "hparam.yaml", "--seed", "4", *args], cwd=work, env=dict(env, PYTHONPATH=str(ROOT)),
                            stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
    proc.log = log
    return finish(proc) if wait else proc


def finish(proc, timeout=240):
    proc.wait(timeout=timeout)
    proc.log.seek(0)
    return proc.returncode, proc.log.read()


def records(out: Path) -> list[dict]:
    return [json.loads(p.read_text()) for p in sorted(out.glob("round*/trial-*.json"))]


def comparable(out: Path) -> list[tuple]:
    return sorted((r["round"], r["candidate"], json.dumps(r["params"]), r["score"], r["outcome"], r["parent"])
                  for r in records(out))


def task_logs(env, prefix: str) -> list[str]:
    """The messages the Prefect server holds for task runs named ``prefix...`` (sent by the workers)."""
    import asyncio

    from prefect.client.orchestration import get_client
    from prefect.client.schemas.filters import LogFilter, LogFilterTaskRunId, TaskRunFilter, TaskRunFilterName
    from prefect.settings import PREFECT_API_URL, temporary_settings

    async def call():
        async with get_client() as client:
            runs = await client.read_task_runs(task_run_filter=TaskRunFilter(
                name=TaskRunFilterName(like_=prefix)), limit=200)
            logs = await client.read_logs(log_filter=LogFilter(task_run_id=LogFilterTaskRunId(
                any_=[r.id for r in runs])), limit=200)
            return [log.message for log in logs]

    with temporary_settings({PREFECT_API_URL: env["PREFECT_API_URL"]}):
        return asyncio.run(call())


def trial_processes(work: Path) -> list[str]:
    ps = subprocess.run(["ps", "-ww", "-eo", "pid,args"], capture_output=True, text=True).stdout
    return [line for line in ps.splitlines() if str(work / "train.py") in line]


@pytest.mark.parametrize("evaluator", ["fulltrail", "populationbased"])
def test_a_search_over_two_gpu_workers_equals_the_same_search_on_local_slots(cluster, work, prefect_server,
                                                                              evaluator):
    names = cluster.wait_for(2)
    common = ["--popsize", "4", "--round", "2", "--evaluator", evaluator, "sleep", "0.5"]
    code, log = cli(work, prefect_server, "--dask-address", cluster.address, "--output-dir", "on_dask", *common)
    assert code == 0, log[-4000:]
    assert f"[autofinetune] Dask: 2 workers at {cluster.address}, each trial needs {{'GPU': 1.0}}" in log
    by_address = {addr: name.removeprefix("gpu") for name, addr in names.items()}
    used = set()
    for r in records(work / "on_dask"):
        cuda = by_address[r["worker"]]  # the worker that ran it ...
        assert r["gpu"] == cuda  # ... lent it its own CUDA_VISIBLE_DEVICES
        seen = (work / "on_dask" / f"round{r['round']}" / f"log-{r['candidate']}.info").read_text()
        assert f"cuda='{cuda}'" in seen and r["host"] == os.uname().nodename
        used.add(cuda)
    assert used == {"0", "1"}  # trials spread over both workers
    assert any(f"running on gpu 0 of worker {names['gpu0']}" in m for m in task_logs(prefect_server, "train-r0-c"))
    code, log = cli(work, prefect_server, "--cpu-slots", "2", "--output-dir", "local", *common)
    assert code == 0, log[-4000:]
    assert comparable(work / "on_dask") == comparable(work / "local")
    best = json.loads((work / "on_dask" / "state.json").read_text())["best"]
    assert best == json.loads((work / "local" / "state.json").read_text())["best"]


def test_sigterm_stops_the_trials_on_the_workers_and_the_search_resumes(cluster, work, prefect_server):
    cluster.wait_for(2)
    args = ["--dask-address", cluster.address, "--output-dir", "run", "--popsize", "3", "--round", "1",
            "--evaluator", "fulltrail"]
    proc = cli(work, prefect_server, *args, "sleep", "60", wait=False)
    deadline = time.monotonic() + 120
    while len(list((work / "run").glob("round0/.pid-*"))) < 2 and time.monotonic() < deadline:
        time.sleep(0.1)
    assert len(trial_processes(work)) == 2  # one per worker; the third is queued
    os.kill(proc.pid, signal.SIGTERM)  # the CLI alone, as systemd or Slurm would
    code, log = finish(proc, timeout=60)
    assert code == 130, log[-4000:]
    assert "Re-run the same command" in log
    deadline = time.monotonic() + 15
    while trial_processes(work) and time.monotonic() < deadline:
        time.sleep(0.1)
    assert trial_processes(work) == []  # no trial left on any worker
    assert {r["outcome"] for r in records(work / "run")} == {"interrupted"}  # re-run on resume
    code, log = cli(work, prefect_server, *args)
    assert code == 0, log[-4000:]
    assert [r["outcome"] for r in records(work / "run")] == ["ok"] * 3


def test_a_lost_worker_reruns_its_trial_elsewhere_and_a_lost_scheduler_stops_the_search(work, prefect_server, tmp_path):
    own = Cluster(tmp_path, prefect_server)
    try:
        own.add_worker("0")
        own.add_worker("1")
        names = own.wait_for(2)
        proc = cli(work, prefect_server, "--dask-address", own.address, "--output-dir", "run", "--popsize", "2",
                   "--round", "1", "--evaluator", "fulltrail", "sleep", "4", wait=False)
        pid_file = work / "run" / "round0" / ".pid-1"
        deadline = time.monotonic() + 120
        while not pid_file.exists() and time.monotonic() < deadline:
            time.sleep(0.05)
        victim = json.loads(pid_file.read_text())
        cuda = next(name for name, addr in names.items() if addr == victim["worker"]).removeprefix("gpu")
        os.killpg(own.workers[cuda].pid, signal.SIGKILL)  # the node is gone; its trial is orphaned
        code, log = finish(proc)
        assert code == 0, log[-4000:]
        rerun = json.loads((work / "run" / "round0" / "trial-1.json").read_text())
        assert rerun["outcome"] == "ok" and rerun["retried_after"] == ["worker_lost"] and rerun["attempts"] == 2
        assert rerun["worker"] != victim["worker"]
        assert not pid_alive(victim["pid"])  # the orphan was reaped, not left writing into model-1
        assert any("was lost; running it again (attempt 2)" in m for m in task_logs(prefect_server, "train-r0-c1"))
        assert f"[autofinetune] r0c1: Dask worker(s) {victim['worker']} died while running it; it ran again on " \
               f"{rerun['worker']}" in log

        # Then the scheduler itself goes away mid-round: exit 130 with the resume hint, and
        # the search resumes elsewhere (here on local slots).
        args = ["--output-dir", "run2", "--popsize", "2", "--round", "1", "--evaluator", "fulltrail"]
        proc = cli(work, prefect_server, "--dask-address", own.address, *args, "sleep", "30", wait=False)
        deadline = time.monotonic() + 120
        while not list((work / "run2").glob("round0/.pid-*")) and time.monotonic() < deadline:
            time.sleep(0.1)
        gone = time.monotonic()
        os.killpg(own.scheduler.pid, signal.SIGKILL)
        code, log = finish(proc, timeout=120)
        assert code == 130, log[-4000:]
        assert time.monotonic() - gone < 60
        assert "the Dask scheduler went away" in log and "Re-run the same command" in log
    finally:
        own.close()
    deadline = time.monotonic() + 15
    while trial_processes(work) and time.monotonic() < deadline:
        time.sleep(0.1)
    assert trial_processes(work) == []
    code, log = cli(work, prefect_server, "--cpu-slots", "2", *args)
    assert code == 0, log[-4000:]
    assert [r["outcome"] for r in records(work / "run2")] == ["ok", "ok"]


def test_a_worker_that_does_not_share_the_run_dir_is_refused_before_any_trial(work, prefect_server, tmp_path):
    probe = ["unshare", "-m", "--propagation", "private", "sh", "-c", f'mount -t tmpfs none "{tmp_path}"']
    if os.geteuid() != 0 or shutil.which("unshare") is None or subprocess.run(probe).returncode != 0:
        pytest.skip("needs root and a working unshare(1) to give a worker a private view of the run dir's parent")
    own = Cluster(tmp_path, prefect_server)
    try:
        own.add_worker("0")
        # This worker sees an empty tmpfs where the run dir's parent is: another filesystem.
        private = ["unshare", "-m", "--propagation", "private", "sh", "-c",
                   f'mount -t tmpfs none "{work}" && exec "$0" "$@"']
        own.add_worker("1", prefix=private)
        names = own.wait_for(2)
        code, log = cli(work, prefect_server, "--dask-address", own.address, "--output-dir", "run", "--popsize",
                        "2", "--round", "1")
        assert code == 2, log[-4000:]
        errors = [line for line in log.splitlines() if line.startswith("autofinetune: error:")]
        assert errors == [f"autofinetune: error: Dask worker {names['gpu1']} on {os.uname().nodename}: the run dir "
                          f"{work / 'run'} does not exist there; the run dir and the script must be on a "
                          "filesystem every worker shares at the same path (NFS, Lustre, a shared volume)"]
        assert not (work / "run").exists()  # nothing ran, nothing left
    finally:
        own.close()


def test_a_local_cluster_listens_on_loopback_only(work, prefect_server):
    proc = cli(work, prefect_server, "--dask-local", "2", "--output-dir", "run", "--popsize", "2", "--round", "1",
               "--evaluator", "fulltrail", "sleep", "3", wait=False)
    deadline = time.monotonic() + 120
    while not list((work / "run").glob("round0/.pid-*")) and time.monotonic() < deadline:
        time.sleep(0.1)
    import psutil

    ours = {proc.pid, *descendants(proc.pid)}
    # What `ss -ltnp` shows, read through psutil (iproute2 may be missing on a bare machine).
    mine = [f"{c.laddr.ip}:{c.laddr.port}" for c in psutil.net_connections(kind="inet")
            if c.status == psutil.CONN_LISTEN and c.pid in ours]
    code, log = finish(proc)
    assert code == 0, log[-4000:]
    assert len(mine) >= 5  # scheduler, its dashboard, and per worker a nanny, a worker, a dashboard
    assert all(address.startswith("127.0.0.1:") for address in mine), mine
    assert "dashboard http://127.0.0.1:" in log
    assert all(r["worker"].startswith("tcp://127.0.0.1:") for r in records(work / "run"))



@pytest.mark.parametrize("rule", ["median", "asha"])
def test_early_stopping_decides_on_the_workers_as_on_local_slots(cluster, tmp_path, prefect_server, rule):
    from runtime.early_stopping import EarlyStopConfig, Reference
    from test_early_stopping import HPARAM as CURVE_HPARAM, expected_stop, prefect_task_states

    cluster.wait_for(2)
    (tmp_path / "train.py").write_text((SCRIPTS / "curve_train.py").read_text())
    (tmp_path / "hparam.yaml").write_text(CURVE_HPARAM)
    search = ["--popsize", "6", "--round", "2", "--evaluator", "fulltrail", "--tuning-strategy", "pshe2"]
    code, log = cli(tmp_path, prefect_server, *search, "--dask-address", cluster.address, "--output-dir",
                    f"dask-{rule}", "--early-stop", rule, "wait", "0.05")
    assert code == 0, log[-4000:]
    rows = records(tmp_path / f"dask-{rule}")
    assert {r["worker"] for r in rows} == set(cluster.wait_for(2).values())
    reference = Reference.from_records([r for r in rows if r["round"] == 0])
    round1 = [r for r in rows if r["round"] == 1]
    for r in round1:
        expected = expected_stop(EarlyStopConfig(rule=rule), r["params"]["x"], reference)
        assert (r["pruned"]["step"] if r["outcome"] == "pruned" else None) == expected, r
    assert any(r["outcome"] == "pruned" for r in round1)
    with temporary_settings({PREFECT_API_URL: prefect_server["PREFECT_API_URL"]}):
        states = prefect_task_states(f"dask-{rule}", "round-1")
    assert sorted(states) == sorted("Pruned" if r["outcome"] == "pruned" else "Completed" for r in round1)
