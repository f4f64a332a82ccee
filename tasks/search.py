"""The search's steps as plain functions over the run directory (the @tasks call these).

Everything a step needs is read from ``OUTPUT/state.json`` and the trial records, and
everything it decides is written back before it returns, so any step can be re-run after
a kill: asking the tuner for round k twice returns the same candidates, a finished trial
is never run again, and telling round k happens exactly once.

state.json::

    {"version": 1,
     "search": {strategy, evaluator, popsize, seed, space},   # what a resume must match
     "rounds": N,              # may be raised by a resume to extend a finished search
     "next_round": k,          # the first round whose scores the tuner has not been told
     "pending_round": k|null,  # the round the tuner's pending candidates belong to
     "tuner": {...},           # tuner.state_dict(), taken after every ask and every tell
     "best": {round, candidate, score} | null,   # the trial best_model/ holds
     "plan": {round, parents, assignment} | null, # Population-Based: round k's parents
     "run": {...}}             # this invocation's run options (slots, python, timeout, ...)
"""

from __future__ import annotations

import shutil
from pathlib import Path

from tasks.kill_points import kill_point
from tasks.population import plan_parents
from tasks.rundir import RunDir, trial_rank_key
from tasks.trial import FINAL_OUTCOMES, TrialSpec
from tuners import SearchSpace, make_tuner

__all__ = ["STATE_VERSION", "SearchMismatchError", "SearchInterrupted", "new_state",
           "check_resume", "propose", "trial_spec", "finished_trial", "tell_round",
           "record_best", "load_tuner", "select_parents", "parents_for"]

STATE_VERSION = 1


class SearchMismatchError(ValueError):
    """The output dir holds a different search than the one asked for."""


class SearchInterrupted(Exception):
    """The search was stopped (Ctrl-C, SIGTERM, a cancel) before a round finished."""


def new_state(search: dict, rounds: int, run: dict) -> dict:
    space = SearchSpace.from_dict(search["space"])
    tuner = make_tuner(search["strategy"], space, popsize=search["popsize"], seed=search["seed"])
    return {"version": STATE_VERSION, "search": search, "rounds": rounds, "next_round": 0,
            "pending_round": None, "tuner": tuner.state_dict(), "best": None, "plan": None,
            "run": run}


def check_resume(state: dict, search: dict, state_path: Path) -> None:
    """Refuse to mix two searches in one output dir: say exactly what differs."""
    if state.get("version") != STATE_VERSION:
        raise SearchMismatchError(
            f"{state_path}: state version {state.get('version')!r} is not {STATE_VERSION}; "
            "it was written by another autofinetune version: use a new --output-dir")
    old = state["search"]
    diffs = []
    for key, label in (("strategy", "--tuning-strategy"), ("evaluator", "--evaluator"),
                       ("popsize", "--popsize")):
        if old[key] != search[key]:
            diffs.append(f"{label} was {old[key]}, now {search[key]}")
    if search.get("seed") is not None and old["seed"] != search["seed"]:
        diffs.append(f"--seed was {old['seed']}, now {search['seed']}")
    if old["space"] != search["space"]:
        changed = _space_diff(old["space"], search["space"])
        diffs.append(f"the search space (--param-file) changed: {changed}")
    if diffs:
        raise SearchMismatchError(
            f"{state_path.parent}: holds a different search ({'; '.join(diffs)}); "
            "resume with the original settings or choose a new --output-dir")


def _space_diff(old: dict, new: dict) -> str:
    a = {p["name"]: p for p in old["param_list"]}
    b = {p["name"]: p for p in new["param_list"]}
    parts = [f"{n} removed" for n in a if n not in b] + [f"{n} added" for n in b if n not in a]
    parts += [f"{n} {a[n]} -> {b[n]}" for n in a if n in b and a[n] != b[n]]
    return ", ".join(parts) or "parameter order differs"


def load_tuner(state: dict):
    search = state["search"]
    tuner = make_tuner(search["strategy"], SearchSpace.from_dict(search["space"]),
                       popsize=search["popsize"], seed=search["seed"])
    tuner.load_state_dict(state["tuner"])
    return tuner


def propose(run_dir: RunDir, k: int) -> list[dict]:
    """Round k's candidates: asked once, persisted, and returned again on a re-run."""
    state = run_dir.read_state()
    tuner = load_tuner(state)
    if state["pending_round"] == k:
        return tuner.pending
    if state["next_round"] != k:
        raise RuntimeError(f"round {k} asked out of order (state is at round {state['next_round']})")
    candidates = tuner.ask()
    state["tuner"] = tuner.state_dict()
    state["pending_round"] = k
    run_dir.write_state(state)
    return candidates


def finished_trial(run_dir: RunDir, k: int, i: int) -> dict | None:
    """Trial (k, i)'s record when it already reached a final outcome (a resumed run skips it)."""
    record = run_dir.read_trial(k, i)
    return record if record is not None and record["outcome"] in FINAL_OUTCOMES else None


