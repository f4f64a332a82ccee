"""Early stopping: the client's report file, the pure rules, and a trial stopped by them."""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys
import threading

import pytest

from conftest import PYTHON, ROOT, SCRIPTS, pid_alive
from runtime import trial as trial_module
from runtime.early_stopping import (Decision, EarlyStopConfig, Reference, decide, parse_reports,
                                    running_average, rung_steps, rung_value)
from runtime.search import tuner_score
from runtime.slots import Slot
from runtime.trial import TrialSpec, run_trial
from tuners import Pruned

MEDIAN = EarlyStopConfig(rule="median", min_steps=1)
ASHA = EarlyStopConfig(rule="asha", min_steps=1, reduction_factor=3, min_resource=1)


def flat(value: float, steps: int = 9) -> tuple:
    return tuple((s, value) for s in range(1, steps + 1))


# --- the client -----------------------------------------------------------------------------


def run_client(tmp_path, code: str, **env) -> subprocess.CompletedProcess:
    return subprocess.run([PYTHON, "-c", "from autofinetune import *\n" + code], capture_output=True, text=True,
                          env={**os.environ, "PYTHONPATH": str(ROOT), **env}, cwd=tmp_path, check=True)


def test_report_intermediate_appends_lines_any_language_could_write(tmp_path):
    reports = tmp_path / "reports"
    run_client(tmp_path, "report_intermediate(0.5, 1); report_intermediate(0.75, 2)\n"
                         "print(should_stop())", AUTOFINETUNE_REPORT_FILE=str(reports),
               AUTOFINETUNE_STOP_FILE=str(tmp_path / "stop"))
    assert reports.read_text() == "1 0.5\n2 0.75\n"
    (tmp_path / "stop").touch()
    out = run_client(tmp_path, "print(should_stop())", AUTOFINETUNE_STOP_FILE=str(tmp_path / "stop"))
    assert out.stdout == "True\n"


def test_outside_autofinetune_the_client_does_nothing(tmp_path):
    env = {k: v for k, v in os.environ.items() if not k.startswith("AUTOFINETUNE_")}
    out = subprocess.run([PYTHON, "-c", "from autofinetune import *\nreport_intermediate(1.0, 3)\n"
                          "print(should_stop())"], capture_output=True, text=True, cwd=tmp_path, check=True,
                         env={**env, "PYTHONPATH": str(ROOT)})
    assert out.stdout == "False\n" and os.listdir(tmp_path) == []


@pytest.mark.parametrize("step", [-1, 1.5, True])
def test_report_intermediate_refuses_a_bad_step(tmp_path, step):
    from autofinetune import report_intermediate

    with pytest.raises((ValueError, TypeError)):
        report_intermediate(1.0 if step is not True else True, step)


# --- parsing and the rules ------------------------------------------------------------------


def test_parse_reports_keeps_growing_steps_and_marks_non_finite_values():
    text = "1 0.5\ngarbage\n1 0.9\n3 nan\n2 0.1\n4 0.25 extra\n5 -inf\n7 1e-3\n"
    assert parse_reports(text) == [(1, 0.5), (3, None), (5, None), (7, 0.001)]
    assert parse_reports("2 0.5\n3 0.6\n", after=2) == [(3, 0.6)]


def test_running_average_and_rung_value():
    curve = ((1, 0.2), (2, 0.4), (4, None))
    assert running_average(curve, 2) == pytest.approx(0.3)
    assert running_average(curve, 0) is None
    assert running_average(curve, 4) == -math.inf
    assert rung_value(curve, 3) == -math.inf and rung_value(curve, 2) == 0.4 and rung_value(curve, 5) is None
    assert rung_steps(1, 3, 30) == [1, 3, 9, 27] and rung_steps(2, 2, 1) == []


