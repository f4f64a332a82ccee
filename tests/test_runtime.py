"""The plain layer (``runtime/``) without Prefect: run state, options and settings, the run dir,
trial outcomes, the search's steps. Milliseconds each, real files and real subprocesses."""

from __future__ import annotations

import dataclasses
import inspect
import shutil
import json
import os
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest

from conftest import ROOT
from runtime.options import OPTIONS, OPTION_NAMES, SEED_LIMIT, OptionError, check_all
from runtime.rundir import RunDir, RunDirBusy, StopMarker
from runtime.search import (SearchMismatchError, check_resume, new_state, propose, record_best, tell_round,
                            trial_spec)
from runtime.settings import SettingsError, fresh_seed, resolve_settings
from runtime.slots import Slot
from runtime.state import (BestTrial, Parent, ParentPlan, RunState, RunStateError, RunStateVersionError,
                           SearchKey)
from runtime.trial import TrialSpec, read_pid_file, reap_orphans, run_trial
from watch.visualization import VisualDLLogs

PY = sys.executable


def settings_for(toy, **options):
    return resolve_settings(dict(cwd=str(toy), output_dir="out", cpu_slots=2, seed=3, **options))


def fresh_run(toy, **options) -> tuple[RunDir, RunState]:
    settings = settings_for(toy, **options)
    run_dir = RunDir(settings.output_dir)
    run_dir.path.mkdir()
    state = new_state(settings.search, settings.rounds, settings.run)
    run_dir.write_state(state)
    return run_dir, state


# -- the run state --------------------------------------------------------------------------

def test_run_state_round_trips_with_typed_fields(toy):
    run_dir, state = fresh_run(toy, popsize=2)
    parent = Parent(name="round0/model-1", model_path="/m", round=0, candidate=1, score=0.5)
    state.best = BestTrial(round=0, candidate=1, score=0.5)
    state.plan = ParentPlan(round=1, parents=(parent,), assignment=(parent, None))
    run_dir.write_state(state)
    loaded = run_dir.read_state()
    assert loaded == state and loaded.plan.assignment[0] == parent and loaded.search.popsize == 2
    on_disk = json.loads(run_dir.state_path.read_text())
    assert list(on_disk) == ["version", "search", "rounds", "next_round", "pending_round", "tuner", "best",
                             "plan", "run"]
    assert on_disk["plan"]["assignment"][1] is None and on_disk["best"]["score"] == 0.5


@pytest.mark.parametrize("text, says", [
    ("", "is empty"),
    ("{garbage", "is not JSON"),
    ("[]", "the file holds list, expected an object"),
    ("null", "the file holds null"),
])
def test_a_damaged_state_file_is_refused_in_one_line(tmp_path, text, says):
    path = tmp_path / "state.json"
    path.write_text(text)
    with pytest.raises(RunStateError) as err:
        RunState.load(path)
    message = str(err.value)
    assert message.startswith(f"{path}: ") and says in message and "\n" not in message
    assert "--output-dir" in message  # says how to proceed


def test_missing_unknown_and_mistyped_fields_are_named(toy):
    run_dir, state = fresh_run(toy)
    good = state.to_json()
    cases = [
        ({k: v for k, v in good.items() if k != "next_round"}, "the state lacks 'next_round'"),
        (dict(good, extra=1), "unknown field(s) 'extra'"),
        (dict(good, next_round="2"), "next_round is '2', expected an integer >= 0"),
        (dict(good, search={**good["search"], "popsize": 0}), "search.popsize is 0"),
        (dict(good, run={k: v for k, v in good["run"].items() if k != "python"}), "run lacks 'python'"),
        (dict(good, best={"round": 0, "candidate": 0}), "best lacks 'score'"),
        (dict(good, plan={"round": 1, "parents": [{}], "assignment": []}), "plan.parents[0] lacks"),
    ]
    for data, says in cases:
        run_dir.state_path.write_text(json.dumps(data))
        with pytest.raises(RunStateError, match=None) as err:
            run_dir.read_state()
        assert says in str(err.value), (says, str(err.value))
    run_dir.state_path.write_text(json.dumps(dict(good, version=99)))
    with pytest.raises(RunStateVersionError, match="run-state version 99 is not 1"):
        run_dir.read_state()


def test_the_cli_refuses_a_damaged_tuner_state_before_prefect_starts(toy, capsys):
    from flows.cli import main

    run_dir, state = fresh_run(toy)
    state.tuner["surplus"] = 1
    run_dir.write_state(state)
    before = run_dir.state_path.read_text()
    os.chdir(toy)
    try:
        code = main(["train.py", "--output-dir", "out", "--seed", "3"])
    finally:
        os.chdir(ROOT)
    err = capsys.readouterr().err.strip()
    assert code == 2 and len(err.splitlines()) == 1, err
    assert err.startswith(f"autofinetune: error: {run_dir.state_path}: field 'tuner': ") and "surplus" in err
    assert run_dir.state_path.read_text() == before


