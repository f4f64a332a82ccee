import os
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import pytest

from fake_nvml import FakeNvml, install_nvml

ROOT = Path(__file__).resolve().parent.parent
SCRIPTS = Path(__file__).resolve().parent / "scripts"


@pytest.fixture(autouse=True)
def no_host_gpus(monkeypatch):
    """Every test runs as on a machine without GPUs, whatever the host has: NVML looks absent
    in this process (a test installs a ``FakeNvml`` to have GPUs), and
    ``CUDA_VISIBLE_DEVICES=""`` gives this process and every subprocess it starts (CLI runs,
    Prefect workers, trials) no GPU. A test about GPU selection sets or deletes it itself."""
    install_nvml(monkeypatch, FakeNvml.absent())
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="session")
def prefect_server(tmp_path_factory):
    """A real ``prefect server start`` (SQLite in a temp PREFECT_HOME) on a free 127.0.0.1 port,
    shared by the whole session; yields the environment that points a process at it."""
    home = tmp_path_factory.mktemp("prefect-home")
    port = free_port()
    env = dict(os.environ, PREFECT_HOME=str(home), PREFECT_SERVER_ANALYTICS_ENABLED="false",
               PREFECT_SERVER_API_HOST="127.0.0.1", PREFECT_SERVER_API_PORT=str(port))
    env.pop("PREFECT_API_URL", None)
    log = open(home / "server.log", "wb")
    proc = subprocess.Popen([str(Path(sys.executable).parent / "prefect"), "server", "start",
                             "--no-ui", "--log-level", "WARNING"],
                            env=env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
    url = f"http://127.0.0.1:{port}/api"
    deadline = time.monotonic() + 180
    while True:
        try:
            with urllib.request.urlopen(f"{url}/health", timeout=2) as r:
                if r.status == 200:
                    break
        except OSError:
            pass
        if proc.poll() is not None or time.monotonic() > deadline:
            proc.kill()
            raise RuntimeError(f"prefect server did not start: {(home / 'server.log').read_text()[-2000:]}")
        time.sleep(0.5)
    client_env = dict(os.environ, PREFECT_HOME=str(home), PREFECT_API_URL=url,
                      PREFECT_SERVER_ANALYTICS_ENABLED="false", CUDA_VISIBLE_DEVICES="")  # see no_host_gpus
    yield client_env
    stop_group(proc, timeout=20)
    log.close()


def stop_group(proc: subprocess.Popen, timeout: float = 10) -> None:
    """SIGTERM a server started with start_new_session=True, SIGKILL its group if it lingers."""
    os.killpg(proc.pid, signal.SIGTERM)
    try:
        proc.wait(timeout=timeout)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()


@pytest.fixture
def prefect_api(prefect_server):
    """In-process flow runs talk to the session's real Prefect server."""
    import flows  # noqa: F401  (the project's Prefect defaults)
    from prefect.settings import PREFECT_API_URL, temporary_settings

    from prefect.logging.handlers import APILogWorker

    with temporary_settings({PREFECT_API_URL: prefect_server["PREFECT_API_URL"]}):
        yield prefect_server
        APILogWorker.drain_all(timeout=10)  # this test's logs reach its server, not a dead one


@pytest.fixture
def lock_dir(tmp_path, monkeypatch):
    """GPU lock files of this test only, so parallel test runs never contend."""
    path = tmp_path / "gpu-locks"
    monkeypatch.setenv("AUTOFINETUNE_LOCK_DIR", str(path))
    return path


@pytest.fixture
def toy(tmp_path):
    """A work dir holding the toy train.py and a 2-parameter hparam.yaml."""
    (tmp_path / "train.py").write_text((SCRIPTS / "toy_train.py").read_text())
    (tmp_path / "hparam.yaml").write_text(
        "param_list:\n"
        "  - name: x\n    init_value: 0.0\n    type: float\n    greater_than: -1.0\n    lower_than: 1.0\n"
        "  - name: n\n    init_value: 1\n    type: int\n    greater_than: 0\n    lower_than: 8\n")
    return tmp_path


def descendants(pid: int) -> list[int]:
    """Every process below ``pid`` in the process tree (children, grandchildren, ...)."""
    ps = subprocess.run(["ps", "-eo", "pid=,ppid="], capture_output=True, text=True).stdout
    children: dict[int, list[int]] = {}
    for line in ps.splitlines():
        child, parent = map(int, line.split())
        children.setdefault(parent, []).append(child)
    found, todo = [], [pid]
    while todo:
        for child in children.get(todo.pop(), []):
            found.append(child)
            todo.append(child)
    return found


def pid_alive(pid: int) -> bool:
    """True while ``pid`` is a live process (a zombie awaiting its reaper counts as gone)."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()[0] != "Z"
    except FileNotFoundError:
        return False


PYTHON = sys.executable