def test_median_stops_a_trial_whose_best_is_below_the_median_of_running_averages():
    # running averages at step 1: 0.5, 0.25, 0.875 -> median 0.5; at step 2: 0.5, 0.75, 0.875 -> 0.75
    reference = Reference(completed=(flat(0.5), ((1, 0.25), (2, 1.25)), flat(0.875)))
    assert decide(MEDIAN, [(1, 0.45)], reference) is not None
    assert decide(MEDIAN, [(1, 0.5)], reference) is None  # equal to the median: goes on
    decision = decide(MEDIAN, [(1, 0.5), (2, 0.625)], reference)
    assert decision == Decision(2, 0.625, "median", decision.reason) and "median 0.75" in decision.reason
    assert decide(MEDIAN, [(1, 0.5), (2, 0.75)], reference) is None
    # the best so far counts, not the last value
    assert decide(MEDIAN, [(1, 0.875), (2, 0.125)], reference) is None


def test_median_waits_for_min_steps_and_for_a_reference():
    reference = Reference(completed=(flat(0.9),))
    late = EarlyStopConfig(rule="median", min_steps=3)
    assert decide(late, [(1, 0.0)], reference) is None and decide(late, [(1, 0.0), (2, 0.0)], reference) is None
    assert decide(late, [(1, 0.0), (2, 0.0), (3, 0.0)], reference).step == 3
    assert decide(MEDIAN, [(1, 0.0)], Reference()) is None  # round 0: nothing to compare with
    assert decide(MEDIAN, [(5, 0.0)], Reference(completed=(((6, 1.0),),))) is None  # none reported by step 5
    assert decide(EarlyStopConfig(), [(1, -99.0)], reference) is None  # off


def test_asha_keeps_the_top_third_of_each_rung():
    # rung 1 holds 0.1, 0.2, ..., 0.5 of five earlier trials; with ours, 6 values: the top 2 go on
    reference = Reference(reached=tuple(flat(v / 10) for v in range(1, 6)))
    assert decide(ASHA, [(1, 0.45)], reference) is None  # second of six
    decision = decide(ASHA, [(1, 0.35)], reference)
    assert decision.step == 1 and "top 2 of the 6 values recorded there" in decision.reason
    assert decide(ASHA, [(1, 0.4)], reference) is None  # a tie with the cut-off goes on
    # between rungs nothing is judged; at rung 3 the same
    assert decide(ASHA, [(1, 0.9), (2, 0.0)], reference) is None
    assert decide(ASHA, [(1, 0.9), (2, 0.0), (3, 0.0)], reference).step == 3


def test_asha_judges_every_rung_a_jump_passes_and_counts_trials_that_reached_it():
    reference = Reference(reached=(((1, 0.9), (9, 0.9)), ((1, 0.8),), ((1, 0.7), (3, 0.1))))
    # rung 1: 0.9, 0.8, 0.7 + ours; rung 3: 0.9 (first step >= 3 is 9), 0.1 + ours; rung 9: 0.9 + ours
    assert decide(ASHA, [(9, 0.5)], reference).reason.startswith("its value 0.5 at rung 1")
    assert decide(ASHA, [(1, 0.95), (9, 0.5)], reference).reason.startswith("its value 0.5 at rung 3")
    assert decide(ASHA, [(1, 0.95), (3, 0.95), (9, 0.95)], reference) is None
    # fewer than eta values at a rung: only the best of them goes on (at least one is kept)
    assert decide(ASHA, [(1, 0.5)], Reference(reached=(flat(0.6),))) is not None
    assert decide(ASHA, [(1, 0.5)], Reference()) is None


def test_asha_rungs_follow_min_resource_reduction_factor_and_min_steps():
    reference = Reference(reached=(flat(0.9), flat(0.8)))
    config = EarlyStopConfig(rule="asha", min_steps=1, reduction_factor=2, min_resource=2)
    assert decide(config, [(1, 0.0)], reference) is None  # below the first rung
    assert decide(config, [(1, 0.0), (2, 0.0)], reference).step == 2
    config = EarlyStopConfig(rule="asha", min_steps=3, reduction_factor=2, min_resource=2)
    assert decide(config, [(2, 0.0)], reference) is None  # rung 2 < min_steps: never judged
    assert decide(config, [(2, 0.0), (4, 0.0)], reference).step == 4


