"""Screenshots for the README: a demo search seen in VisualDL and in the Prefect UI.

Runs a small real search (the digits example) against a real ``prefect server start``
with its UI, starts ``visualdl`` on the run's logs, and saves headless-Chromium
screenshots of both under ``docs/``. Needs Debian's chromium (``apt-get install chromium``).
Everything listens on 127.0.0.1 only. Not part of the test run:

    .venv/bin/python scripts/screens.py [--out docs]
"""

from __future__ import annotations

import argparse
import asyncio
import os
import shutil
import socket
import subprocess
import sys
import tempfile
import time
import urllib.request
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
BIN = Path(sys.executable).parent


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def wait_http(url: str, timeout: float = 180) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            with urllib.request.urlopen(url, timeout=2):
                return
        except OSError:
            time.sleep(0.5)
    raise RuntimeError(f"{url} did not answer within {timeout:.0f}s")


def screenshot(chromium: str, url: str, path: Path, size: str = "1400,900") -> None:
    profile = tempfile.mkdtemp(prefix="chromium-")
    subprocess.run([chromium, "--headless", "--no-sandbox", "--disable-gpu", "--disable-quic",
                    "--no-first-run", "--disable-background-networking", "--disable-component-update",
                    "--disable-sync", f"--user-data-dir={profile}", "--hide-scrollbars",
                    f"--window-size={size}", "--virtual-time-budget=15000",
                    f"--screenshot={path}", url],
                   check=True, capture_output=True, timeout=120)
    shutil.rmtree(profile, ignore_errors=True)
    print(f"saved {path}")


async def ids(output_name: str) -> tuple[str, str, str]:
    """The ids of the top flow run, the round-1 subflow run and round 1's table artifact."""
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.filters import (ArtifactFilter, ArtifactFilterKey, FlowRunFilter,
                                                FlowRunFilterName)

    async with get_client() as client:
        runs = await client.read_flow_runs(
            flow_run_filter=FlowRunFilter(name=FlowRunFilterName(any_=[output_name])))
        subs = await client.read_flow_runs(
            flow_run_filter=FlowRunFilter(name=FlowRunFilterName(any_=["round-1"])))
        tables = await client.read_artifacts(artifact_filter=ArtifactFilter(
            key=ArtifactFilterKey(any_=[f"autofinetune-{output_name}-round-1"])))
    return str(runs[0].id), str(subs[0].id), str(tables[0].id)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--out", default=str(ROOT / "docs"))
    args = parser.parse_args()
    chromium = shutil.which("chromium") or shutil.which("chromium-browser")
    if not chromium:
        sys.exit("screens: chromium not found; install it with `apt-get install chromium`")
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    work = Path(tempfile.mkdtemp(prefix="autofinetune-screens-"))
    prefect_port, vdl_port = free_port(), free_port()
    api = f"http://127.0.0.1:{prefect_port}/api"
    env = dict(os.environ, PREFECT_HOME=str(work / "prefect-home"), PREFECT_API_URL=api,
               PREFECT_SERVER_ANALYTICS_ENABLED="false", PREFECT_SERVER_API_HOST="127.0.0.1",
               PREFECT_SERVER_API_PORT=str(prefect_port), PREFECT_UI_API_URL=api)
    procs = []
    try:
        procs.append(subprocess.Popen([str(BIN / "prefect"), "server", "start"], env=env,
                                      stdout=open(work / "server.log", "w"), stderr=subprocess.STDOUT))
        wait_http(f"{api}/health")
        run = work / "digits-search"
        subprocess.run([sys.executable, "-m", "flows.autofinetune", "examples/digits_pbt/train.py",
                        "--param-file", "examples/digits_pbt/hparam.yaml", "--popsize", "4",
                        "--round", "4", "--cpu-slots", "2", "--seed", "0", "--output-dir", str(run)],
                       cwd=ROOT, env=env, check=True)
        procs.append(subprocess.Popen([str(BIN / "visualdl"), "--logdir", str(run / "visualization"),
                                       "--host", "127.0.0.1", "--port", str(vdl_port), "--disable-telemetry"],
                                      env=env, stdout=open(work / "visualdl.log", "w"),
                                      stderr=subprocess.STDOUT))
        vdl = f"http://127.0.0.1:{vdl_port}"
        wait_http(f"{vdl}/app/api/runs")
        os.environ.update(PREFECT_API_URL=api, PREFECT_HOME=env["PREFECT_HOME"])
        top, round1, table = asyncio.run(ids(run.name))
        ui = f"http://127.0.0.1:{prefect_port}"
        screenshot(chromium, f"{vdl}/app/scalar", out / "visualdl-scalars.png")
        screenshot(chromium, f"{vdl}/app/hyper-parameter", out / "visualdl-hparams.png")
        screenshot(chromium, f"{ui}/runs/flow-run/{top}", out / "prefect-flow-run.png")
        screenshot(chromium, f"{ui}/runs/flow-run/{round1}", out / "prefect-round.png")
        screenshot(chromium, f"{ui}/artifacts/artifact/{table}", out / "prefect-artifact.png")
    finally:
        for proc in procs:
            proc.terminate()
            try:
                proc.wait(timeout=20)
            except subprocess.TimeoutExpired:
                proc.kill()
        shutil.rmtree(work, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