def test_the_cli_refuses_a_damaged_state_with_exit_2_and_touches_nothing(toy, capsys):
    from flows.cli import main

    (toy / "out").mkdir()
    (toy / "out" / "state.json").write_text("[]")
    os.chdir(toy)
    try:
        code = main(["train.py", "--output-dir", "out"])
    finally:
        os.chdir(ROOT)
    err = capsys.readouterr().err.strip()
    assert code == 2 and len(err.splitlines()) == 1
    assert err.startswith(f"autofinetune: error: {toy / 'out' / 'state.json'}: not an autofinetune run state")
    assert sorted(p.name for p in (toy / "out").iterdir()) == ["state.json"]
    assert (toy / "out" / "state.json").read_text() == "[]"
    assert "prefect" not in sys.modules or True  # (imported by other tests in this session)


# -- options and settings -------------------------------------------------------------------

def test_the_flow_signature_is_the_options_list():
    from flows.autofinetune import autofinetune

    params = inspect.signature(autofinetune.fn).parameters
    assert tuple(params) == OPTION_NAMES
    assert {n: p.default for n, p in params.items()} == {o.name: o.default for o in OPTIONS}


def test_argparse_is_derived_from_the_options():
    from flows.cli import build_parser

    parser = build_parser()
    by_dest = {a.dest: a for a in parser._actions}
    for o in OPTIONS:
        if o.flags:
            assert tuple(by_dest[o.name].option_strings) == o.flags and by_dest[o.name].default == o.default
        else:
            assert o.name not in by_dest
    args = vars(parser.parse_intermixed_args(["t.py", "--round", "3", "--param_file", "h.yaml", "k", "v"]))
    assert args["rounds"] == 3 and args["param_file"] == "h.yaml" and args["words"] == ["t.py", "k", "v"]


@pytest.mark.parametrize("values, says", [
    ({"popsize": 0}, "--popsize must be an integer >= 1, got 0"),
    ({"rounds": True}, "--round must be an integer >= 1, got True"),
    ({"evaluator": "waves"}, "--evaluator 'waves' is not one of fulltrail, populationbased"),
    ({"tuning_strategy": "grid"}, "--tuning-strategy 'grid' is not one of"),
    ({"seed": SEED_LIMIT}, "--seed must be an integer in [0, 2**32)"),
    ({"trial_timeout": 0}, "--trial-timeout must be a positive number of seconds"),
    ({"trial_timeout": float("inf")}, "--trial-timeout must be a positive number of seconds, got inf"),
    ({"keep_checkpoints": "some"}, "--keep-checkpoints 'some' is not one of all, needed"),
    ({"extras": "lr 5"}, "extras must be a list of words"),
    ({"colour": "red"}, "unknown option(s) colour"),
])
def test_each_option_is_checked_with_its_flag_named(values, says):
    with pytest.raises(OptionError) as err:
        check_all(values)
    assert says in str(err.value)


def test_settings_are_typed_and_normalized(toy):
    s = settings_for(toy, tuning_strategy="HAZero", extras=["echo", "hi"], pbt_epochs=0)
    assert s.search == SearchKey(strategy="hazero", evaluator="populationbased", popsize=5, seed=3,
                                 space=s.space.to_dict())
    assert s.run.extras == [["echo", "hi"]] and s.run.pbt_epochs == 0 and s.run.python == PY
    assert [slot.index for slot in s.slots] == [0, 1] and s.output_dir == toy / "out"
    assert 0 <= fresh_seed() < SEED_LIMIT


@pytest.mark.parametrize("options, says", [
    ({"script": "nope.py"}, "nope.py: no such file"),
    ({"extras": ["lr"]}, "extra arguments must come in KEY VALUE pairs"),
    ({"extras": ["--lr", "1"]}, "extra argument key '--lr' cannot be a flag name"),
    ({"python": "/no/python"}, "--python '/no/python': not an executable"),
    ({"output_root": "nightly"}, "give either --output-dir"),
    ({"extras": ["x", "5"]}, "extra argument 'x' names a hyperparameter searched in hparam.yaml; forwarding it "
                             "would override the searched value"),
    ({"extras": ["model_path", "/m"]}, "extra argument 'model_path' is set by autofinetune for every trial"),
    ({"extras": ["echo", "1", "saved_params_dir", "/d"]}, "extra argument 'saved_params_dir' is set by"),
])
def test_bad_settings_are_refused_before_anything_is_created(toy, options, says):
    with pytest.raises(SettingsError, match=None) as err:
        settings_for(toy, **options)
    assert says in str(err.value)
    assert not (toy / "out").exists()


def test_a_non_empty_foreign_dir_is_refused_but_a_stop_marker_alone_is_not(toy):
    (toy / "out").mkdir()
    StopMarker(toy / "out" / ".stop").set()
    assert settings_for(toy).output_dir == toy / "out"
    (toy / "out" / "notes.txt").write_text("mine")
    with pytest.raises(SettingsError, match="not empty and not an autofinetune run directory"):
        settings_for(toy)


