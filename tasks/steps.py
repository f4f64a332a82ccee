"""The Prefect tasks of a search round: thin wrappers that call ``tasks.search``/``tasks.trial``.

They pass small plain data (the output dir, round and candidate numbers, JSON dicts); the
tuner lives in ``state.json`` between steps, never in a task argument. The in-process
pieces a task cannot receive as data, the slot pool and the stop flag, are looked up by
output dir here.
"""

from __future__ import annotations

import threading

from prefect import get_run_logger, task
from prefect.cache_policies import NO_CACHE

from tasks.kill_points import kill_point
from tasks.rundir import RunDir
from tasks.search import (finished_trial, propose, record_best, select_parents, tell_round,
                          trial_spec)
from tasks.slots import SlotPool, SlotWaitInterrupted
from tasks.trial import crash_warning, log_tail, run_trial
from tasks.watch import notify

__all__ = ["STOP", "open_slot_pool", "close_slot_pool", "propose_candidates", "train_candidate",
           "update_tuner", "record_round", "select_and_copy_checkpoints"]

STOP = threading.Event()  # set by the CLI's SIGINT/SIGTERM handler: launch nothing more
_POOLS: dict[str, SlotPool] = {}


def open_slot_pool(output_dir: str, pool: SlotPool) -> None:
    _POOLS[str(RunDir(output_dir).path)] = pool


def close_slot_pool(output_dir: str) -> None:
    _POOLS.pop(str(RunDir(output_dir).path), None)


@task(name="propose_candidates", cache_policy=NO_CACHE)
def propose_candidates(output_dir: str, k: int) -> list[dict]:
    return propose(RunDir(output_dir), k)


@task(name="train_candidate", cache_policy=NO_CACHE)
def train_candidate(output_dir: str, k: int, i: int, params: dict,
                    parent: dict | None = None) -> dict:
    """Run candidate i of round k on the next free slot and record its outcome."""
    logger = get_run_logger()
    run_dir = RunDir(output_dir)
    done = finished_trial(run_dir, k, i)
    if done is not None:
        logger.info("already finished in an earlier run: %s, score %s", done["outcome"], done["score"])
        return done
    spec = trial_spec(run_dir, run_dir.read_state(), k, i, params, parent)
    pool = _POOLS[str(run_dir.path)]
    try:
        with pool.acquire(STOP) as slot:
            logger.info("running on %s: %s", slot.describe(),
                        " ".join(f"--{n}={v}" for n, v in spec.flags))
            if parent is not None:
                logger.info("continues from parent checkpoint %s", parent["name"])
            notify(output_dir, "trial_started", k, i, {"index": slot.index, "gpu": slot.gpu}, params)
            record = run_trial(spec, slot, stop=STOP)
            notify(output_dir, "trial_finished", record)
    except SlotWaitInterrupted:
        return {"round": k, "candidate": i, "params": params, "outcome": "interrupted",
                "score": None, "error": "stopped before launch"}
    run_dir.write_trial(record)
    kill_point("trial_recorded")
    tail = log_tail(spec.log_path)
    if record["outcome"] == "ok":
        logger.info("score %s in %.1fs\n%s", record["score"], record["duration_s"], tail)
    elif record["outcome"] != "interrupted":
        warning = crash_warning(record)
        print(warning, flush=True)
        logger.warning("%s\n%s", warning, tail)
    return record


@task(name="update_tuner", cache_policy=NO_CACHE)
def update_tuner(output_dir: str, k: int) -> list[dict]:
    return tell_round(RunDir(output_dir), k)


@task(name="record_round", cache_policy=NO_CACHE)
def record_round(output_dir: str, names: list[str], final: bool = False) -> dict | None:
    return record_best(RunDir(output_dir), names, final=final)


@task(name="select_and_copy_checkpoints", cache_policy=NO_CACHE)
def select_and_copy_checkpoints(output_dir: str, k: int) -> dict | None:
    """Decide round k+1's parent checkpoints (a pure plan, see tasks.population) and log it.

    Nothing is copied: each child gets ``--model_path=<parent's model dir>`` to read from
    and its own fresh ``--saved_params_dir`` to write to.
    """
    plan = select_parents(RunDir(output_dir), k)
    if plan is not None:
        logger = get_run_logger()
        for i, parent in enumerate(plan["assignment"]):
            logger.info("round %d candidate %d continues from %s", k + 1, i,
                        parent["name"] if parent else "scratch (no successful parent yet)")
    return plan
