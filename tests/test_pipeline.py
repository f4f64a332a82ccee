"""End-to-end runs of the FullTrail pipeline: real trial subprocesses, a real Prefect API."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from collections import defaultdict

import pytest

from conftest import ROOT, pid_alive
from flows.cli import main

pytestmark = pytest.mark.usefixtures("prefect_api", "lock_dir")


def run_cli(toy, monkeypatch, *args: str) -> int:
    monkeypatch.chdir(toy)
    return main(["train.py", "--param-file", "hparam.yaml", "--evaluator", "fulltrail", *args])


def trials(out, rounds, popsize):
    return [[json.loads((out / f"round{k}" / f"trial-{i}.json").read_text()) for i in range(popsize)]
            for k in range(rounds)]


def max_overlap(intervals):
    """The most intervals open at one instant."""
    points = sorted([(s, 1) for s, _ in intervals] + [(e, -1) for _, e in intervals],
                    key=lambda p: (p[0], p[1]))
    best = now = 0
    for _, step in points:
        now += step
        best = max(best, now)
    return best


def read_events(path):
    starts, spans = {}, defaultdict(list)
    for line in path.read_text().splitlines():
        kind, t, pid, k, i, cuda = line.split()
        if kind == "start":
            starts[(k, i)] = (float(t), cuda)
        else:
            s, cuda = starts[(k, i)]
            spans[cuda].append((s, float(t)))
    return spans


def test_full_run_writes_the_original_layout(toy, monkeypatch, capsys):
    code = run_cli(toy, monkeypatch, "--popsize", "3", "--round", "2", "--cpu-slots", "2",
                   "--seed", "7", "--output-dir", "out", "--tuning-strategy", "hazero")
    assert code == 0
    out = toy / "out"
    records = trials(out, 2, 3)
    for k, row in enumerate(records):
        for i, r in enumerate(row):
            assert r["outcome"] == "ok" and (r["round"], r["candidate"]) == (k, i)
            assert (out / f"round{k}" / f"log-{i}.info").read_text().startswith(f"toy: round {k} candidate {i}")
            assert json.loads((out / f"round{k}" / f"model-{i}" / "weights.json").read_text())["x"] == r["params"]["x"]
            assert r["argv"][2:4] == [f"--x={r['params']['x']!r}", f"--n={r['params']['n']}"]
            assert r["saved_params_dir"] == str(out / f"round{k}" / f"model-{i}")
            assert not (out / f"round{k}" / f".result-{i}").exists()
    # Round 0's first candidate is the user's starting point, x=0.0, n=1.
    assert records[0][0]["params"] == {"x": 0.0, "n": 1}
    flat = [r for row in records for r in row]
    best = max(flat, key=lambda r: r["score"])
    assert json.loads((out / "best_model" / "weights.json").read_text())["x"] == best["params"]["x"]
    state = json.loads((out / "state.json").read_text())
    assert state["next_round"] == 2 and state["best"]["score"] == best["score"]
    assert state["search"]["seed"] == 7 and state["search"]["strategy"] == "hazero"

    log = (out / "log_file.txt").read_text().splitlines()
    assert log[0] == "The final best hyperparameters:"
    assert log[1] == f"x\t:\t{best['params']['x']}" and log[2] == f"n\t:\t{best['params']['n']}"
    assert log[3] == f"The final best eval score is {best['score']}."
    assert log[4] == f"The final best model parameters are saved as {out / 'best_model'} ."
    assert log[5].split("\t") == ["x", "n", "score", "saved_params_dir", "round", "candidate",
                                  "outcome", "parent"]
    assert len(log) == 6 + 6
    assert log[6].split("\t")[2:5] == [str(records[0][0]["score"]), str(out / "round0" / "model-0"), "0"]

    console = capsys.readouterr().out
    for k in range(2):
        local = max(r["score"] for r in records[k])
        assert f"The local best eval value in the {k}-th round is {local}." in console
    assert f"The final best eval score is {best['score']}." in console


def test_failed_trials_are_recorded_and_the_search_goes_on(toy, monkeypatch, capsys):
    plan = {"r0c1": "crash", "r0c2": "noreport", "r0c3": "nan", "r0c4": "hang", "r0c5": "garbage",
            "r1c0": "sigkill"}
    code = run_cli(toy, monkeypatch, "--popsize", "6", "--round", "2", "--cpu-slots", "2",
                   "--trial-timeout", "3", "--output-dir", "out", "plan", json.dumps(plan))
    assert code == 0
    out = toy / "out"
    records = trials(out, 2, 6)
    outcomes = [r["outcome"] for r in records[0]]
    assert outcomes == ["ok", "crashed", "no_result", "invalid_score", "timeout", "invalid_score"]
    assert records[0][1]["exit_code"] == 3 and records[0][1]["score"] is None
    assert records[1][0]["outcome"] == "killed" and "SIGKILL" in records[1][0]["error"]
    assert all(r["outcome"] == "ok" for r in records[1][1:])
    # The timed-out trial's whole process group is gone, grandchild included.
    pids = [int(p) for p in (out / "round0" / "model-4" / "pids").read_text().split()]
    assert not any(pid_alive(p) for p in pids)
    # A failure never becomes the best, even though real scores here are negative.
    state = json.loads((out / "state.json").read_text())
    assert state["best"]["score"] == max(r["score"] for row in records for r in row if r["outcome"] == "ok")
    console = capsys.readouterr().out
    assert console.count("WARNING: Program which was ran with hyperparameters as") == 6
    assert str(out / "round0" / "log-1.info") in console
    log = (out / "log_file.txt").read_text()
    assert "\tcrashed\t" in log and "\ttimeout\t" in log


def test_trials_never_exceed_cpu_slots(toy, monkeypatch):
    events = toy / "events.txt"
    code = run_cli(toy, monkeypatch, "--popsize", "6", "--round", "1", "--cpu-slots", "2",
                   "--output-dir", "out", "sleep", "0.6", "events", str(events))
    assert code == 0
    spans = read_events(events)
    assert list(spans) == ["-"]  # CPU slots: CUDA_VISIBLE_DEVICES is set, and empty
    assert max_overlap(spans["-"]) == 2


def test_gpu_slots_each_trial_sees_its_gpu(toy, monkeypatch):
    events = toy / "events.txt"
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "0,1")  # the GPUs this job may use (no NVML here)
    code = run_cli(toy, monkeypatch, "--popsize", "8", "--round", "1", "--gpu", "0,1",
                   "--trials-per-gpu", "2", "--output-dir", "out", "sleep", "0.6", "events", str(events))
    assert code == 0
    spans = read_events(events)
    assert set(spans) == {"0", "1"}
    assert all(max_overlap(s) <= 2 for s in spans.values())
    assert max_overlap([iv for s in spans.values() for iv in s]) > 2  # both GPUs busy at once
    for r in trials(toy / "out", 1, 8)[0]:
        log = (toy / "out" / "round0" / f"log-{r['candidate']}.info").read_text()
        assert f"cuda='{r['gpu']}' order=PCI_BUS_ID" in log  # CUDA counts GPUs as NVML does


def test_extras_are_forwarded_and_prefect_names_are_readable(toy, monkeypatch):
    code = run_cli(toy, monkeypatch, "--popsize", "2", "--round", "2", "--output-dir", "named-run",
                   "echo", "hello", "epochs", "3")
    assert code == 0
    r = trials(toy / "named-run", 1, 2)[0][1]
    assert r["argv"][-2:] == ["--echo=hello", "--epochs=3"]
    assert "echo=hello epochs=3" in (toy / "named-run" / "round0" / "log-1.info").read_text()

    import asyncio

    from prefect.client.orchestration import get_client
    from prefect.client.schemas.filters import FlowRunFilter, FlowRunFilterName

    async def names():
        async with get_client() as client:
            top = await client.read_flow_runs(
                flow_run_filter=FlowRunFilter(name=FlowRunFilterName(any_=["named-run"])))
            assert len(top) == 1 and top[0].state.is_completed()
            subs = [fr for fr in await client.read_flow_runs()
                    if fr.parent_task_run_id and fr.name.startswith("round-")]
            tasks = await client.read_task_runs()
            return top[0], subs, tasks

    top, subs, tasks = asyncio.run(names())
    ours = {t.name for t in tasks if t.flow_run_id in {s.id for s in subs}}
    assert {"train-r0-c0", "train-r0-c1", "train-r1-c0", "train-r1-c1"} <= ours
    assert {"round-0", "round-1"} <= {s.name for s in subs}


def test_no_score_at_all_exits_1(toy, monkeypatch):
    plan = {"r0c0": "crash", "r0c1": "crash"}
    code = run_cli(toy, monkeypatch, "--popsize", "2", "--round", "1", "--output-dir", "out",
                   "plan", json.dumps(plan))
    assert code == 1
    assert "No trial has produced a score yet." in (toy / "out" / "log_file.txt").read_text()
    assert not (toy / "out" / "best_model").exists()


@pytest.mark.parametrize("args, expected", [
    (["--popsize", "0"], "--popsize must be an integer >= 1, got 0"),
    (["--round", "0"], "--round must be an integer >= 1"),
    (["epochs"], "extra arguments must come in KEY VALUE pairs"),
    (["--tuning-strategy", "bayes"], "--tuning-strategy 'bayes' is not one of hazero, pshe2"),
    (["--trial-timeout", "0"], "--trial-timeout must be a positive number"),
    (["--gpu", "0,0"], "a GPU is listed twice"),
    (["--gpu", "a"], "expected comma-separated GPU ids"),
    (["--python", "/nonexistent/python"], "--python '/nonexistent/python'"),
    (["--popsize", "x"], "invalid int value: 'x'"),
])
def test_bad_cli_input_is_one_line_exit_2_nothing_created(toy, monkeypatch, capsys, args, expected):
    monkeypatch.chdir(toy)
    before = sorted(p.name for p in toy.iterdir())
    try:
        code = main(["train.py", "--param-file", "hparam.yaml", "--evaluator", "fulltrail", *args])
    except SystemExit as exc:  # argparse's own type errors
        code = exc.code
    err = capsys.readouterr().err
    assert code == 2
    assert expected in err and err.count("\n") == 1 and err.startswith("autofinetune: error: ")
    assert sorted(p.name for p in toy.iterdir()) == before


def test_bad_files_are_clear_errors(toy, monkeypatch, capsys):
    monkeypatch.chdir(toy)
    (toy / "bad.yaml").write_text("param_list:\n  - name: x\n    type: float\n    init_value: 5\n"
                                  "    greater_than: 0\n    lower_than: 1\n")
    assert main(["train.py", "--param-file", "bad.yaml", "--evaluator", "fulltrail"]) == 2
    assert "bad.yaml" in capsys.readouterr().err
    assert main(["missing.py", "--param-file", "hparam.yaml", "--evaluator", "fulltrail"]) == 2
    assert "missing.py: no such file" in capsys.readouterr().err
    (toy / "notarun").mkdir()
    (toy / "notarun" / "precious.txt").write_text("keep me")
    assert main(["train.py", "--output-dir", "notarun", "--evaluator", "fulltrail"]) == 2
    assert "not an autofinetune run directory" in capsys.readouterr().err
    assert [p.name for p in (toy / "notarun").iterdir()] == ["precious.txt"]


@pytest.mark.slow
def test_cli_subprocess_with_the_embedded_prefect_api(toy, tmp_path):
    """The command a user types, in a fresh process with its own ephemeral Prefect API."""
    env = dict(os.environ, PREFECT_HOME=str(tmp_path / "prefect-home"))
    env.pop("PREFECT_API_URL", None)
    proc = subprocess.run(
        [sys.executable, "-m", "flows.autofinetune", "train.py", "--param_file", "hparam.yaml",
         "--popsize", "2", "--round", "2", "--evaluator", "FullTrail", "--tuning_strategy", "PSHE2",
         "--output_dir", "out", "--cpu-slots", "2"],
        cwd=toy, env=dict(env, PYTHONPATH=str(ROOT)), capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "The final best eval score is" in proc.stdout
    assert (toy / "out" / "best_model" / "weights.json").is_file()
    bad = subprocess.run([sys.executable, "-m", "flows.autofinetune", "train.py", "--popsize", "0"],
                         cwd=toy, env=dict(env, PYTHONPATH=str(ROOT)), capture_output=True, text=True)
    assert bad.returncode == 2 and bad.stderr.strip().count("\n") == 0
