"""Population-Based evaluation: which checkpoint each next candidate continues from.

A pure decision (like Ray Tune's ``_explore``): ``plan_parents`` takes a round's trial
records and returns the plan; the ``select_and_copy_checkpoints`` task only carries it out
and logs it. The rule:

- parents are the best half of the round's *successful* trials that left a checkpoint,
  ranked by score (at least one; ties by candidate number);
- candidate i of the next round continues from ``parents[i % len(parents)]``, which is
  deterministic (the original assigned parents in thread-completion order);
- a failed trial or a missing checkpoint is never a parent; when a whole round failed,
  the most recent successful parents carry over, and with none the next round starts
  from scratch.
"""

from __future__ import annotations

from runtime.rundir import trial_rank_key
from runtime.state import Parent, ParentPlan

__all__ = ["plan_parents"]


def plan_parents(records: list[dict], *, round: int, popsize: int, has_checkpoint: list[bool],
                 previous: tuple[Parent, ...] | None) -> ParentPlan:
    """Round ``round``'s plan: its parents, best first, and each candidate's parent (or None).

    ``records`` are the previous round's trial records; ``has_checkpoint[i]`` says whether
    candidate i's saved_params_dir exists and is not empty; ``previous`` is the parents
    of the plan before (used when no trial of this round can be a parent).
    """
    eligible = [r for r, ok in zip(records, has_checkpoint) if ok and r["outcome"] == "ok"]
    eligible.sort(key=trial_rank_key)
    if eligible:
        parents = tuple(Parent(name=f"round{r['round']}/model-{r['candidate']}",
                               model_path=r["saved_params_dir"], round=r["round"],
                               candidate=r["candidate"], score=r["score"])
                        for r in eligible[:max(1, len(eligible) // 2)])
    else:
        parents = tuple(previous or ())
    assignment = tuple(parents[i % len(parents)] if parents else None for i in range(popsize))
    return ParentPlan(round=round, parents=parents, assignment=assignment)