# -- the run dir ----------------------------------------------------------------------------

def test_trials_are_read_in_order_and_the_log_file_ranks_failures_last(tmp_path):
    run_dir = RunDir(tmp_path)
    records = [{"round": 0, "candidate": i, "params": {"x": i}, "score": s, "outcome": o,
                "saved_params_dir": f"/m{i}", "parent": None}
               for i, (s, o) in enumerate([(-1.0, "ok"), (None, "crashed"), (-0.5, "ok")] * 4)]
    for r in records[:12]:
        r["candidate"] = records.index(r)
        run_dir.round_dir(0).mkdir(exist_ok=True)
        run_dir.write_trial(r)
    assert [r["candidate"] for r in run_dir.trials()] == list(range(12))  # 10 after 9, not after 1
    run_dir.write_log_file(["x"], run_dir.trials(), final=True)
    lines = run_dir.log_file.read_text().splitlines()
    assert lines[:4] == ["The final best hyperparameters:", "x\t:\t2", "The final best eval score is -0.5.",
                         f"The final best model parameters are saved as {run_dir.best_model} ."]
    assert lines[6].split("\t") == ["1", "-", "/m1", "0", "1", "crashed", "-"]


def test_best_model_swap_is_atomic_and_a_half_swap_is_recovered(tmp_path):
    run_dir = RunDir(tmp_path)
    (tmp_path / "a").mkdir()
    (tmp_path / "a" / "w").write_text("a")
    run_dir.replace_best_model(tmp_path / "a")
    assert (run_dir.best_model / "w").read_text() == "a"
    os.rename(run_dir.best_model, tmp_path / ".best_model.old")  # a kill between the two renames
    (tmp_path / ".best_model.new").mkdir()
    run_dir.recover_best_model()
    assert (run_dir.best_model / "w").read_text() == "a"
    assert not (tmp_path / ".best_model.old").exists() and not (tmp_path / ".best_model.new").exists()


def test_the_lock_refuses_a_second_holder_and_names_the_first(tmp_path):
    run_dir = RunDir(tmp_path)
    with run_dir.lock():
        child = subprocess.run([PY, "-c", "import sys; from runtime.rundir import RunDir\n"
                                f"with RunDir({str(tmp_path)!r}).lock(): pass"],
                               capture_output=True, text=True, cwd=ROOT)
    assert child.returncode != 0 and f"pid {os.getpid()}" in child.stderr and "RunDirBusy" in child.stderr
    with run_dir.lock():  # released: free again
        pass
    assert RunDirBusy


def test_a_stop_marker_is_seen_by_path_and_only_stale_ones_are_cleared(tmp_path):
    marker = RunDir(tmp_path / "run").stop
    assert not marker.is_set()
    marker.set()  # creates the run dir if a stop comes before it exists
    assert marker.is_set() and StopMarker(tmp_path / "run" / ".stop").is_set()
    marker.clear_stale()
    assert marker.is_set()  # set by this process: kept
    marker.path.write_text("1\n")  # left by another (dead) process
    marker.clear_stale()
    assert not marker.is_set()


# -- trial outcomes: real subprocesses ------------------------------------------------------

def spec_for(tmp_path, body: str, **kw) -> TrialSpec:
    script = tmp_path / "train.py"
    script.write_text("import os, sys, time, signal\nR = os.environ['AUTOFINETUNE_RESULT_FILE']\n" + body)
    return TrialSpec(round=0, candidate=0, params={"x": 1}, flags=[["x", "1"]], python=kw.pop("python", PY),
                     script=str(script), cwd=str(tmp_path), saved_params_dir=str(tmp_path / "model"),
                     log_path=str(tmp_path / "log"), result_path=str(tmp_path / ".result"),
                     pid_path=str(tmp_path / ".pid"), **kw)


@pytest.mark.parametrize("body, outcome, error", [
    ("open(R, 'w').write('0.25')", "ok", None),
    ("open(R, 'w').write('0.25'); sys.exit(3)", "crashed", "exit status 3"),
    ("pass", "no_result", "exit 0 without report_final_result()"),
    ("open(R, 'w').write('nan')", "invalid_score", "reported nan, which is not a finite number"),
    ("open(R, 'w').write('high')", "invalid_score", "reported 'high', which is not a number"),
    ("os.kill(os.getpid(), signal.SIGKILL)", "killed", "killed by signal SIGKILL"),
])
def test_each_way_a_trial_ends_is_its_own_outcome(tmp_path, body, outcome, error):
    record = run_trial(spec_for(tmp_path, body), Slot(index=1, gpu=None), stop=threading.Event())
    assert record["outcome"] == outcome and record["error"] == error
    assert record["score"] == (0.25 if outcome == "ok" else None)
    assert record["argv"] == [PY, str(tmp_path / "train.py"), "--x=1", f"--saved_params_dir={tmp_path / 'model'}"]
    assert record["slot"] == 1 and record["gpu"] is None and "gpu_samples" not in record
    assert not (tmp_path / ".pid").exists() and not (tmp_path / ".result").exists()


