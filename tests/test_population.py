"""Population-Based evaluation: the pure parent plan, and a real checkpointing search."""

from __future__ import annotations

import json

import pytest

from tasks.population import plan_parents


def rec(i, score, outcome="ok", k=0):
    return {"round": k, "candidate": i, "outcome": outcome, "score": score if outcome == "ok" else None,
            "saved_params_dir": f"/out/round{k}/model-{i}"}


def names(plan):
    return [p["name"] if p else None for p in plan["assignment"]]


def test_best_half_of_successful_trials_round_robin_in_rank_order():
    records = [rec(0, 0.1), rec(1, 0.9), rec(2, -5.0), rec(3, 0.5), rec(4, 0.7), rec(5, None, "crashed")]
    plan = plan_parents(records, popsize=6, has_checkpoint=[True] * 6, previous=None)
    # 5 successful -> best 2 by score: candidate 1 (0.9), candidate 4 (0.7)
    assert [p["candidate"] for p in plan["parents"]] == [1, 4]
    assert names(plan) == ["round0/model-1", "round0/model-4"] * 3
    assert plan["parents"][0]["model_path"] == "/out/round0/model-1"


def test_failures_and_missing_checkpoints_are_never_parents():
    records = [rec(0, 0.9, "crashed"), rec(1, 0.8), rec(2, 0.7), rec(3, 0.1, "timeout")]
    plan = plan_parents(records, popsize=4, has_checkpoint=[True, False, True, True], previous=None)
    assert [p["candidate"] for p in plan["parents"]] == [2]  # at least one
    assert names(plan) == ["round0/model-2"] * 4


def test_a_failed_round_keeps_the_previous_parents_or_starts_from_scratch():
    earlier = plan_parents([rec(0, 0.5), rec(1, 0.6)], popsize=2, has_checkpoint=[True, True], previous=None)
    failed = [rec(0, None, "crashed", k=1), rec(1, None, "no_result", k=1), rec(2, None, "killed", k=1)]
    plan = plan_parents(failed, popsize=3, has_checkpoint=[True] * 3, previous=earlier["parents"])
    assert names(plan) == ["round0/model-1"] * 3
    scratch = plan_parents(failed, popsize=3, has_checkpoint=[True] * 3, previous=None)
    assert scratch["assignment"] == [None, None, None] and scratch["parents"] == []


def test_ties_rank_by_candidate_number():
    plan = plan_parents([rec(0, 0.5), rec(1, 0.5), rec(2, 0.5), rec(3, 0.5)], popsize=3,
                        has_checkpoint=[True] * 4, previous=None)
    assert [p["candidate"] for p in plan["parents"]] == [0, 1]
