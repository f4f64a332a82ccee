"""Population-Based evaluation: the pure parent plan, and a real checkpointing search."""

from __future__ import annotations

import asyncio
import json

import pytest

from runtime.population import plan_parents


def rec(i, score, outcome="ok", k=0):
    return {"round": k, "candidate": i, "outcome": outcome, "score": score if outcome == "ok" else None,
            "saved_params_dir": f"/out/round{k}/model-{i}"}


def names(plan):
    return [p.name if p else None for p in plan.assignment]


def test_best_half_of_successful_trials_round_robin_in_rank_order():
    records = [rec(0, 0.1), rec(1, 0.9), rec(2, -5.0), rec(3, 0.5), rec(4, 0.7), rec(5, None, "crashed")]
    plan = plan_parents(records, round=1, popsize=6, has_checkpoint=[True] * 6, previous=None)
    # 5 successful -> best 2 by score: candidate 1 (0.9), candidate 4 (0.7)
    assert [p.candidate for p in plan.parents] == [1, 4]
    assert names(plan) == ["round0/model-1", "round0/model-4"] * 3
    assert plan.parents[0].model_path == "/out/round0/model-1"


def test_failures_and_missing_checkpoints_are_never_parents():
    records = [rec(0, 0.9, "crashed"), rec(1, 0.8), rec(2, 0.7), rec(3, 0.1, "timeout")]
    plan = plan_parents(records, round=1, popsize=4, has_checkpoint=[True, False, True, True], previous=None)
    assert [p.candidate for p in plan.parents] == [2]  # at least one
    assert names(plan) == ["round0/model-2"] * 4


def test_a_trial_stopped_early_is_never_a_parent():
    records = [rec(0, None, "pruned"), rec(1, 0.2), rec(2, 0.1), rec(3, None, "pruned")]
    plan = plan_parents(records, round=1, popsize=4, has_checkpoint=[True] * 4, previous=None)
    assert [p.candidate for p in plan.parents] == [1]


def test_a_failed_round_keeps_the_previous_parents_or_starts_from_scratch():
    earlier = plan_parents(round=1, records=[rec(0, 0.5), rec(1, 0.6)], popsize=2, has_checkpoint=[True, True], previous=None)
    failed = [rec(0, None, "crashed", k=1), rec(1, None, "no_result", k=1), rec(2, None, "killed", k=1)]
    plan = plan_parents(failed, round=2, popsize=3, has_checkpoint=[True] * 3, previous=earlier.parents)
    assert names(plan) == ["round0/model-1"] * 3
    scratch = plan_parents(failed, round=2, popsize=3, has_checkpoint=[True] * 3, previous=None)
    assert scratch.assignment == (None, None, None) and scratch.parents == ()


def test_ties_rank_by_candidate_number():
    plan = plan_parents(round=1, records=[rec(0, 0.5), rec(1, 0.5), rec(2, 0.5), rec(3, 0.5)], popsize=3,
                        has_checkpoint=[True] * 4, previous=None)
    assert [p.candidate for p in plan.parents] == [0, 1]


# -- a real Population-Based search: checkpoints on disk, the CLI in-process -------------

def run_pbt(toy, monkeypatch, *args):
    from flows.cli import main

    monkeypatch.chdir(toy)
    return main(["train.py", "--param-file", "hparam.yaml", "--popsize", "4", "--round", "3",
                 "--cpu-slots", "2", "--seed", "5", "--output-dir", "out", *args])


def load_trials(out, rounds=3, popsize=4):
    return [[json.loads((out / f"round{k}" / f"trial-{i}.json").read_text()) for i in range(popsize)]
            for k in range(rounds)]