def test_timeout_failed_start_and_retries(tmp_path):
    hang = spec_for(tmp_path, "time.sleep(60)", timeout_s=0.3)
    t0 = time.monotonic()
    record = run_trial(hang, Slot(index=0, gpu=None), stop=threading.Event())
    assert record["outcome"] == "timeout" and time.monotonic() - t0 < 10
    missing = spec_for(tmp_path, "pass", python="/no/such/python", retries=2)
    record = run_trial(missing, Slot(index=0, gpu=None), stop=threading.Event())
    assert record["outcome"] == "failed_to_start" and record["attempts"] == 3
    assert record["retried_after"] == ["failed_to_start", "failed_to_start"]


def test_a_stop_terminates_the_group_and_a_pid_file_names_the_trial(tmp_path):
    stop = StopMarker(tmp_path / ".stop")
    spec = spec_for(tmp_path, "import subprocess\nsubprocess.Popen([sys.executable, '-c', 'import time; "
                              "time.sleep(60)'])\ntime.sleep(60)")
    result = {}
    thread = threading.Thread(target=lambda: result.update(run_trial(spec, Slot(index=2, gpu=None), stop=stop)))
    thread.start()
    deadline = time.monotonic() + 20
    while read_pid_file(tmp_path / ".pid") is None and time.monotonic() < deadline:
        time.sleep(0.02)
    info = read_pid_file(tmp_path / ".pid")
    assert info["slot"] == 2 and info["gpu"] is None and info["host"] == os.uname().nodename
    stop.set()
    thread.join(timeout=20)
    assert result["outcome"] == "interrupted"
    deadline = time.monotonic() + 5  # a SIGKILLed process takes a moment to become a zombie
    while group_members(info["pid"]) and time.monotonic() < deadline:
        time.sleep(0.02)
    assert group_members(info["pid"]) == []  # the grandchild went with the group


@pytest.mark.parametrize("stop_follows, outcome", [(True, "interrupted"), (False, "killed")])
def test_a_trial_sigtermed_with_its_search_is_interrupted_not_killed(tmp_path, stop_follows, outcome):
    """Stopping a service (systemd, a pod) SIGTERMs the trials along with the search; when the
    search's stop follows within a second, the trial is interrupted (re-run on resume)."""
    died = tmp_path / "died"

    class StopAfterTheTrialDied:  # the search's SIGTERM handler, running a moment late
        def is_set(self) -> bool:
            return stop_follows and died.exists() and time.time() - died.stat().st_mtime > 0.3

    body = f"open({str(died)!r}, 'w').close()\nos.kill(os.getpid(), signal.SIGTERM)"
    record = run_trial(spec_for(tmp_path, body), Slot(index=0, gpu=None), stop=StopAfterTheTrialDied())
    assert record["outcome"] == outcome and record["exit_code"] == -signal.SIGTERM


def group_members(pgid: int) -> list[int]:
    """Live (not zombie) processes of a process group."""
    members = []
    for entry in filter(str.isdigit, os.listdir("/proc")):
        try:
            fields = open(f"/proc/{entry}/stat").read().rsplit(")", 1)[1].split()
        except (FileNotFoundError, NotADirectoryError, ProcessLookupError, PermissionError):
            continue
        if int(fields[2]) == pgid and fields[0] != "Z":
            members.append(int(entry))
    return members


def test_orphans_of_this_host_are_reaped_and_other_hosts_are_left(tmp_path):
    child = subprocess.Popen(["sleep", "60"], start_new_session=True)
    try:
        from runtime.trial import process_start_time

        mine, theirs = tmp_path / ".pid-0", tmp_path / ".pid-1"
        mine.write_text(json.dumps({"pid": child.pid, "start": process_start_time(child.pid),
                                    "host": os.uname().nodename}))
        theirs.write_text(json.dumps({"pid": child.pid, "start": "1", "host": "elsewhere"}))
        assert reap_orphans([mine, theirs]) == [child.pid]
        assert child.wait(timeout=10) == -signal.SIGKILL
        assert not mine.exists() and theirs.exists()
    finally:
        child.kill()


# -- the search's steps ---------------------------------------------------------------------

def test_pbt_children_get_model_path_and_epochs_unless_an_epochs_extra_is_forwarded(toy):
    parent = Parent(name="round0/model-1", model_path="/m1", round=0, candidate=1, score=0.5)
    cases = [({}, parent, ["epochs", "1"]), ({"pbt_epochs": 3}, parent, ["epochs", "3"]),
             ({"pbt_epochs": 0}, parent, None), ({"extras": ["epochs", "7"]}, parent, ["epochs", "7"]),
             ({}, None, None)]
    for options, par, epochs in cases:
        run_dir = RunDir(toy / "out")
        state = new_state(dataclasses.replace(settings_for(toy).search), 2, settings_for(toy, **options).run)
        spec = trial_spec(run_dir, state, 1, 0, {"x": 0.5, "n": 2}, par)
        assert spec.flags == [["x", "0.5"], ["n", "2"]]
        assert spec.model_path == (par.model_path if par else None)
        assert [e for e in spec.extras if e[0] == "epochs"] == ([epochs] if epochs else []), options


