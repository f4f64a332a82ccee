"""The subflow of one round: ask, fan out ``train_candidate`` onto the slots, gather, tell.

Prefect UI names: ``round-<k>`` for the subflow run, ``train-r<k>-c<i>`` for each trial.
The task runner has one worker per slot and every trial takes a slot the moment one
frees, so no slot idles while another trial of the round still runs (the original ran
waves of ``len(gpus)`` trials).
"""

from __future__ import annotations

from prefect import flow

from tasks.rundir import RunDir, trial_rank_key
from tasks.search import SearchInterrupted, parents_for
from tasks.steps import (STOP, propose_candidates, record_round, select_and_copy_checkpoints,
                         train_candidate, update_tuner)
from tasks.watch import notify

__all__ = ["search_round", "round_summary"]


def round_summary(k: int, records: list[dict], names: list[str]) -> str:
    """The original's per-round console lines, plus a count of failed trials."""
    ok = [r for r in records if r["outcome"] == "ok"]
    failed = len(records) - len(ok)
    if not ok:
        return f"All {len(records)} trials of the {k}-th round failed; see the warnings above."
    best = min(ok, key=trial_rank_key)
    lines = [f"The local best eval value in the {k}-th round is {best['score']}.",
             "The local best hyperparameters are as:"]
    lines += [f"{name}={best['params'][name]}" for name in names]
    if failed:
        lines.append(f"({failed} of {len(records)} trials of the {k}-th round failed.)")
    return "\n".join(lines)


@flow(name="search_round", flow_run_name="round-{k}")
def search_round(output_dir: str, k: int, names: list[str]) -> list[dict]:
    candidates = propose_candidates(output_dir, k)
    parents = parents_for(RunDir(output_dir).read_state(), k)
    futures = [train_candidate.with_options(task_run_name=f"train-r{k}-c{i}")
               .submit(output_dir, k, i, params, parents[i])
               for i, params in enumerate(candidates)]
    records = [future.result() for future in futures]
    if STOP.is_set() or any(r["outcome"] == "interrupted" for r in records):
        raise SearchInterrupted(f"stopped during round {k}")
    records = update_tuner(output_dir, k)
    best = record_round(output_dir, names)
    select_and_copy_checkpoints(output_dir, k)
    print(round_summary(k, records, names), flush=True)
    notify(output_dir, "round_finished", k, records, best)
    return records