def test_decisions_are_a_pure_function_of_the_curves():
    reference = Reference(completed=(flat(0.5), flat(0.7)), reached=(flat(0.5), flat(0.7)))
    curve = [(1, 0.9), (2, 0.6), (3, 0.2)]
    for config in (MEDIAN, ASHA):
        first = [decide(config, curve[:j + 1], reference) for j in range(len(curve))]
        assert first == [decide(config, curve[:j + 1], reference) for j in range(len(curve))]


def test_reference_from_records_takes_completed_and_pruned_curves():
    records = [{"outcome": "ok", "curve": [[1, 0.5]]}, {"outcome": "pruned", "curve": [[1, 0.1]]},
               {"outcome": "crashed", "curve": [[1, 0.9]]}, {"outcome": "ok"}]
    reference = Reference.from_records(records)
    assert reference.completed == (((1, 0.5),),)
    assert reference.reached == (((1, 0.5),), ((1, 0.1),))


@pytest.mark.parametrize("bad", [{"rule": "hyperband"}, {"reduction_factor": 1}, {"min_resource": 0},
                                 {"grace_s": -1}, {"min_steps": -1}])
def test_a_bad_config_is_refused(bad):
    with pytest.raises(ValueError, match="early-stop"):
        EarlyStopConfig(**bad)


def test_a_config_and_a_decision_round_trip_through_json():
    config = EarlyStopConfig(rule="asha", min_steps=2, reduction_factor=4, min_resource=3, grace_s=1.5)
    assert EarlyStopConfig.from_json(json.loads(json.dumps(config.to_json()))) == config
    decision = Decision(3, None, "median", "why")
    assert Decision.from_json(json.loads(json.dumps(decision.to_json()))) == decision


def test_what_the_tuner_is_told_of_a_pruned_trial():
    assert tuner_score({"outcome": "pruned", "curve": [[1, 0.5], [3, 0.25]]}) == Pruned(step=3, value=0.25)
    assert tuner_score({"outcome": "pruned", "curve": [[1, 0.5], [3, None]]}) is None  # diverged
    assert tuner_score({"outcome": "ok", "score": 0.5}) == 0.5
    assert tuner_score({"outcome": "crashed", "score": None}) is None


# --- a real trial stopped by a rule -----------------------------------------------------------


def curve_spec(tmp_path, *args: tuple[str, str], rule: EarlyStopConfig = MEDIAN, reference: Reference | None = None,
               x: float = -0.7) -> TrialSpec:
    """A trial of tests/scripts/curve_train.py judged against a reference it is far below."""
    if reference is None:
        reference = Reference(completed=(flat(-0.5, 6),), reached=(flat(-0.5, 6),))
    model = tmp_path / "model"
    return TrialSpec(round=1, candidate=0, params={"x": x}, flags=[["x", repr(x)]], python=PYTHON,
                     script=str(SCRIPTS / "curve_train.py"), cwd=str(ROOT), saved_params_dir=str(model),
                     log_path=str(tmp_path / "log"), result_path=str(tmp_path / ".result"),
                     pid_path=str(tmp_path / ".pid"), extras=[list(a) for a in args],
                     report_path=str(tmp_path / ".reports"), prune_path=str(tmp_path / ".prune"),
                     should_stop_path=str(tmp_path / ".should-stop"), early_stop=rule, reference=reference)


def test_a_cooperative_trial_sees_should_stop_and_is_recorded_pruned(tmp_path):
    spec = curve_spec(tmp_path, ("wait", "30"))
    record = run_trial(spec, Slot(index=0, gpu=None), stop=threading.Event())
    assert record["outcome"] == "pruned" and record["score"] is None and record["exit_code"] == 0
    assert record["pruned"]["step"] == 1 and record["pruned"]["rule"] == "median"
    assert record["curve"] == [[1, pytest.approx(-0.99)]]
    assert "should_stop at step 1" in (tmp_path / "log").read_text()
    assert "it exited" in record["error"]
    assert json.loads((tmp_path / ".prune").read_text())["step"] == 1  # kept until the record is written
    assert not (tmp_path / ".should-stop").exists() and not (tmp_path / ".reports").exists()


