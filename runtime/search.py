"""The search's steps as plain functions over the run directory (the @tasks call these).

Everything a step needs is read from ``OUTPUT/state.json`` (a ``runtime.state.RunState``)
and the trial records, and everything it decides is written back before it returns, so any
step can be re-run after a kill: asking the tuner for round k twice returns the same
candidates, a finished trial is never run again, and telling round k happens exactly once.
"""

from __future__ import annotations

import shutil
from pathlib import Path

from runtime.early_stopping import Reference
from runtime.kill_points import kill_point
from runtime.population import plan_parents
from runtime.rundir import RunDir, TrialStop, trial_rank_key
from runtime.state import BestTrial, Parent, ParentPlan, RunOptions, RunState, SearchKey
from runtime.slots import Placement, SlotWaitInterrupted
from runtime.atomic_files import read_json, write_json_atomic
from runtime.trial import FINAL_OUTCOMES, TrialSpec, crash_warning, log_tail, reap_one, run_trial
from tuners import Pruned, SearchSpace, make_tuner

__all__ = ["SearchMismatchError", "SearchInterrupted", "new_state", "check_resume", "check_rounds_on_disk",
           "propose",
           "trial_spec", "finished_trial", "run_candidate", "tell_round", "record_best", "finish_round", "final_summary",
           "load_tuner", "plan_next_parents", "parents_for", "tuner_score"]


class SearchMismatchError(ValueError):
    """The output dir holds a different search than the one asked for."""


class SearchInterrupted(Exception):
    """The search was stopped (Ctrl-C, SIGTERM, a cancel) before a round finished."""


def new_state(search: SearchKey, rounds: int, run: RunOptions) -> RunState:
    """A fresh run state; ``search.seed`` must be set (the CLI draws one when none was given)."""
    return RunState(search=search, rounds=rounds, run=run, tuner=_new_tuner(search).state_dict())


def _new_tuner(search: SearchKey):
    return make_tuner(search.strategy, SearchSpace.from_dict(search.space), popsize=search.popsize,
                      seed=search.seed)


def check_resume(state: RunState, search: SearchKey, state_path: Path) -> None:
    """Refuse to mix two searches in one output dir: say exactly what differs."""
    old = state.search
    diffs = []
    for key, label in (("strategy", "--tuning-strategy"), ("evaluator", "--evaluator"),
                       ("popsize", "--popsize")):
        if getattr(old, key) != getattr(search, key):
            diffs.append(f"{label} was {getattr(old, key)}, now {getattr(search, key)}")
    if search.seed is not None and old.seed != search.seed:
        diffs.append(f"--seed was {old.seed}, now {search.seed}")
    if old.space != search.space:
        changed = _space_diff(old.space, search.space)
        diffs.append(f"the search space (--param-file) changed: {changed}")
    if diffs:
        raise SearchMismatchError(
            f"{state_path.parent}: holds a different search ({'; '.join(diffs)}); "
            "resume with the original settings or choose a new --output-dir")


def check_rounds_on_disk(run_dir: RunDir, state: RunState) -> None:
    """Refuse to resume a run dir that lost records of rounds the tuner was already told:
    going on would drop those results silently (and could replace best_model/ by a worse one)."""
    missing = [f"round{k}/trial-{i}.json" for k in range(state.next_round) for i in range(state.search.popsize)
               if not run_dir.trial_path(k, i).is_file()]
    if missing:
        shown = ", ".join(missing[:3]) + (f" and {len(missing) - 3} more" if len(missing) > 3 else "")
        raise SearchMismatchError(
            f"{run_dir.path}: {shown} of finished rounds are missing; the run dir is the record of the "
            "search: restore them from a backup, or start over with a new --output-dir")


def _space_diff(old: dict, new: dict) -> str:
    a = {p["name"]: p for p in old["param_list"]}
    b = {p["name"]: p for p in new["param_list"]}
    parts = [f"{n} removed" for n in a if n not in b] + [f"{n} added" for n in b if n not in a]
    parts += [f"{n} {a[n]} -> {b[n]}" for n in a if n in b and a[n] != b[n]]
    return ", ".join(parts) or "parameter order differs"


