"""VisualDL logs: the pure points of a round, idempotent writing, real searches read back
with VisualDL's own reader, and a real ``visualdl`` server's HTTP API."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
import urllib.parse
import urllib.request
from collections import Counter
from pathlib import Path

import numpy as np
import pytest

from conftest import ROOT, free_port, stop_group
from runtime import kill_points
from runtime.rundir import RunDir
from watch.visualization import (LOG_FILE_NAME, MAIN_RUN, TRIAL_CURVE, TRIAL_METRIC, VisualDLLogs,
                                 VisualDLWatcher, round_points, trial_run)


def f32(value: float) -> float:
    """VisualDL stores scalars as 32-bit floats."""
    return float(np.float32(value))


def record(k, i, x, n, score, outcome="ok", *, gpu=None, samples=None, start="00:00:00.000"):
    return {"round": k, "candidate": i, "params": {"x": x, "n": n}, "outcome": outcome,
            "score": score if outcome == "ok" else None, "gpu": gpu,
            **({"gpu_samples": samples} if samples is not None else {}),
            "started_at": f"2024-05-01T{start}+00:00", "ended_at": "2024-05-01T01:00:00.000+00:00",
            "saved_params_dir": f"/out/round{k}/model-{i}"}


def by_key(points):
    """{(run, tag): [(step, value), ...]}"""
    out = {}
    for s in points.scalars:
        out.setdefault((s.run, s.tag), []).append((s.step, s.value))
    return out


def read_scalars(vis: Path, run: str, tag: str) -> list[tuple[int, float]]:
    from visualdl import LogReader

    reader = LogReader(file_path=str(vis / run / LOG_FILE_NAME))
    return [(v.id, v.value) for v in reader.get_data("scalar", tag)]


def read_hparams(vis: Path, run: str) -> dict:
    from visualdl import LogReader

    reader = LogReader(file_path=str(vis / run / LOG_FILE_NAME))
    [hparam] = reader.get_data("hyper_parameters", "hparam")
    infos = hparam.hparam.hparamInfos
    return {h.name: getattr(h, h.WhichOneof("type")) for h in infos}


def all_steps(vis: Path) -> dict[tuple[str, str], list[int]]:
    """Every (run, tag) of every log under ``vis`` -> its steps in file order."""
    from visualdl import LogReader

    steps = {}
    for path in sorted(vis.rglob(LOG_FILE_NAME)):
        run = str(path.parent.relative_to(vis))
        reader = LogReader(file_path=str(path))
        for tag in reader.get_tags().get("scalar", []):
            steps[(run, tag)] = [v.id for v in reader.get_data("scalar", tag)]
    return steps


# -- the pure points of a round ------------------------------------------------------------

ROUNDS = [
    [record(0, 0, 0.1, 2, -0.5), record(0, 1, 0.2, 3, None, "crashed"), record(0, 2, 0.3, 4, -0.1)],
    [record(1, 0, 0.4, 5, -0.3), record(1, 1, 0.5, 6, -0.1), record(1, 2, 0.6, 7, None, "nan")],
    [record(2, 0, 0.7, 1, 0.2), record(2, 1, 0.8, 2, -2.0), record(2, 2, 0.9, 3, 0.1)],
]


def test_round_points_best_so_far_population_and_hparams():
    names = ["x", "n"]
    # Round 1 ties round 0's best (-0.1): the earlier trial stays the best, as best_model/.
    expected_best = {0: (0.3, 4, -0.1), 1: (0.3, 4, -0.1), 2: (0.7, 1, 0.2)}
    for k in range(3):
        points = by_key(round_points(k, ROUNDS, names))
        x, n, score = expected_best[k]
        assert points[(MAIN_RUN, "hyperparameter_tuning/x")] == [(k, x)]
        assert points[(MAIN_RUN, "hyperparameter_tuning/n")] == [(k, float(n))]
        assert points[(MAIN_RUN, "hyperparameter_tuning/best_eval_value")] == [(k, score)]
        for r in ROUNDS[k]:
            i = r["candidate"]
            assert points[(f"pop_{i}", "population_transformation/x")] == [(k, r["params"]["x"])]
            assert points[(f"pop_{i}", "population_transformation/n")] == [(k, float(r["params"]["n"]))]
            ok = r["outcome"] == "ok"
            # A failed trial has no score: no eval_value point at its step.
            assert points.get((f"pop_{i}", "population_transformation/eval_value")) == \
                ([(k, r["score"])] if ok else None)
            assert points.get((trial_run(k, i), TRIAL_METRIC)) == ([(k, r["score"])] if ok else None)
    hparams = round_points(1, ROUNDS, names).hparams
    assert [(h.run, h.hparams, h.metrics) for h in hparams] == [
        ("trials/r1-c0", {"x": 0.4, "n": 5, "round": 1, "outcome": "ok"}, (TRIAL_METRIC,)),
        ("trials/r1-c1", {"x": 0.5, "n": 6, "round": 1, "outcome": "ok"}, (TRIAL_METRIC,)),
        ("trials/r1-c2", {"x": 0.6, "n": 7, "round": 1, "outcome": "nan"}, (TRIAL_METRIC,)),
    ]


def test_round_points_without_a_success_choices_and_bad_input():
    failed = [[record(0, 0, 0.1, 2, None, "crashed"), record(0, 1, 0.2, 3, None, "timeout")]]
    points = round_points(0, failed, ["x", "n"])
    assert not [s for s in points.scalars if s.run == MAIN_RUN]  # no best yet, no GPU samples
    assert [h.hparams["outcome"] for h in points.hparams] == ["crashed", "timeout"]
    # A string choice has no curve but is in the HParams view; a bool is a string there.
    r = dict(record(0, 0, 0.1, 2, 0.5), params={"opt": "adam", "flag": True, "x": 0.1})
    points = round_points(0, [[r]], ["opt", "flag", "x"])
    assert {s.tag for s in points.scalars if s.run == "pop_0"} == {
        "population_transformation/flag", "population_transformation/x",
        "population_transformation/eval_value"}
    assert points.hparams[0].hparams == {"opt": "adam", "flag": "True", "x": 0.1, "round": 0,
                                         "outcome": "ok"}
    with pytest.raises(ValueError, match="rounds 0..3"):
        round_points(3, ROUNDS, ["x"])


def test_intermediate_curves_go_to_each_trials_run_by_step():
    done = {**record(0, 0, 0.1, 2, 0.5), "curve": [[1, 0.25], [2, 0.5]]}
    stopped = {**record(0, 1, 0.2, 3, None, "pruned"), "curve": [[1, 0.125], [3, None]]}
    points = round_points(0, [[done, stopped, record(0, 2, 0.3, 4, 0.1)]], ["x", "n"])
    curves = by_key(points)
    assert curves[(trial_run(0, 0), TRIAL_CURVE)] == [(1, 0.25), (2, 0.5)]
    assert curves[(trial_run(0, 1), TRIAL_CURVE)] == [(1, 0.125)]  # a non-finite value is not drawn
    assert (trial_run(0, 2), TRIAL_CURVE) not in curves  # it reported none
    assert points.hparams[1].hparams["outcome"] == "pruned"


def test_gpu_steps_count_each_gpus_samples_over_rounds_in_time_order():
    def s(t, u, m):
        return {"t": t, "utilization": u, "memory_used_mib": m}

    rounds = [
        [record(0, 0, 0.1, 1, 0.1, gpu="0", samples=[s(0, 10, 100), s(2, 11, 110)]),
         record(0, 1, 0.1, 1, 0.1, gpu="1", samples=[s(0, 20, 200)]),
         record(0, 2, 0.1, 1, None, "crashed", gpu="0", samples=[s(0.5, 12, 120)],
                start="00:00:01.000")],
        [record(1, 0, 0.1, 1, 0.1, gpu="1", samples=[s(1, 21, 210)]),
         record(1, 1, 0.1, 1, 0.1, gpu=None, samples=[s(1, 99, 999)]),   # a CPU slot: ignored
         record(1, 2, 0.1, 1, 0.1, gpu="0")]]                              # no samples (no NVML)
    p0, p1 = by_key(round_points(0, rounds, [])), by_key(round_points(1, rounds, []))
    # GPU 0 in round 0: t=0 (c0), t=1.5 (c2, started 1 s later), t=2 (c0) -> steps 0, 1, 2.
    assert p0[(MAIN_RUN, "gpu/0/utilization")] == [(0, 10.0), (1, 12.0), (2, 11.0)]
    assert p0[(MAIN_RUN, "gpu/0/memory_used")] == [(0, 100.0), (1, 120.0), (2, 110.0)]
    assert p0[(MAIN_RUN, "gpu/1/utilization")] == [(0, 20.0)]
    # Round 1 continues GPU 1's counter after round 0's one sample; GPU 0 has none.
    assert p1[(MAIN_RUN, "gpu/1/utilization")] == [(1, 21.0)]
    assert {tag for _, tag in p1 if tag.startswith("gpu/")} == {"gpu/1/utilization", "gpu/1/memory_used"}
    walltimes = [s.walltime_ms for s in round_points(0, rounds, []).scalars
                 if s.tag == "gpu/0/utilization"]
    start = 1714521600000  # 2024-05-01T00:00:00Z
    assert walltimes == [start, start + 1500, start + 2000]


# -- writing: idempotent, across instances and processes -----------------------------------

def write_trials(out: Path, rounds) -> RunDir:
    run_dir = RunDir(out)
    for records in rounds:
        run_dir.round_dir(records[0]["round"]).mkdir(parents=True, exist_ok=True)
        for r in records:
            run_dir.write_trial(r)
    return run_dir


def test_a_round_told_twice_even_by_a_fresh_process_is_written_once(tmp_path):
    out = tmp_path / "out"
    write_trials(out, ROUNDS[:2])
    watcher = VisualDLWatcher(output_dir=out, names=["x", "n"])
    watcher.round_finished(0, ROUNDS[0], None)
    watcher.round_finished(1, ROUNDS[1], None)
    watcher.round_finished(1, ROUNDS[1], None)  # told again by the same instance
    # ... and by a fresh process (a resumed run), which knows nothing but the run dir.
    code = ("import json, sys; from watch.visualization import VisualDLWatcher; "
            "w = VisualDLWatcher(output_dir=sys.argv[1], names=['x', 'n']); "
            "w.round_finished(1, json.loads(sys.argv[2]), None)")
    subprocess.run([sys.executable, "-c", code, str(out), json.dumps(ROUNDS[1])], cwd=ROOT,
                   check=True, timeout=60)
    vis = out / "visualization"
    steps = all_steps(vis)
    assert steps[(MAIN_RUN, "hyperparameter_tuning/best_eval_value")] == [0, 1]
    assert steps[("pop_1", "population_transformation/x")] == [0, 1]
    assert steps[("pop_1", "population_transformation/eval_value")] == [1]  # r0c1 crashed
    for k in range(2):
        for i in range(3):
            ok = ROUNDS[k][i]["outcome"] == "ok"
            assert steps.get((trial_run(k, i), TRIAL_METRIC)) == ([k] if ok else None)
    assert VisualDLLogs(vis).rounds_written == 2


def test_a_watcher_keeps_a_few_records_per_written_round_and_writes_the_same_points(tmp_path):
    gpu = [record(k, i, 0.1 * i, 2, -0.1 * i - k, gpu="0", samples=[{"t": 0.5 * j, "utilization": 50 + j}
                                                                     for j in range(2 + i)])
           for k in range(3) for i in range(3)]
    rounds = [gpu[3 * k:3 * k + 3] for k in range(3)]
    step_by_step, at_once = tmp_path / "a", tmp_path / "b"
    watcher = VisualDLWatcher(output_dir=step_by_step, names=["x", "n"])
    for k, records in enumerate(rounds):
        watcher.round_finished(k, records, None)
        assert len(watcher._rounds[0]) == 1 + 2  # round 0's best, and the others' GPU samples to count
        assert set(watcher._rounds[0][1]) == {"round", "candidate", "gpu", "gpu_samples"}
    write_trials(at_once, rounds)
    VisualDLWatcher(output_dir=at_once, names=["x", "n"]).search_started({"next_round": 3})
    a, b = step_by_step / "visualization", at_once / "visualization"
    assert all_steps(a) == all_steps(b)
    for tag in ("hyperparameter_tuning/best_eval_value", "hyperparameter_tuning/x", "gpu/0/utilization"):
        assert read_scalars(a, MAIN_RUN, tag) == read_scalars(b, MAIN_RUN, tag)


def test_a_half_written_round_is_cut_and_a_missed_round_is_caught_up(tmp_path):
    out = tmp_path / "out"
    write_trials(out, ROUNDS)
    vis = out / "visualization"
    watcher = VisualDLWatcher(output_dir=out, names=["x", "n"])
    watcher.round_finished(0, ROUNDS[0], None)
    # A kill while round 1 was being written: half a segment in two logs, one new trial log.
    for run in (MAIN_RUN, "pop_0", trial_run(1, 0)):
        (vis / run).mkdir(parents=True, exist_ok=True)
        with open(vis / run / LOG_FILE_NAME, "ab") as f:
            f.write(b"\x40\x00\x00\x00\x00\x00\x00\x00half a record")
    # The resumed run finds rounds 0..1 told (round 1 was never notified) and 2 to run.
    fresh = VisualDLWatcher(output_dir=out, names=["x", "n"])
    fresh.search_started({"next_round": 2, "trials": [r for rs in ROUNDS for r in rs]})
    assert VisualDLLogs(vis).rounds_written == 2  # only told rounds; round 2 is not told yet
    fresh.round_finished(2, ROUNDS[2], None)
    steps = all_steps(vis)
    assert steps[(MAIN_RUN, "hyperparameter_tuning/x")] == [0, 1, 2]
    assert steps[("pop_0", "population_transformation/eval_value")] == [0, 1, 2]
    assert steps[(trial_run(1, 0), TRIAL_METRIC)] == [1]
    assert read_scalars(vis, MAIN_RUN, "hyperparameter_tuning/best_eval_value") == \
        [(0, f32(-0.1)), (1, f32(-0.1)), (2, f32(0.2))]
    # An index that no longer matches the logs (a log deleted by hand): everything is rewritten.
    (vis / "pop_2" / LOG_FILE_NAME).unlink()
    VisualDLWatcher(output_dir=out, names=["x", "n"]).round_finished(2, ROUNDS[2], None)
    assert all_steps(vis) == steps


# -- real searches --------------------------------------------------------------------------

def run_search(toy, monkeypatch, *args: str) -> int:
    from flows.cli import main

    monkeypatch.chdir(toy)
    return main(["train.py", "--param-file", "hparam.yaml", "--popsize", "3", "--cpu-slots", "3",
                 "--seed", "3", "--output-dir", "out", *args])


def assert_logs_match_trials(out: Path, rounds: int, popsize: int) -> None:
    vis = out / "visualization"
    trials = [[json.loads((out / f"round{k}" / f"trial-{i}.json").read_text()) for i in range(popsize)]
              for k in range(rounds)]
    best_x, best_n, best_score, seen = [], [], [], []
    for k in range(rounds):
        seen += [r for r in trials[k] if r["outcome"] == "ok"]
        best = max(seen, key=lambda r: (r["score"], -r["round"], -r["candidate"]))
        best_x.append((k, f32(best["params"]["x"])))
        best_n.append((k, float(best["params"]["n"])))
        best_score.append((k, f32(best["score"])))
    assert read_scalars(vis, MAIN_RUN, "hyperparameter_tuning/best_eval_value") == best_score
    assert read_scalars(vis, MAIN_RUN, "hyperparameter_tuning/x") == best_x
    assert read_scalars(vis, MAIN_RUN, "hyperparameter_tuning/n") == best_n
    for i in range(popsize):
        row = [trials[k][i] for k in range(rounds)]
        assert read_scalars(vis, f"pop_{i}", "population_transformation/x") == \
            [(k, f32(r["params"]["x"])) for k, r in enumerate(row)]
        assert read_scalars(vis, f"pop_{i}", "population_transformation/n") == \
            [(k, float(r["params"]["n"])) for k, r in enumerate(row)]
        assert read_scalars(vis, f"pop_{i}", "population_transformation/eval_value") == \
            [(k, f32(r["score"])) for k, r in enumerate(row) if r["outcome"] == "ok"]
    for k in range(rounds):
        for i, r in enumerate(trials[k]):
            assert read_hparams(vis, trial_run(k, i)) == {
                "x": r["params"]["x"], "n": r["params"]["n"], "round": k, "outcome": r["outcome"]}
    for (run, tag), steps in all_steps(vis).items():  # never a step twice
        assert steps == sorted(set(steps)), (run, tag, steps)


@pytest.mark.usefixtures("prefect_api", "lock_dir")
def test_a_search_logs_what_its_trials_record_and_an_extension_appends(toy, monkeypatch):
    plan = json.dumps({"r1c1": "crash"})
    assert run_search(toy, monkeypatch, "--round", "2", "plan", plan) == 0
    out = toy / "out"
    assert_logs_match_trials(out, 2, 3)
    assert run_search(toy, monkeypatch, "--round", "3", "plan", plan) == 0  # extend: one more round
    assert_logs_match_trials(out, 3, 3)
    steps = all_steps(out / "visualization")
    assert steps[(MAIN_RUN, "hyperparameter_tuning/best_eval_value")] == [0, 1, 2]
    assert steps[("pop_1", "population_transformation/x")] == [0, 1, 2]
    assert steps[("pop_1", "population_transformation/eval_value")] == [0, 2]
    assert len([p for p in (out / "visualization" / "trials").iterdir()]) == 9


@pytest.mark.usefixtures("prefect_api", "lock_dir")
def test_a_round_told_just_before_a_kill_is_logged_by_the_resumed_run(toy, monkeypatch):
    monkeypatch.setattr(kill_points, "_passes", Counter())  # count passes of this test only
    monkeypatch.setenv(kill_points.KILL_AT_ENV, "round_told#2:raise")  # round 1 told, not notified
    with pytest.raises(kill_points.KilledAtPoint):
        run_search(toy, monkeypatch, "--round", "2", "--evaluator", "fulltrail")
    out = toy / "out"
    assert VisualDLLogs(out / "visualization").rounds_written == 1
    monkeypatch.delenv(kill_points.KILL_AT_ENV)
    assert run_search(toy, monkeypatch, "--round", "2", "--evaluator", "fulltrail") == 0
    assert_logs_match_trials(out, 2, 3)


# -- a real visualdl server -----------------------------------------------------------------

def test_a_visualdl_server_serves_the_scalars_and_trials_as_they_are_appended(tmp_path):
    out = tmp_path / "out"
    write_trials(out, ROUNDS)
    watcher = VisualDLWatcher(output_dir=out, names=["x", "n"])
    watcher.round_finished(0, ROUNDS[0], None)
    vis = out / "visualization"
    port = free_port()
    env = {k: v for k, v in os.environ.items() if not k.lower().endswith("_proxy")}
    env["NO_PROXY"] = env["no_proxy"] = "127.0.0.1,localhost"
    # --disable-telemetry: otherwise it posts to paddlepaddle.org.cn at startup (offline here).
    server = subprocess.Popen(
        [str(Path(sys.executable).parent / "visualdl"), "--logdir", str(vis), "--host", "127.0.0.1",
         "--port", str(port), "--disable-telemetry", "--cache-timeout", "0.05"],
        env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)
    opener = urllib.request.build_opener(urllib.request.ProxyHandler({}))
    base = f"http://127.0.0.1:{port}"

    def api(method, **query):
        url = f"{base}/app/api/{method}?{urllib.parse.urlencode(query)}"
        with opener.open(url, timeout=10) as response:
            body = json.loads(response.read())
        assert body["status"] == 0, body
        return body["data"]

    try:
        deadline = time.monotonic() + 60
        while True:
            try:
                with opener.open(f"{base}/alive", timeout=2) as response:
                    if response.status == 204:
                        break
            except OSError:
                pass
            assert server.poll() is None and time.monotonic() < deadline, "visualdl did not start"
            time.sleep(0.2)
        main_run = str(vis)
        assert main_run in api("runs") and f"{vis}/pop_2" in api("runs")
        series = api("scalar/list", run=main_run, tag="hyperparameter_tuning/best_eval_value")
        assert [(step, value) for _, step, value in series] == [(0, f32(-0.1))]
        # The live server reads a round appended while it runs.
        watcher.round_finished(1, ROUNDS[1], None)
        time.sleep(0.1)  # past --cache-timeout
        series = api("scalar/list", run=f"{vis}/pop_1", tag="population_transformation/x")
        assert [(step, value) for _, step, value in series] == [(0, f32(0.2)), (1, f32(0.5))]
        trials = {t["name"]: t for t in api("hparams/list")}
        assert set(trials) == {f"{vis}/{trial_run(k, i)}" for k in range(2) for i in range(3)}
        crashed = trials[f"{vis}/{trial_run(0, 1)}"]
        assert crashed["hparams"] == {"x": 0.2, "n": 3, "round": 0, "outcome": "crashed"}
        assert crashed["metrics"] == {TRIAL_METRIC: None}
        assert trials[f"{vis}/{trial_run(1, 1)}"]["metrics"] == {TRIAL_METRIC: f32(-0.1)}
    finally:
        stop_group(server)