def test_a_searched_epochs_is_never_overridden_by_pbt(toy):
    (toy / "hparam.yaml").write_text(
        "param_list:\n  - name: epochs\n    init_value: 3\n    type: int\n    greater_than: 1\n"
        "    lower_than: 9\n")
    settings = settings_for(toy, pbt_epochs=1)
    state = new_state(settings.search, 2, settings.run)
    parent = Parent(name="round0/model-0", model_path="/m0", round=0, candidate=0, score=0.5)
    spec = trial_spec(RunDir(toy / "out"), state, 1, 0, {"epochs": 7}, parent)
    assert spec.flags == [["epochs", "7"]] and spec.extras == [] and spec.model_path == "/m0"


def test_propose_is_asked_once_and_tell_happens_once(toy):
    run_dir, _ = fresh_run(toy, popsize=2, rounds=2)
    first = propose(run_dir, 0)
    assert propose(run_dir, 0) == first and first[0] == {"x": 0.0, "n": 1}
    with pytest.raises(RuntimeError, match="round 1 asked out of order"):
        propose(run_dir, 1)
    records = []
    for i, params in enumerate(first):
        model = run_dir.model_dir(0, i)
        model.mkdir(parents=True)
        records.append({"round": 0, "candidate": i, "params": params, "score": 0.1 * i, "outcome": "ok",
                        "saved_params_dir": str(model), "parent": None})
        run_dir.write_trial(records[-1])
    tell_round(run_dir, 0, records)
    told = run_dir.read_state().tuner
    tell_round(run_dir, 0, records)  # a re-run after a kill: told already, nothing changes
    state = run_dir.read_state()
    assert state.tuner == told and state.next_round == 1 and state.pending_round is None
    best = record_best(run_dir, ["x", "n"], final=False)
    assert best["candidate"] == 1 and run_dir.read_state().best == BestTrial(round=0, candidate=1, score=0.1)
    with pytest.raises(ValueError, match="expected the records of candidates 0..1 in order"):
        tell_round(run_dir, 1, records[::-1])


def test_a_run_dir_that_lost_a_finished_round_is_refused_and_left_alone(toy, capsys):
    from flows.cli import main

    from runtime.search import check_rounds_on_disk

    run_dir, state = fresh_run(toy, popsize=2)
    for k in range(2):
        run_dir.round_dir(k).mkdir()
        for i in range(2):
            run_dir.write_trial({"round": k, "candidate": i, "params": {"x": 0.0, "n": 1}, "score": 0.1,
                                 "outcome": "ok", "saved_params_dir": "/m", "parent": None})
    state.next_round = 2
    run_dir.write_state(state)
    check_rounds_on_disk(run_dir, state)  # complete: fine
    shutil.rmtree(run_dir.round_dir(1))
    os.chdir(toy)
    try:
        code = main(["train.py", "--output-dir", "out", "--popsize", "2", "--round", "4"])
    finally:
        os.chdir(ROOT)
    err = capsys.readouterr().err.strip()
    assert code == 2 and err == (f"autofinetune: error: {run_dir.path}: round1/trial-0.json, round1/trial-1.json "
                                 "of finished rounds are missing; the run dir is the record of the search: "
                                 "restore them from a backup, or start over with a new --output-dir")
    assert run_dir.read_state() == state and not run_dir.round_dir(1).exists()


def _finished_search(toy, rounds: int) -> RunDir:
    """A search that ran all its rounds, written by the plain layer (no trial, no Prefect)."""
    run_dir, _ = fresh_run(toy, popsize=2, rounds=rounds)
    for k in range(rounds):
        records = []
        for i, params in enumerate(propose(run_dir, k)):
            run_dir.model_dir(k, i).mkdir(parents=True)
            records.append({"round": k, "candidate": i, "params": params, "score": 0.25 * i + k,
                            "outcome": "ok", "saved_params_dir": str(run_dir.model_dir(k, i)), "parent": None})
            run_dir.write_trial(records[-1])
        tell_round(run_dir, k, records)
    return run_dir