def load_tuner(state: RunState):
    tuner = _new_tuner(state.search)
    tuner.load_state_dict(state.tuner)
    return tuner


def propose(run_dir: RunDir, k: int) -> list[dict]:
    """Round k's candidates: asked once, persisted, and returned again on a re-run."""
    state = run_dir.read_state()
    tuner = load_tuner(state)
    if state.pending_round == k:
        return tuner.pending
    if state.next_round != k:
        raise RuntimeError(f"round {k} asked out of order (state is at round {state.next_round})")
    candidates = tuner.ask()
    state.tuner = tuner.state_dict()
    state.pending_round = k
    run_dir.write_state(state)
    return candidates


def finished_trial(run_dir: RunDir, k: int, i: int) -> dict | None:
    """Trial (k, i)'s record when it already reached a final outcome (a resumed run skips it)."""
    record = run_dir.read_trial(k, i)
    return record if record is not None and record["outcome"] in FINAL_OUTCOMES else None


def trial_spec(run_dir: RunDir, state: RunState, k: int, i: int, params: dict,
               parent: Parent | None = None) -> TrialSpec:
    """What trial (k, i) runs: its argv parts and files. Population-Based children get
    ``--model_path`` and ``--epochs=<pbt_epochs>``, unless an ``epochs`` extra is forwarded or
    ``epochs`` is itself searched (then it is the searched value, never overridden). With an
    early-stopping rule, the trial is judged against the curves of rounds 0..k-1."""
    run = state.run
    space = SearchSpace.from_dict(state.search.space)
    extras = [list(kv) for kv in run.extras]
    model_path = None
    if parent is not None:
        model_path = parent.model_path
        if run.pbt_epochs and "epochs" not in space.names and not any(key == "epochs" for key, _ in extras):
            extras.insert(0, ["epochs", str(run.pbt_epochs)])  # a forwarded epochs extra wins
    return TrialSpec(
        round=k, candidate=i, params=params,
        flags=[[name, space.format_value(name, params[name])] for name in space.names],
        python=run.python, script=run.script, cwd=run.cwd,
        saved_params_dir=str(run_dir.model_dir(k, i)), log_path=str(run_dir.log_path(k, i)),
        result_path=str(run_dir.result_path(k, i)), pid_path=str(run_dir.pid_path(k, i)),
        model_path=model_path, parent=None if parent is None else parent.name, extras=extras,
        timeout_s=run.trial_timeout, retries=run.trial_retries,
        report_path=str(run_dir.report_path(k, i)), prune_path=str(run_dir.prune_path(k, i)),
        should_stop_path=str(run_dir.should_stop_path(k, i)), early_stop=run.early_stop,
        reference=Reference.from_records(run_dir.trials(rounds=k)) if run.early_stop.enabled else Reference())


