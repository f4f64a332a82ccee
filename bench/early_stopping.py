"""Benchmark early stopping: total trial time and best score with --early-stop off, median, asha.

Not a test: a script that prints a table and writes ``bench/results/early_stopping.md``.

    .venv/bin/python bench/early_stopping.py               # full run (~30 min on 2 busy cores)
    .venv/bin/python bench/early_stopping.py --quick       # smoke run, no report

Every trial is ``bench/es_train.py``: a numpy MLP on bundled scikit-learn data (``digits``, the
examples/digits task, and ``breast_cancer``, split once into an .npz), one step per PASSES epochs, reporting the validation
accuracy each epoch (``report_intermediate``) and leaving when ``should_stop()`` says so. For
each task and seed the real CLI (``python -m flows.autofinetune ... --evaluator fulltrail
--tuning-strategy hazero --cpu-slots 2``) runs the same search three times, with ``--early-stop
off``, ``median`` and ``asha`` (defaults: min steps 1, reduction factor 3, min resource 1),
against one ``prefect server start``. Measured, from the run dirs' ``trial-<i>.json``:

  trial time   the sum of the trials' durations (process start to exit): the GPU-hours proxy
  steps        the sum of the steps (of epochs) the trials trained: the same proxy without the
               process start-up, and without the noise of a shared machine
  best         the best validation accuracy the search found
  pruned       trials stopped early

The reference: Optuna (``TPESampler(seed)``, ``n_trials`` = popsize x rounds, one trial at a
time, in process, the same epochs) with no pruner, ``MedianPruner()`` and
``SuccessiveHalvingPruner()`` on the same tasks and seeds. Its trial time has no process start.
Ratios are against the baseline (off / no pruner) of the same invocation.
"""

from __future__ import annotations

import argparse
import datetime
import json
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from es_train import EPOCHS, PASSES, save_data, train_epochs  # noqa: E402
from orchestration import PrefectServer, _cpu_seconds, _machine  # noqa: E402

ROOT = Path(__file__).resolve().parent.parent
TASKS = ("digits", "breast_cancer")
RULES = ("off", "median", "asha")
PRUNERS = ("none", "median", "successive_halving")
HPARAM = """param_list:
  - {name: learning_rate, init_value: 0.001, type: float, log: true, greater_than: 0.00001, lower_than: 0.5}
  - {name: alpha, init_value: 0.0001, type: float, log: true, greater_than: 0.000001, lower_than: 1.0}
  - {name: hidden_size, init_value: 32, type: int, greater_than: 4, lower_than: 128}
  - {name: batch_size, init_value: 32, type: int, greater_than: 8, lower_than: 256}
"""


def run_search(work: Path, env: dict, task: str, seed: int, rule: str, popsize: int, rounds: int) -> dict:
    out = work / f"{task}-{seed}-{rule}"
    argv = [sys.executable, "-m", "flows.autofinetune", str(ROOT / "bench" / "es_train.py"), "--param-file",
            str(work / "hparam.yaml"), "--popsize", str(popsize), "--round", str(rounds), "--cpu-slots", "2",
            "--seed", str(seed), "--evaluator", "fulltrail", "--tuning-strategy", "hazero",
            "--early-stop", rule, "--output-dir", str(out), "task", task, "data", str(work / f"{task}.npz")]
    t0 = time.monotonic()
    done = subprocess.run(argv, cwd=ROOT, env={**env, "PYTHONPATH": str(ROOT), "AUTOFINETUNE_PROGRESS": "off"},
                          capture_output=True, text=True)
    if done.returncode != 0:
        raise RuntimeError(f"{' '.join(argv)} exited {done.returncode}: {done.stdout[-2000:]}{done.stderr[-2000:]}")
    records = [json.loads(p.read_text()) for p in out.glob("round*/trial-*.json")]
    scores = [r["score"] for r in records if r["outcome"] == "ok"]
    return {"trial_s": sum(r["duration_s"] for r in records), "best": max(scores),
            "steps": sum(len(r.get("curve") or ()) for r in records),
            "pruned": sum(r["outcome"] == "pruned" for r in records), "trials": len(records),
            "wall_s": time.monotonic() - t0}