def test_the_log_file_is_updated_from_the_new_rounds_records_only(toy):
    run_dir, _ = fresh_run(toy, popsize=3, rounds=3)
    for k in range(3):
        records = []
        for i, params in enumerate(propose(run_dir, k)):
            run_dir.model_dir(k, i).mkdir(parents=True)
            outcome = "crashed" if (k, i) == (1, 0) else "ok"
            records.append({"round": k, "candidate": i, "params": params, "score": [0.5, 0.9, 0.1][i] - k * 0.3,
                            "outcome": outcome, "saved_params_dir": str(run_dir.model_dir(k, i)), "parent": None})
            run_dir.write_trial(records[-1])
        tell_round(run_dir, k, records)
        best = record_best(run_dir, ["x", "n"], final=False)
        assert (best["round"], best["candidate"]) == (0, 1)
    incremental = run_dir.log_file.read_text()
    run_dir.write_log_file(["x", "n"], run_dir.trials(), final=False)  # from every record
    assert run_dir.log_file.read_text() == incremental
    assert run_dir.kept_log_rows(["x", "n"], 3, 3)[1] == 3 and run_dir.kept_log_rows(["x", "n"], 3, 2)[1] == 2
    run_dir.trial_path(0, 2).unlink()  # an earlier round's record is not read again ...
    assert record_best(run_dir, ["x", "n"], final=True)["candidate"] == 1
    assert run_dir.log_file.read_text().startswith("The final best hyperparameters:")
    run_dir.log_file.write_text("edited by hand\n")  # ... unless the file is not as written
    assert run_dir.kept_log_rows(["x", "n"], 3, 3) == ([], 0)
    record_best(run_dir, ["x", "n"], final=True)  # from every record again: the removed one is gone
    assert len(run_dir.log_file.read_text().splitlines()) == 5 + 1 + 8


_CLI_NOTING_PREFECT = ("import sys\nfrom flows.cli import main\ncode = main(sys.argv[1:])\n"
                       "print('prefect imported:', any(m.split('.')[0] == 'prefect' for m in sys.modules))\n"
                       "sys.exit(code)\n")


def test_the_command_of_a_finished_search_answers_from_the_run_dir_without_prefect(toy):
    run_dir = _finished_search(toy, rounds=2)
    env = dict(os.environ, PYTHONPATH=str(ROOT), PREFECT_API_URL="http://127.0.0.1:9/api")  # nothing there
    command = [sys.executable, "-c", _CLI_NOTING_PREFECT, "train.py", "--output-dir", "out", "--popsize", "2"]
    done = subprocess.run(command + ["--round", "2"], cwd=toy, env=env, capture_output=True, text=True)
    assert done.returncode == 0, done.stderr
    best = run_dir.read_trial(1, 1)
    assert done.stdout.splitlines() == [
        "The final best hyperparameters:", *(f"{n}={best['params'][n]}" for n in ("x", "n")),
        "The final best eval score is 1.25.",
        f"The final best model parameters are saved as {run_dir.best_model} .", "prefect imported: False"]
    assert "already ran its 2 rounds; raise --round to extend it" in done.stderr
    assert run_dir.log_file.read_text().startswith("The final best hyperparameters:")  # finished on disk
    assert run_dir.best_model.is_dir() and VisualDLLogs(run_dir.visualization).rounds_written == 2
    # The same validation as a resume: another search is refused; a raised --round resumes (with
    # Prefect: its API here does not answer, so the run says it could not run).
    other = subprocess.run(command + ["--round", "2", "--tuning-strategy", "pshe2"], cwd=toy, env=env,
                           capture_output=True, text=True)
    assert other.returncode == 2 and "--tuning-strategy was hazero, now pshe2" in other.stderr
    more = subprocess.run(command + ["--round", "3"], cwd=toy, env=env, capture_output=True, text=True)
    assert more.returncode == 3 and "prefect imported: True" in more.stdout, more.stderr
    assert run_dir.read_state().next_round == 2


def test_a_resume_with_another_search_says_what_differs(toy):
    run_dir, state = fresh_run(toy)
    other = settings_for(toy, popsize=4, tuning_strategy="pshe2").search
    with pytest.raises(SearchMismatchError) as err:
        check_resume(state, other, run_dir.state_path)
    assert "--tuning-strategy was hazero, now pshe2; --popsize was 5, now 4" in str(err.value)
    check_resume(state, dataclasses.replace(state.search, seed=None), run_dir.state_path)  # seed omitted: fine


# -- a task in a process that set nothing up ------------------------------------------------