def test_a_trial_that_ignores_should_stop_is_terminated_after_the_grace_period(tmp_path, monkeypatch):
    rule = EarlyStopConfig(rule="asha", grace_s=0.2)
    spec = curve_spec(tmp_path, ("ignore", "1"), rule=rule)
    record = run_trial(spec, Slot(index=0, gpu=None), stop=threading.Event())
    assert record["outcome"] == "pruned" and record["pruned"]["step"] == 1
    assert (tmp_path / "model" / "sigterm").exists()  # it got SIGTERM (its handler ran)
    assert "ignored should_stop() and was terminated" in record["error"]
    assert len(record["curve"]) == 6  # it went on reporting meanwhile


def test_a_trial_that_ignores_sigterm_too_is_killed(tmp_path, monkeypatch):
    monkeypatch.setattr(trial_module, "_TERM_GRACE_S", 0.2)
    script = tmp_path / "stubborn.py"
    script.write_text("import os, signal, time\nsignal.signal(signal.SIGTERM, signal.SIG_IGN)\n"
                      "open(os.environ['AUTOFINETUNE_REPORT_FILE'], 'a').write('1 -5.0\\n')\n"
                      "open('pid', 'w').write(str(os.getpid()))\ntime.sleep(3600)\n")
    spec = curve_spec(tmp_path, rule=EarlyStopConfig(rule="median", grace_s=0.0))
    spec = TrialSpec(**{**spec.__dict__, "script": str(script), "cwd": str(tmp_path)})
    record = run_trial(spec, Slot(index=0, gpu=None), stop=threading.Event())
    assert record["outcome"] == "pruned" and record["exit_code"] == -9
    assert not pid_alive(int((tmp_path / "pid").read_text()))


def test_points_read_after_the_exit_are_judged_too(tmp_path):
    # no wait: the script reports its six points and exits before the runner's next poll
    record = run_trial(curve_spec(tmp_path), Slot(index=0, gpu=None), stop=threading.Event())
    assert record["outcome"] == "pruned" and record["pruned"]["step"] == 1 and len(record["curve"]) == 6


def test_a_good_trial_runs_to_the_end_with_its_curve(tmp_path):
    record = run_trial(curve_spec(tmp_path, x=0.3), Slot(index=0, gpu=None), stop=threading.Event())
    assert record["outcome"] == "ok" and record["score"] == pytest.approx(0.06)
    assert [s for s, _ in record["curve"]] == [1, 2, 3, 4, 5, 6]


def test_off_records_the_curve_and_stops_nothing(tmp_path):
    record = run_trial(curve_spec(tmp_path, rule=EarlyStopConfig()), Slot(index=0, gpu=None),
                       stop=threading.Event())
    assert record["outcome"] == "ok" and len(record["curve"]) == 6 and "pruned" not in record


def test_a_persisted_decision_is_replayed_by_a_re_run(tmp_path):
    # the good trial would run to the end, but a decision written before a kill says step 4
    (tmp_path / ".prune").write_text(json.dumps(Decision(4, 0.05, "median", "decided before").to_json()))
    record = run_trial(curve_spec(tmp_path, x=0.3), Slot(index=0, gpu=None), stop=threading.Event())
    assert record["outcome"] == "pruned" and record["pruned"] == Decision(4, 0.05, "median", "decided before").to_json()
    # a decision of another rule (the resume changed --early-stop) is not replayed
    (tmp_path / ".prune").write_text(json.dumps(Decision(4, 0.05, "asha", "decided before").to_json()))
    record = run_trial(curve_spec(tmp_path, x=0.3), Slot(index=0, gpu=None), stop=threading.Event())
    assert record["outcome"] == "ok"


# --- whole searches on local slots --------------------------------------------------------------

HPARAM = "param_list:\n  - name: x\n    init_value: 0.0\n    type: float\n    greater_than: -1.0\n    lower_than: 1.0\n"
SEARCH = ["--popsize", "6", "--round", "2", "--cpu-slots", "2", "--seed", "5", "--evaluator", "fulltrail",
          "--tuning-strategy", "pshe2"]


def curve_work(path):
    (path / "train.py").write_text((SCRIPTS / "curve_train.py").read_text())
    (path / "hparam.yaml").write_text(HPARAM)
    return path


@pytest.fixture
def curves(tmp_path):
    return curve_work(tmp_path)