@pytest.mark.usefixtures("prefect_api", "lock_dir")
def test_population_based_children_continue_from_the_best_half(toy, monkeypatch):
    crash = {"r0c0": "crash", "r1c2": "crash"}
    assert run_pbt(toy, monkeypatch, "plan", json.dumps(crash)) == 0  # default evaluator: PBT
    out = toy / "out"
    records = load_trials(out)
    for r in records[0]:
        assert r["parent"] is None and r["model_path"] is None
        assert not any(a.startswith(("--model_path", "--epochs")) for a in r["argv"])
    for k in (1, 2):
        ok = sorted((r for r in records[k - 1] if r["outcome"] == "ok"),
                    key=lambda r: (-r["score"], r["candidate"]))
        parents = ok[:max(1, len(ok) // 2)]
        for i, r in enumerate(records[k]):
            p = parents[i % len(parents)]
            assert r["parent"] == f"round{k - 1}/model-{p['candidate']}"
            assert r["model_path"] == p["saved_params_dir"] != r["saved_params_dir"]
            assert f"--model_path={p['saved_params_dir']}" in r["argv"] and "--epochs=1" in r["argv"]
    assert all(r["parent"] != "round0/model-0" for r in records[1])  # crashed: never a parent
    assert all(r["parent"] != "round1/model-2" for r in records[2])
    # Parents' checkpoints were only read: each still holds what its own trial wrote.
    for row in records:
        for r in row:
            if r["outcome"] == "ok":
                w = json.loads((out / f"round{r['round']}" / f"model-{r['candidate']}" / "weights.json").read_text())
                assert (w["round"], w["candidate"]) == (r["round"], r["candidate"])
    # Lineage: from best_model back to round 0 through the recorded parents.
    state = json.loads((out / "state.json").read_text())
    best = records[state["best"]["round"]][state["best"]["candidate"]]
    chain, r = [], best
    while r is not None:
        chain.append(f"r{r['round']}c{r['candidate']}")
        parent = r["parent"]
        r = None if parent is None else records[int(parent[5])][int(parent.rsplit("-", 1)[1])]
    assert json.loads((out / "best_model" / "weights.json").read_text())["lineage"] == chain[::-1]
    log = (out / "log_file.txt").read_text()
    assert f"\t{best['round']}\t{best['candidate']}\tok\t{best['parent'] or '-'}\n" in log
    # Continuing training pays: the best of the last round beats the best of the first.
    assert max(r["score"] for r in records[2] if r["outcome"] == "ok") > \
        max(r["score"] for r in records[0] if r["outcome"] == "ok")


@pytest.mark.usefixtures("prefect_api", "lock_dir")
def test_continued_trials_receive_the_pbt_epochs(toy, monkeypatch):
    """End to end once; every --pbt-epochs / epochs-extra case is a unit test of trial_spec
    (tests/test_runtime.py)."""
    assert run_pbt(toy, monkeypatch, "--round", "2", "--pbt-epochs", "3") == 0
    rounds = load_trials(toy / "out", rounds=2)
    assert all(not any(a.startswith("--epochs") for a in r["argv"]) for r in rounds[0])
    for r in rounds[1]:
        assert [a for a in r["argv"] if a.startswith("--epochs")] == ["--epochs=3"]
        assert "epochs=3" in (toy / "out" / "round1" / f"log-{r['candidate']}.info").read_text()


@pytest.mark.usefixtures("prefect_api", "lock_dir")
def test_keep_checkpoints_needed_keeps_exactly_live_parents_and_best_model(toy, monkeypatch):
    assert run_pbt(toy, monkeypatch, "--keep-checkpoints", "needed") == 0
    out = toy / "out"
    state = json.loads((out / "state.json").read_text())
    live = {p["model_path"] for p in state["plan"]["parents"]}
    assert state["plan"]["round"] == 3 and len(live) == 2
    assert {str(p) for p in out.glob("round*/model-*")} == live
    assert (out / "best_model" / "weights.json").is_file()
    assert len(list(out.glob("round*/trial-*.json"))) == 12  # the records all stay


@pytest.mark.usefixtures("prefect_api", "lock_dir")
def test_trial_retries_rerun_signal_kills_only(toy, monkeypatch):
    plan = {"r0c1": "sigkill_once", "r0c2": "crash"}
    assert run_pbt(toy, monkeypatch, "--round", "1", "--trial-retries", "1", "plan", json.dumps(plan)) == 0
    killed_once, crashed = load_trials(toy / "out", rounds=1)[0][1:3]
    assert (killed_once["outcome"], killed_once["attempts"], killed_once["retried_after"]) == ("ok", 2, ["killed"])
    assert (crashed["outcome"], crashed["attempts"]) == ("crashed", 1)
    assert "attempt 1 killed" in (toy / "out" / "round0" / "log-1.info").read_text()


@pytest.mark.usefixtures("prefect_api", "lock_dir")
def test_a_prefect_retry_of_the_flow_resumes_from_the_run_dir(toy, monkeypatch):
    from flows.autofinetune import autofinetune

    events = toy / "events.txt"
    monkeypatch.chdir(toy)
    monkeypatch.setenv("AUTOFINETUNE_KILL_AT", "round_told#2:raise")  # round 1's update fails once
    state = autofinetune.with_options(retries=1, retry_delay_seconds=0)(
        script="train.py", param_file="hparam.yaml", popsize=4, rounds=3, cpu_slots=2, seed=5,
        output_dir=str(toy / "out"), extras=["events", str(events)], return_state=True)
    assert state.is_completed() and state.result()["best_score"] is not None

    from prefect.client.orchestration import get_client

    async def run_count():
        async with get_client() as client:
            return (await client.read_flow_run(state.state_details.flow_run_id)).run_count

    assert asyncio.run(run_count()) == 2  # the first attempt failed, Prefect retried it
    starts = [tuple(line.split()[3:5]) for line in events.read_text().splitlines() if line.startswith("start")]
    assert sorted(starts) == sorted({(str(k), str(i)) for k in range(3) for i in range(4)})  # none re-run
    assert json.loads((toy / "out" / "state.json").read_text())["next_round"] == 3