def test_train_candidate_runs_in_a_fresh_process_without_any_flow_set_up(toy, prefect_server):
    run_dir, _ = fresh_run(toy, popsize=2)
    code = ("import json, sys\n"
            "from runtime.slots import SlotPool, Slot\n"
            "from tasks.steps import train_candidate\n"
            f"record = train_candidate({str(run_dir.path)!r}, 0, 1, {{'x': 0.25, 'n': 3}}, None, "
            "SlotPool([Slot(index=0, gpu=None)]))\n"
            "print('RECORD' + json.dumps(record))\n")
    with run_dir.lock():  # the search, in another process, holds the run dir
        done = subprocess.run([PY, "-c", code], cwd=toy, env=dict(prefect_server, PYTHONPATH=str(ROOT)),
                              capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr[-3000:]
    record = json.loads(done.stdout.split("RECORD", 1)[1])
    assert record["outcome"] == "ok" and record["params"] == {"x": 0.25, "n": 3}
    assert record["score"] == pytest.approx(-(0.25 - 0.3) ** 2 - (3 - 4) ** 2 / 100 + 0.01)
    assert json.loads(run_dir.trial_path(0, 1).read_text()) == record


def test_help_and_bad_input_answer_without_importing_prefect(toy):
    code = ("import sys\nfrom flows.cli import main\n"
            "try:\n    main(['--help'])\nexcept SystemExit as e:\n    assert e.code == 0\n"
            "print('codes', main(['nope.py']), main(['train.py', '--popsize', '0']))\n"
            "assert 'prefect' not in sys.modules and 'scipy' not in sys.modules, sorted(sys.modules)\n")
    done = subprocess.run([PY, "-c", code], cwd=toy, env=dict(os.environ, PYTHONPATH=str(ROOT)),
                          capture_output=True, text=True, timeout=60)
    assert done.returncode == 0, done.stderr[-2000:]
    assert "usage: python -m flows.autofinetune" in done.stdout and "codes 2 2" in done.stdout
    assert done.stderr.splitlines() == [
        f"autofinetune: error: nope.py: no such file (looked in {toy}); pass the training script as the "
        "first argument, e.g. `python -m flows.autofinetune train.py ...`",
        "autofinetune: error: --popsize must be an integer >= 1, got 0"]
    assert not any(p.name.startswith("output_") for p in toy.iterdir())


# -- Dask placement, as plain functions -----------------------------------------------------

def test_what_a_trial_asks_a_dask_cluster_for():
    from runtime.cluster import trial_resources

    gpu = {"tcp://a:1": {"resources": {"GPU": 1}}, "tcp://b:1": {"resources": {}}}
    assert trial_resources(gpu, 1) == {"GPU": 1.0} and trial_resources(gpu, 4) == {"GPU": 0.25}
    assert trial_resources({"tcp://a:1": {"resources": {"slot": 2}}}, 1) == {"slot": 1}
    assert trial_resources({"tcp://a:1": {}}, 1) is None  # one trial per worker thread


def test_the_run_dir_probe_says_what_a_worker_cannot_see(tmp_path, monkeypatch):
    from types import SimpleNamespace

    from runtime.cluster import probe_run_dir

    worker = SimpleNamespace(address="tcp://127.0.0.1:9")
    (tmp_path / "train.py").write_text("")
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "3")
    found = probe_run_dir(str(tmp_path), "tok", str(tmp_path / "train.py"), dask_worker=worker)
    assert found["error"] is None and found["gpu"] == "3" and found["worker"] == "tcp://127.0.0.1:9"
    assert Path(found["probe"]).read_text() == "tcp://127.0.0.1:9"
    missing = probe_run_dir(str(tmp_path / "nope"), "tok", str(tmp_path / "train.py"), dask_worker=worker)
    assert missing["error"] == f"the run dir {tmp_path / 'nope'} does not exist there"
    no_script = probe_run_dir(str(tmp_path), "tok", str(tmp_path / "other.py"), dask_worker=worker)
    assert no_script["error"] == f"the script {tmp_path / 'other.py'} is not there"


@pytest.mark.parametrize("options, says", [
    ({"dask_address": "10.0.0.1:8786"}, "--dask-address '10.0.0.1:8786' is not a Dask scheduler address"),
    ({"dask_local": 0}, "--dask-local must be an integer >= 1, got 0"),
])
def test_dask_options_are_checked(options, says):
    with pytest.raises(OptionError) as err:
        check_all(options)
    assert says in str(err.value)


def test_dask_settings(toy):
    s = settings_for(toy, dask_local=3, trials_per_gpu=2)
    assert s.cluster.local_workers == 3 and s.slots == [] and s.trials_per_gpu == 2
    with pytest.raises(SettingsError, match="either --dask-address .* or --dask-local N, not both"):
        settings_for(toy, dask_local=3, dask_address="tcp://127.0.0.1:8786")
    with pytest.raises(SettingsError, match="--gpu picks this host's GPUs"):
        settings_for(toy, dask_local=3, gpu="0")


def test_a_slot_describes_where_it_is():
    assert Slot(index=1, gpu=None).describe() == "cpu-slot 1"
    assert Slot(index=0, gpu="2", ordinal=1).describe() == "gpu 2 (place 1)"
    assert Slot(index=0, gpu="1,2,0", worker="tcp://h:1").describe() == "gpu 1,2,0 of worker tcp://h:1"
    assert Slot(index=0, gpu="1,2,0", worker="tcp://h:1").lock_name == "gpu-1.0.lock"
    assert Slot(index=0, gpu=None, worker="tcp://h:1").describe() == "worker tcp://h:1"