@pytest.fixture(scope="module")
def off_run(tmp_path_factory, prefect_server):
    """The search without early stopping (records, state) that the rules are compared with."""
    from prefect.settings import PREFECT_API_URL, temporary_settings

    work = curve_work(tmp_path_factory.mktemp("off"))
    with pytest.MonkeyPatch.context() as monkeypatch, \
            temporary_settings({PREFECT_API_URL: prefect_server["PREFECT_API_URL"]}):
        monkeypatch.setenv("AUTOFINETUNE_LOCK_DIR", str(work / "gpu-locks"))
        records = search(work, monkeypatch, "off", "--early-stop", "off", "wait", "0.05")
    return records, json.loads((work / "off" / "state.json").read_text())


def search(work, monkeypatch, out: str, *args: str) -> list[list[dict]]:
    from flows.cli import main

    monkeypatch.chdir(work)
    assert main(["train.py", "--param-file", "hparam.yaml", *SEARCH, "--output-dir", out, *args]) == 0
    return [[json.loads((work / out / f"round{k}" / f"trial-{i}.json").read_text()) for i in range(6)]
            for k in range(2)]


def known_curve(x: float) -> list[tuple[int, float]]:
    """curve_train.py's curve for x."""
    return [(s, -(x - 0.3) ** 2 + 0.01 * s) for s in range(1, 7)]


def expected_stop(config: EarlyStopConfig, x: float, reference: Reference) -> int | None:
    curve = known_curve(x)
    for j in range(len(curve)):
        decision = decide(config, curve[:j + 1], reference)
        if decision is not None:
            return decision.step
    return None


@pytest.mark.usefixtures("prefect_api", "lock_dir")
@pytest.mark.parametrize("rule, flags", [
    ("median", ["--early-stop-min-steps", "2"]),
    ("asha", ["--early-stop-reduction-factor", "2", "--early-stop-min-resource", "2"]),
])
def test_a_search_stops_the_hopeless_trials_and_finds_the_same_best(curves, monkeypatch, capsys, off_run,
                                                                    rule, flags):
    off, state_off = off_run
    pruning = search(curves, monkeypatch, rule, "--early-stop", rule, *flags, "wait", "0.05")
    config = EarlyStopConfig(rule=rule, min_steps=2 if rule == "median" else 1,
                             reduction_factor=2 if rule == "asha" else 3, min_resource=2 if rule == "asha" else 1)
    assert all(r["outcome"] == "ok" for r in pruning[0])  # round 0 is the reference
    reference = Reference.from_records(pruning[0])
    stopped = []
    for r in pruning[1]:
        expected = expected_stop(config, r["params"]["x"], reference)
        assert (r["pruned"]["step"] if r["outcome"] == "pruned" else None) == expected, r
        if expected is not None:
            stopped.append(r)
            assert r["score"] is None and r["pruned"]["rule"] == rule
            # it exited by itself when it saw should_stop(), at the step decided or (a busy machine:
            # it waits 0.05 s a step) a little later; exactly when is test_a_cooperative_trial_...'s
            log = (curves / rule / "round1" / f"log-{r['candidate']}.info").read_text()
            seen = [int(line.rsplit(" ", 1)[1]) for line in log.splitlines() if line.startswith("should_stop at")]
            assert all(step >= expected for step in seen) and r["exit_code"] == 0
    assert 1 <= len(stopped) < 6
    # both runs asked the same two rounds; what was stopped could not have won
    assert [r["params"] for row in pruning for r in row] == [r["params"] for row in off for r in row]
    state = json.loads((curves / rule / "state.json").read_text())
    assert state["best"] == state_off["best"]
    assert all(r["outcome"] == "ok" for row in off for r in row)
    log = (curves / rule / "log_file.txt").read_text()
    assert log.count("\tpruned at step ") == len(stopped)
    assert not list((curves / rule).glob("round*/.prune-*")) and not list((curves / rule).glob("round*/.reports-*"))
    console = capsys.readouterr().out
    assert f"{len(stopped)} of 6 trials of the 1-th round were stopped early" in console
    # VisualDL: every trial's curve in its own run, step on the x-axis
    from visualdl import LogReader

    r = stopped[0]
    reader = LogReader(file_path=str(curves / rule / "visualization" / "trials" / f"r1-c{r['candidate']}"
                                     / "vdlrecords.autofinetune.log"))
    assert [v.id for v in reader.get_data("scalar", "trial/intermediate_value")] == [s for s, _ in r["curve"]]
    # Prefect: the stopped trials' task runs ended in the state "Pruned"
    assert sorted(prefect_task_states(rule, "round-1")) == sorted(
        "Pruned" if r["outcome"] == "pruned" else "Completed" for r in pruning[1])