def run_optuna(task: str, seed: int, pruner: str, n_trials: int, data) -> dict:
    import optuna

    optuna.logging.set_verbosity(optuna.logging.WARNING)
    made = {"none": optuna.pruners.NopPruner, "median": optuna.pruners.MedianPruner,
            "successive_halving": optuna.pruners.SuccessiveHalvingPruner}[pruner]()
    study = optuna.create_study(direction="maximize", sampler=optuna.samplers.TPESampler(seed=seed), pruner=made)
    spent, steps = 0.0, 0

    def objective(trial) -> float:
        nonlocal spent, steps
        params = {"learning_rate": trial.suggest_float("learning_rate", 1e-5, 0.5, log=True),
                  "alpha": trial.suggest_float("alpha", 1e-6, 1.0, log=True),
                  "hidden_size": trial.suggest_int("hidden_size", 4, 128),
                  "batch_size": trial.suggest_int("batch_size", 8, 256)}
        t0 = time.monotonic()
        try:
            for epoch, accuracy in train_epochs(task, params, data):
                steps += 1
                trial.report(accuracy, epoch)
                if trial.should_prune():
                    raise optuna.TrialPruned()
            return accuracy
        finally:
            spent += time.monotonic() - t0

    study.optimize(objective, n_trials=n_trials)
    states = [t.state.name for t in study.trials]
    return {"trial_s": spent, "best": study.best_value, "steps": steps, "pruned": states.count("PRUNED"),
            "trials": len(states)}


def summary(rows: list[dict], base: list[dict]) -> dict:
    best = sorted(r["best"] for r in rows)
    q = statistics.quantiles(best, n=4, method="inclusive") if len(best) > 1 else [best[0]] * 3
    base_best = statistics.median(r["best"] for r in base)
    return {"trial_s": sum(r["trial_s"] for r in rows), "ratio": sum(r["trial_s"] for r in rows)
            / sum(r["trial_s"] for r in base), "steps_ratio": sum(r["steps"] for r in rows)
            / sum(r["steps"] for r in base), "best_median": statistics.median(best), "iqr": q[2] - q[0],
            "best_delta": statistics.median(best) - base_best, "pruned": sum(r["pruned"] for r in rows),
            "trials": sum(r["trials"] for r in rows)}