def trial_spec(run_dir: RunDir, state: dict, k: int, i: int, params: dict,
               parent: dict | None = None) -> TrialSpec:
    run = state["run"]
    space = SearchSpace.from_dict(state["search"]["space"])
    extras = [list(kv) for kv in run["extras"]]
    model_path = None
    if parent is not None:
        model_path = parent["model_path"]
        pbt_epochs = run.get("pbt_epochs", 0)
        if pbt_epochs and not any(key == "epochs" for key, _ in extras):
            extras.insert(0, ["epochs", str(pbt_epochs)])  # a forwarded epochs extra wins
    return TrialSpec(
        round=k, candidate=i, params=params,
        flags=[[name, space.format_value(name, params[name])] for name in space.names],
        python=run["python"], script=run["script"], cwd=run["cwd"],
        saved_params_dir=str(run_dir.model_dir(k, i)), log_path=str(run_dir.log_path(k, i)),
        result_path=str(run_dir.result_path(k, i)), pid_path=str(run_dir.pid_path(k, i)),
        model_path=model_path,
        parent=None if parent is None else parent["name"], extras=extras,
        timeout_s=run["trial_timeout"], retries=run["trial_retries"])


def tell_round(run_dir: RunDir, k: int) -> list[dict]:
    """Tell the tuner round k's scores (failures as None) and persist; the round's records."""
    state = run_dir.read_state()
    popsize = state["search"]["popsize"]
    records = [run_dir.read_trial(k, i) for i in range(popsize)]
    unfinished = [i for i, r in enumerate(records) if r is None or r["outcome"] not in FINAL_OUTCOMES]
    if unfinished:
        raise SearchInterrupted(f"round {k}: trials {unfinished} did not finish")
    if state["next_round"] == k:  # not told yet (a re-run after a kill may find it told)
        tuner = load_tuner(state)
        tuner.tell([r["score"] if r["outcome"] == "ok" else None for r in records])
        state["tuner"] = tuner.state_dict()
        state["next_round"] = k + 1
        state["pending_round"] = None
        run_dir.write_state(state)
        kill_point("round_told")
    return records


def record_best(run_dir: RunDir, names: list[str], *, final: bool) -> dict | None:
    """Bring best_model/ and log_file.txt up to date with every told round; the best trial.

    Idempotent: a resume calls it first to finish what a kill interrupted.
    """
    run_dir.recover_best_model()
    state = run_dir.read_state()
    trials = run_dir.trials(rounds=state["next_round"])
    ok = [t for t in trials if t["outcome"] == "ok"]
    best = min(ok, key=trial_rank_key) if ok else None
    if best is not None:
        key = {"round": best["round"], "candidate": best["candidate"], "score": best["score"]}
        if state["best"] != key or not run_dir.best_model.is_dir():
            run_dir.replace_best_model(Path(best["saved_params_dir"]))
            state["best"] = key
            run_dir.write_state(state)
    run_dir.write_log_file(names, trials, final=final)
    return best


def _has_checkpoint(path: Path) -> bool:
    return path.is_dir() and any(path.iterdir())


def select_parents(run_dir: RunDir, k: int) -> dict | None:
    """After round k: plan which checkpoint each candidate of round k+1 continues from
    (Population-Based only), then apply ``--keep-checkpoints needed``. Idempotent: a
    resume re-runs it to finish what a kill interrupted; the plan is decided only once.
    """
    state = run_dir.read_state()
    popsize = state["search"]["popsize"]
    plan = state.get("plan")
    if state["search"]["evaluator"] == "populationbased" and (plan is None or plan["round"] != k + 1):
        records = [run_dir.read_trial(k, i) for i in range(popsize)]
        has = [_has_checkpoint(Path(r["saved_params_dir"])) for r in records]
        plan = {"round": k + 1, **plan_parents(records, popsize=popsize, has_checkpoint=has,
                                               previous=plan["parents"] if plan else None)}
        state["plan"] = plan
        run_dir.write_state(state)  # decided before anything is deleted
        kill_point("plan_decided")
    if state["run"].get("keep_checkpoints") == "needed":
        keep = {p["model_path"] for p in plan["parents"]} if plan else set()
        for j in range(k + 1):
            for i in range(popsize):
                model = run_dir.model_dir(j, i)
                if str(model) not in keep and model.exists():
                    shutil.rmtree(model)
    return plan


def parents_for(state: dict, k: int) -> list[dict | None]:
    """Round k's parent per candidate (None: train from scratch)."""
    plan = state.get("plan")
    if state["search"]["evaluator"] != "populationbased" or plan is None or plan["round"] != k:
        return [None] * state["search"]["popsize"]
    return plan["assignment"]