def test_a_trial_whose_workers_keep_dying_is_recorded_worker_lost_after_one_retry(toy):
    import logging

    from runtime.atomic_files import write_json_atomic
    from runtime.search import run_candidate
    from runtime.slots import SlotPool

    run_dir, _ = fresh_run(toy, popsize=1)
    run_dir.round_dir(0).mkdir()
    write_json_atomic(run_dir.lost_path(0, 0), [{"worker": "tcp://w1:1", "host": "elsewhere"}])
    run_dir.pid_path(0, 0).write_text(json.dumps({"pid": 1, "start": "0", "host": "elsewhere",
                                                  "worker": "tcp://w2:1"}))  # the second loss
    pool = SlotPool([Slot(index=0, gpu=None)])
    record = run_candidate(run_dir, 0, 0, {"x": 0.0, "n": 1}, None, pool, logging.getLogger("test"))
    assert record["outcome"] == "worker_lost" and record["lost_workers"] == ["tcp://w1:1", "tcp://w2:1"]
    assert record["error"] == "its Dask worker died 2 times (tcp://w1:1, tcp://w2:1)"
    assert json.loads(run_dir.trial_path(0, 0).read_text()) == record
    assert not run_dir.pid_path(0, 0).exists() and not run_dir.lost_path(0, 0).exists()
    assert not (run_dir.round_dir(0) / "log-0.info").exists()  # nothing was launched


def test_a_trial_task_that_outlived_its_search_launches_nothing_and_a_running_trial_stops_with_it(toy):
    """On Dask, a task cancelled at a stop may reach its launch after the search exited and
    removed its .stop: with no live search holding the run dir, nothing may be launched."""
    import logging

    from conftest import pid_alive
    from runtime.search import run_candidate
    from runtime.slots import SlotPool

    run_dir, _ = fresh_run(toy, popsize=1, extras=["sleep", "60"])
    pool, log, params = SlotPool([Slot(index=0, gpu=None)]), logging.getLogger("test"), {"x": 0.0, "n": 1}
    assert run_dir.live_token() is None and not run_dir.stop.is_set()
    record = run_candidate(run_dir, 0, 0, params, None, pool, log)  # no search holds the dir
    assert record["outcome"] == "interrupted" and record["error"] == "stopped before launch"
    assert not run_dir.pid_path(0, 0).exists() and not run_dir.trial_path(0, 0).exists()
    holder = subprocess.Popen([sys.executable, "-c", "import sys\nfrom runtime.rundir import RunDir\n"
                               f"with RunDir({str(run_dir.path)!r}).lock():\n"
                               "    print('held', flush=True)\n    sys.stdin.readline()"],
                              cwd=ROOT, stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
    result: dict = {}
    try:
        assert holder.stdout.readline().strip() == "held"
        token = run_dir.live_token()
        assert token and token.startswith(f"{holder.pid}@")
        runner = threading.Thread(target=lambda: result.update(run_candidate(run_dir, 0, 0, params, None, pool, log)))
        runner.start()
        deadline = time.monotonic() + 30
        while not run_dir.pid_path(0, 0).exists() and time.monotonic() < deadline:
            time.sleep(0.05)
        pid = json.loads(run_dir.pid_path(0, 0).read_text())["pid"]  # launched: a live search holds the dir
    finally:
        holder.communicate("\n", timeout=30)  # that search ends (without setting .stop)
    assert run_dir.live_token() is None
    runner.join(timeout=20)
    assert not runner.is_alive() and result["outcome"] == "interrupted", result
    assert not pid_alive(pid)


def test_the_live_token_names_the_holder_and_a_new_search_replaces_a_killed_ones(tmp_path, monkeypatch):
    from runtime.rundir import TrialStop

    monkeypatch.setattr(TrialStop, "LIVE_CHECK_S", 0.0)  # look at every call
    run_dir = RunDir(tmp_path)
    with run_dir.lock():
        first = run_dir.live_token()
        assert first and first.startswith(f"{os.getpid()}@{os.uname().nodename} ")
    assert run_dir.live_token() is None  # released: no live search
    run_dir.live_path.write_text("123@elsewhere deadbeef\n")  # a SIGKILLed holder's leftover
    stop = TrialStop(run_dir)  # a task of that search, created before the new one started
    assert not stop.is_set()
    with run_dir.lock():
        assert run_dir.live_token() not in (None, first, "123@elsewhere deadbeef")
        assert stop.is_set()  # another search holds the dir now: that task stops


def test_a_log_tail_never_carries_control_characters_to_the_terminal(tmp_path):
    from runtime.trial import log_tail

    (tmp_path / "log").write_bytes(b"epoch 1\x1b[31m red\x1b[0m\rdone\tok\nlast\x07\n")
    assert log_tail(tmp_path / "log") == "epoch 1?[31m red?[0m\ndone\tok\nlast?"  # \r ends a line too


def test_the_default_run_dir_is_never_an_existing_one(toy):
    from datetime import datetime

    started = datetime(2026, 11, 30, 12, 0, 0)
    first = resolve_settings(cwd=str(toy), started=started).output_dir
    assert first == toy / "output_20261130120000"
    first.mkdir()  # another search started in the same second
    assert resolve_settings(cwd=str(toy), started=started).output_dir == toy / "output_20261130120000-2"
    scheduled = resolve_settings(cwd=str(toy), output_root="nightly", started=started).output_dir
    assert scheduled == toy / "nightly" / "output_20261130120000"  # a retry resumes its slot's dir