def table(title: str, results: dict, modes: tuple, seeds: list[int]) -> list[str]:
    lines = [f"| task | {title} | trial time s (sum of {len(seeds)} seeds) | × baseline | saved | steps × baseline "
             "| best, median (IQR) | best − baseline | trials pruned |", "|---|---|---:|---:|---:|---:|---|---:|---:|"]
    for task in TASKS:
        for mode in modes:
            s = summary(results[task][mode], results[task][modes[0]])
            lines.append(f"| {task} | {mode} | {s['trial_s']:.1f} | {s['ratio']:.2f} | {1 - s['ratio']:.0%} | "
                         f"{s['steps_ratio']:.2f} | "
                         f"{s['best_median']:.4f} ({s['iqr']:.4f}) | {s['best_delta']:+.4f} | "
                         f"{s['pruned']}/{s['trials']} |")
    return lines


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--seeds", type=int, default=3)
    parser.add_argument("--popsize", type=int, default=5, help="default 5, the original's")
    parser.add_argument("--rounds", type=int, default=10, help="default 10, the original's")
    parser.add_argument("--quick", action="store_true", help="1 seed, 2 rounds of 4, no report")
    args = parser.parse_args(argv)
    if args.quick:
        args.seeds, args.popsize, args.rounds = 1, 4, 2
    seeds = list(range(args.seeds))
    started, t0 = datetime.datetime.now(datetime.timezone.utc), time.monotonic()
    cpu0 = _cpu_seconds()
    ours: dict = {task: {rule: [] for rule in RULES} for task in TASKS}
    theirs: dict = {task: {p: [] for p in PRUNERS} for task in TASKS}
    with tempfile.TemporaryDirectory(prefix="autofinetune-es-bench-") as tmp:
        work = Path(tmp)
        (work / "hparam.yaml").write_text(HPARAM)
        (work / "prefect").mkdir()
        data = {task: save_data(task, work / f"{task}.npz") for task in TASKS}
        server = PrefectServer(work / "prefect")
        try:
            for task in TASKS:
                for seed in seeds:
                    for rule in RULES:
                        row = run_search(work, server.client_env(), task, seed, rule, args.popsize, args.rounds)
                        ours[task][rule].append(row)
                        print(f"{task} seed {seed} {rule}: {row}", flush=True)
        finally:
            server.stop()
    for task in TASKS:
        for seed in seeds:
            for pruner in PRUNERS:
                row = run_optuna(task, seed, pruner, args.popsize * args.rounds, data[task])
                theirs[task][pruner].append(row)
                print(f"optuna {task} seed {seed} {pruner}: {row}", flush=True)
    wall = time.monotonic() - t0
    cpu1 = _cpu_seconds()
    others = (cpu1[0] - cpu0[0]) - (cpu1[1] - cpu0[1])
    ours_table = table("--early-stop", ours, RULES, seeds)
    theirs_table = table("Optuna pruner", theirs, PRUNERS, seeds)
    print("\n".join(ours_table + [""] + theirs_table))
    if args.quick:
        return 0
    report = [
        "# Early-stopping benchmark", "",
        f"- Date: {started:%Y-%m-%d %H:%M} UTC",
        f"- Command (from the repo root): `.venv/bin/python bench/early_stopping.py"
        f"{' ' + ' '.join(argv or sys.argv[1:]) if (argv or sys.argv[1:]) else ''}`",
        f"- Wall time: {wall:.0f} s ({wall / 60:.1f} min)", *_machine(),
        f"- Other processes on the host used {others:.0f} CPU-seconds during the run "
        f"({others / wall / 2:.0%} of 2 cores)" + (": **the machine was shared** with other work, so times are "
                                                    "noisy; the ratios compare runs of the same invocation"
                                                    if others / wall / 2 > 0.05 else ": otherwise idle"),
        f"- Search: hazero, fulltrail, popsize {args.popsize} × {args.rounds} rounds, 2 CPU slots, seeds "
        f"{', '.join(map(str, seeds))}; steps per trial: "
        + ", ".join(f"{t} {EPOCHS[t]} of {PASSES[t]} epochs each" for t in TASKS), "",
        "Each trial is `bench/es_train.py` (a numpy MLP on scikit-learn's bundled data, read from an .npz; validation "
        "accuracy reported every step). Trial time = the sum of the trials' durations (process start to exit, the GPU-hours "
        "proxy); best = the best validation accuracy found; the IQR is over seeds.", "",
        "## autofinetune", "", *ours_table, "",
        "## Reference: Optuna on the same tasks", "",
        f"TPESampler(seed), {args.popsize * args.rounds} trials one at a time, in process (no process start-up "
        "in the trial time), pruners with their defaults.", "", *theirs_table, "",
        "## What this shows", "",
        "Round 0 is never stopped: the rules judge a trial against the curves of the earlier rounds only, "
        "so that decisions do not depend on which trials of a round happen to run together (see "
        "`runtime/early_stopping.py`). The process start-up (Python and numpy imports, about half a "
        "second on this machine) is paid by every trial, stopped or not. Optuna's pruners see every earlier trial, as its "
        "trials run one at a time.",
    ]
    out = ROOT / "bench" / "results" / "early_stopping.md"
    out.write_text("\n".join(report) + "\n")
    print(f"wrote {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