def prefect_task_states(top_flow_run_name: str, subflow_run_name: str) -> list[str]:
    """The state names of the task runs ``train-*`` of one round subflow of one search."""
    import asyncio

    from prefect.client.orchestration import get_client
    from prefect.client.schemas.filters import (FlowRunFilter, FlowRunFilterId, FlowRunFilterName,
                                                FlowRunFilterParentFlowRunId, TaskRunFilter, TaskRunFilterName)

    async def read() -> list[str]:
        async with get_client() as client:
            [top] = await client.read_flow_runs(flow_run_filter=FlowRunFilter(
                name=FlowRunFilterName(any_=[top_flow_run_name])), limit=1, sort="START_TIME_DESC")
            subs = await client.read_flow_runs(flow_run_filter=FlowRunFilter(
                parent_flow_run_id=FlowRunFilterParentFlowRunId(any_=[top.id]),
                name=FlowRunFilterName(any_=[subflow_run_name])))
            runs = await client.read_task_runs(
                flow_run_filter=FlowRunFilter(id=FlowRunFilterId(any_=[s.id for s in subs])),
                task_run_filter=TaskRunFilter(name=TaskRunFilterName(like_="train-")))
            return [run.state.name for run in runs]
    return asyncio.run(read())


def test_off_tells_the_tuner_exactly_what_it_was_told_before(off_run):
    """`--early-stop off` (the default) changes nothing: the tuner is told the final scores, as a
    plain ask/tell loop over the same script's results, bit for bit."""
    from tuners import SearchSpace, make_tuner

    records, state = off_run
    tuner = make_tuner("pshe2", SearchSpace.from_dict(state["search"]["space"]), popsize=6, seed=5)
    for row in records:
        assert [r["params"] for r in row] == tuner.ask()
        tuner.tell([-(r["params"]["x"] - 0.3) ** 2 + 0.06 for r in row])
    assert state["tuner"] == json.loads(json.dumps(tuner.state_dict()))
    assert all(r["outcome"] == "ok" and "pruned" not in r for row in records for r in row)


@pytest.mark.slow  # a real CLI process killed, then resumed
@pytest.mark.usefixtures("prefect_api", "lock_dir")
def test_sigkill_during_a_pruning_decision_then_resume_decides_the_same(curves, monkeypatch, prefect_server):
    args = ["--early-stop", "median", "wait", "0.05"]
    reference = search(curves, monkeypatch, "ref", *args)
    env = {**prefect_server, "PYTHONPATH": str(ROOT), "AUTOFINETUNE_KILL_AT": "prune_decided#1",
           "AUTOFINETUNE_PROGRESS": "plain"}
    killed = subprocess.run([sys.executable, "-m", "flows.autofinetune", "train.py", "--param-file", "hparam.yaml",
                             *SEARCH, "--output-dir", "run", *args], cwd=curves, env=env, capture_output=True,
                            text=True, timeout=240)
    assert killed.returncode == -9, killed.stdout[-3000:] + killed.stderr[-3000:]
    decided = list((curves / "run").glob("round1/.prune-*"))
    assert len(decided) == 1  # written before the kill, not yet recorded
    resumed = search(curves, monkeypatch, "run", *args)

    def decisions(rows):
        return [(r["round"], r["candidate"], r["outcome"], r["score"], r.get("pruned")) for row in rows for r in row]
    assert decisions(resumed) == decisions(reference)
    state, ref_state = (json.loads((curves / out / "state.json").read_text()) for out in ("run", "ref"))
    assert state["tuner"] == ref_state["tuner"] and state["best"] == ref_state["best"]
