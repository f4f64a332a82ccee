"""The Prefect tasks of a search round: each one plain data in, one call into ``runtime``, a record out.

They take the run dir's path, round and candidate numbers, JSON-able records and, for
``train_candidate``, the ``Placement`` that hands out slots; they read no module globals,
so the same task runs on a thread of the flow's process or in another process. The tuner
lives in ``state.json`` between steps, never in a task argument. Task names are the design
card's; the Python names say what each does.
"""

from __future__ import annotations

from prefect import get_run_logger, task
from prefect.cache_policies import NO_CACHE
from prefect.states import Completed, State

from runtime.rundir import RunDir
from runtime.search import finish_round, plan_next_parents, run_candidate
from runtime.slots import Placement
from runtime.state import Parent, ParentPlan

__all__ = ["train_candidate", "tell_tuner", "plan_parents_and_prune"]


@task(name="train_candidate", cache_policy=NO_CACHE)
def train_candidate(output_dir: str, k: int, i: int, params: dict, parent: Parent | None,
                    placement: Placement) -> dict | State:
    """Run candidate i of round k on the next free slot and record its outcome. A trial stopped
    early ends the task run in the state "Pruned" (a Completed state), with the reason."""
    record = run_candidate(RunDir(output_dir), k, i, params, parent, placement, get_run_logger())
    if record["outcome"] == "pruned":
        return Completed(name="Pruned", data=record, message=record["error"])
    return record


@task(name="update_tuner", cache_policy=NO_CACHE)
def tell_tuner(output_dir: str, k: int, records: list[dict], names: list[str]) -> dict | None:
    """Tell the tuner round k's scores from the records its trials returned, then bring
    best_model/ and log_file.txt up to date; the best trial so far. (One task, not two: each
    task run costs the round ~15-25 ms of Prefect's engine.)"""
    return finish_round(RunDir(output_dir), k, records, names)


@task(name="select_and_copy_checkpoints", cache_policy=NO_CACHE)
def plan_parents_and_prune(output_dir: str, k: int) -> ParentPlan | None:
    """Decide round k+1's parent checkpoints (a pure plan, see runtime.population), log it,
    and with ``--keep-checkpoints needed`` delete model dirs no longer needed.

    Nothing is copied (the task keeps the original's name): each child gets
    ``--model_path=<parent's model dir>`` to read from and a fresh ``--saved_params_dir``.
    """
    plan = plan_next_parents(RunDir(output_dir), k)
    if plan is not None:
        logger = get_run_logger()
        for i, parent in enumerate(plan.assignment):
            logger.info("round %d candidate %d continues from %s", k + 1, i,
                        parent.name if parent else "scratch (no successful parent yet)")
    return plan