def run_candidate(run_dir: RunDir, k: int, i: int, params: dict, parent: Parent | None,
                  placement: Placement, logger) -> dict:
    """Run candidate i of round k on the next free slot of ``placement``, record its outcome
    in ``trial-<i>.json`` and return the record. A trial finished in an earlier run is not run
    again (its record is returned). A stop before launch (``run_dir.stop``, or its search no
    longer live: ``TrialStop``) returns an ``interrupted`` record, written nowhere. ``logger``:
    a ``logging.Logger``-like object.
    """
    done = finished_trial(run_dir, k, i)
    if done is not None:
        logger.info("already finished in an earlier run: %s, score %s", done["outcome"], done["score"])
        return done
    spec = trial_spec(run_dir, run_dir.read_state(), k, i, params, parent)
    lost = _worker_losses(run_dir, k, i, logger)
    if len(lost) > max(1, spec.retries):  # a lost worker is retried at least once
        record = {"round": k, "candidate": i, "params": params, "score": None, "outcome": "worker_lost",
                  "error": f"its Dask worker died {len(lost)} times ({', '.join(l['worker'] or '?' for l in lost)})",
                  "exit_code": None, "attempts": len(lost), "retried_after": ["worker_lost"] * (len(lost) - 1),
                  "saved_params_dir": spec.saved_params_dir, "model_path": spec.model_path,
                  "parent": spec.parent, "log": spec.log_path, "slot": None, "gpu": None, "worker": None}
    else:
        stop = TrialStop(run_dir)  # a task that outlived its search launches nothing
        try:
            with placement.acquire(stop) as slot:
                logger.info("running on %s: %s", slot.describe(), " ".join(f"--{n}={v}" for n, v in spec.flags))
                if parent is not None:
                    logger.info("continues from parent checkpoint %s", parent.name)
                record = run_trial(spec, slot, stop=stop)
        except SlotWaitInterrupted:
            return {"round": k, "candidate": i, "params": params, "outcome": "interrupted",
                    "score": None, "error": "stopped before launch"}
        if lost:
            record["attempts"] += len(lost)
            record["retried_after"] = ["worker_lost"] * len(lost) + record["retried_after"]
    if lost:
        record["lost_workers"] = [entry["worker"] for entry in lost]
    run_dir.write_trial(record)
    for done_with in (run_dir.lost_path(k, i), run_dir.prune_path(k, i)):
        done_with.unlink(missing_ok=True)
    kill_point("trial_recorded")
    tail = log_tail(spec.log_path)
    if record["outcome"] == "ok":
        logger.info("score %s in %.1fs\n%s", record["score"], record["duration_s"], tail)
    elif record["outcome"] == "pruned":
        logger.info("pruned after %.1fs: %s\n%s", record["duration_s"], record["error"], tail)
    elif record["outcome"] != "interrupted":
        logger.warning("%s\n%s", crash_warning(record), tail)
    if record.get("gpu_sampling_error"):
        logger.warning("GPU telemetry: %s", record["gpu_sampling_error"])
    return record


def _worker_losses(run_dir: RunDir, k: int, i: int, logger) -> list[dict]:
    """The attempts of trial (k, i) whose Dask worker died under them, this one included.

    A pid file still there when the trial's task starts means an earlier attempt of this
    very task was running when its worker went away (the scheduler then runs the task on
    another worker); a search's start reaps every other pid file. Its process group is
    killed when it runs on this host, so it cannot write into the model dir the re-run
    uses.
    """
    lost = read_json(run_dir.lost_path(k, i)) or []
    pid_path = run_dir.pid_path(k, i)
    if pid_path.exists():
        info = reap_one(pid_path)[0] or {}
        lost.append({"worker": info.get("worker"), "host": info.get("host")})
        write_json_atomic(run_dir.lost_path(k, i), lost)
        logger.warning("the worker %s running this trial was lost; running it again (attempt %d)",
                       info.get("worker"), len(lost) + 1)
    return lost


def tuner_score(record: dict) -> float | Pruned | None:
    """What the tuner is told of a trial: its score; ``Pruned(step, value)`` (its last reported
    point) for a trial stopped early; None for a failure, or for a pruned trial whose last
    value is not a finite number (training diverged)."""
    if record["outcome"] == "ok":
        return record["score"]
    if record["outcome"] == "pruned" and record.get("curve") and record["curve"][-1][1] is not None:
        step, value = record["curve"][-1]
        return Pruned(step=step, value=value)
    return None


def tell_round(run_dir: RunDir, k: int, records: list[dict]) -> list[dict]:
    """Tell the tuner round k's scores (``tuner_score``), as its trials returned them, and
    persist. Refuses a round with a trial that did not reach a final outcome."""
    state = run_dir.read_state()
    if len(records) != state.search.popsize or [r["candidate"] for r in records] != list(range(len(records))):
        raise ValueError(f"round {k}: expected the records of candidates 0..{state.search.popsize - 1} "
                         f"in order, got {[r.get('candidate') for r in records]}")
    unfinished = [i for i, r in enumerate(records) if r is None or r["outcome"] not in FINAL_OUTCOMES]
    if unfinished:
        raise SearchInterrupted(f"round {k}: trials {unfinished} did not finish")
    if state.next_round == k:  # not told yet (a re-run after a kill may find it told)
        tuner = load_tuner(state)
        tuner.tell([tuner_score(r) for r in records])
        state.tuner = tuner.state_dict()
        state.next_round = k + 1
        state.pending_round = None
        run_dir.write_state(state)
        kill_point("round_told")
    return records


def record_best(run_dir: RunDir, names: list[str], *, final: bool) -> dict | None:
    """Bring best_model/ and log_file.txt up to date with every told round; the best trial.

    Idempotent: a resume calls it first to finish what a kill interrupted.
    """
    run_dir.recover_best_model()
    state = run_dir.read_state()
    # Only the records of rounds log_file.txt lacks are read; the best of the others is state.best.
    rows, logged = run_dir.kept_log_rows(names, state.search.popsize, state.next_round)
    trials = run_dir.trials(rounds=state.next_round, first=logged)
    best_before = None
    if state.best is not None and state.best.round < logged:
        best_before = run_dir.read_trial(state.best.round, state.best.candidate)
    ok = [t for t in [*trials, *([best_before] if best_before else [])] if t["outcome"] == "ok"]
    best = min(ok, key=trial_rank_key) if ok else None
    if best is not None:
        key = BestTrial(round=best["round"], candidate=best["candidate"], score=best["score"])
        if state.best != key or not run_dir.best_model.is_dir():
            run_dir.replace_best_model(Path(best["saved_params_dir"]))
            state.best = key
            run_dir.write_state(state)
    run_dir.write_log_file(names, trials, final=final, kept=(rows, best_before))
    return best


def finish_round(run_dir: RunDir, k: int, records: list[dict], names: list[str]) -> dict | None:
    """Tell the tuner round k (``tell_round``), then bring best_model/ and log_file.txt up to
    date (``record_best``); the best trial so far. Both idempotent, so a re-run after a kill
    between them finishes the second."""
    tell_round(run_dir, k, records)
    return record_best(run_dir, names, final=False)


def final_summary(run_dir: RunDir, names: list[str], best: dict | None) -> tuple[str, dict]:
    """The search's last words in the original's wording, and the flow's result (a dict)."""
    if best is None:
        return (f"No trial produced a score; see the logs under {run_dir.path}.",
                {"output_dir": str(run_dir.path), "best_params": None, "best_score": None, "best_model": None})
    lines = ["The final best hyperparameters:", *(f"{name}={best['params'][name]}" for name in names),
             f"The final best eval score is {best['score']}.",
             f"The final best model parameters are saved as {run_dir.best_model} ."]
    return "\n".join(lines), {"output_dir": str(run_dir.path), "best_params": best["params"],
                              "best_score": best["score"], "best_model": str(run_dir.best_model),
                              "best_trial": {"round": best["round"], "candidate": best["candidate"]}}


def _has_checkpoint(path: Path) -> bool:
    return path.is_dir() and any(path.iterdir())


def plan_next_parents(run_dir: RunDir, k: int) -> ParentPlan | None:
    """After round k: decide which checkpoint each candidate of round k+1 continues from
    (Population-Based only), then delete the model dirs ``--keep-checkpoints needed`` does
    not keep. Copies nothing: a child reads its parent's dir through ``--model_path``.
    Idempotent: a resume re-runs it to finish what a kill interrupted; the plan is decided
    only once.
    """
    state = run_dir.read_state()
    popsize = state.search.popsize
    plan = state.plan
    if state.search.evaluator == "populationbased" and (plan is None or plan.round != k + 1):
        records = [run_dir.read_trial(k, i) for i in range(popsize)]
        has = [_has_checkpoint(Path(r["saved_params_dir"])) for r in records]
        plan = plan_parents(records, round=k + 1, popsize=popsize, has_checkpoint=has,
                            previous=plan.parents if plan else None)
        state.plan = plan
        run_dir.write_state(state)  # decided before anything is deleted
        kill_point("plan_decided")
    if state.run.keep_checkpoints == "needed":
        keep = {p.model_path for p in plan.parents} if plan else set()
        for j in range(k + 1):
            for i in range(popsize):
                model = run_dir.model_dir(j, i)
                if str(model) not in keep and model.exists():
                    shutil.rmtree(model)
    return plan


def parents_for(state: RunState, k: int) -> list[Parent | None]:
    """Round k's parent per candidate (None: train from scratch)."""
    plan = state.plan
    if state.search.evaluator != "populationbased" or plan is None or plan.round != k:
        return [None] * state.search.popsize
    return list(plan.assignment)
