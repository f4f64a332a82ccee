"""Benchmark what orchestration costs: the Prefect flow against a bare pool and the original's waves.

Not a test: a script that prints a table and writes a Markdown report.

    .venv/bin/python bench/orchestration.py                      # full run (~5 min on 2 cores)
    .venv/bin/python bench/orchestration.py --quick              # smoke run, no report
    .venv/bin/python bench/orchestration.py --configs 2x6x3 --repeats 1 --no-ephemeral

Every trial is ``bench/sleep_train.py``: it sleeps a duration fixed per (round, candidate),
drawn from a seeded heavy-tailed distribution in [0.5, 3] s, and logs its own start and
end wall-clock times to an events file. The same durations run three ways, with the
same number of slots S:

  flow     the real CLI, ``python -m flows.autofinetune bench/sleep_train.py ...
           --cpu-slots S``, in a subprocess, against a ``prefect server start`` that this
           script starts once (SQLite in a temp PREFECT_HOME, a free 127.0.0.1 port).
           Once, also with the embedded (ephemeral) API in a fresh PREFECT_HOME, so that
           time-to-first-trial includes the API server's start-up.
  pool     no Prefect: the same tuner (``tuners.make_tuner``) asks a round's candidates,
           a ThreadPoolExecutor(max_workers=S) runs each as a subprocess, the scores are
           told, the next round starts. The baseline: what a scheduler cannot beat by much.
  waves    the original's schedule (PaddleHub's AutoDL Finetuner): a round's candidates
           in waves of S; a wave waits for its slowest trial before the next one starts.
  dask     the real CLI with ``--dask-local S`` instead of ``--cpu-slots S``: the trials run
           on a local Dask cluster of S single-thread worker processes (prefect-dask's
           DaskTaskRunner), the path a multi-host search takes.

Definitions (all from the trials' own events, so every mode is measured the same way):
  makespan    first trial start -> last trial end.
  ideal       sum over rounds of max(longest trial, sum of the round's durations / S): a
              lower bound of any schedule that runs rounds one after another with no
              overhead (not always reachable; ``list`` is the zero-overhead greedy pool).
  efficiency  ideal / makespan.
  overhead    (makespan - the pool's makespan) / trials, in ms per trial.
  slot gap    within a round, the j-th trial to start (j >= S, 0-based) waits for the
              (j-S)-th trial of the round to end: start_j - end_(j-S), averaged. Includes
              the child interpreter's start-up and exit, which every mode pays.
  round gap   first start of round k+1 - last end of round k (tell, ask, bookkeeping).
  to 1st      command start -> first trial start (CLI import, API connection, run dir).
  tail        last trial end -> command exit.
"""

from __future__ import annotations

import argparse
import concurrent.futures
import datetime
import json
import os
import platform
import shlex
import shutil
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import time
import urllib.request
from dataclasses import dataclass, field
from importlib import metadata
from pathlib import Path

_BENCH_DIR = Path(__file__).resolve().parent
_ROOT = _BENCH_DIR.parent
# Run as `python bench/orchestration.py`, bench/tuners.py would shadow the `tuners` package.
sys.path[:] = [p for p in sys.path if Path(p or ".").resolve() != _BENCH_DIR]
if str(_ROOT) not in sys.path:
    sys.path.insert(0, str(_ROOT))

import numpy as np  # noqa: E402

SLEEP_SCRIPT = "bench/sleep_train.py"  # relative to the repo root, where every mode runs
TUNER = "hazero"
SEED = 0
DURATION_MIN_S = 0.5  # shortest trial
DURATION_MAX_S = 3.0  # longest trial (the heavy tail is clipped here)
PARETO_SHAPE = 1.5  # Lomax shape: smaller = heavier tail
PARETO_SCALE_S = 0.5  # seconds per unit of the Lomax draw
HPARAM_YAML = (
    "param_list:\n"
    "  - name: x\n    init_value: 0.0\n    type: float\n    greater_than: -1.0\n    lower_than: 1.0\n"
    "  - name: n\n    init_value: 4\n    type: int\n    greater_than: 1\n    lower_than: 8\n"
)
DEFAULT_CONFIGS = ((2, 6, 3), (4, 8, 3))
MODES = ("pool", "waves", "flow", "dask")


# ----------------------------------------------------------------------- durations

@dataclass(frozen=True)
class Config:
    slots: int
    popsize: int
    rounds: int

    @property
    def name(self) -> str:
        return f"S={self.slots} P={self.popsize} R={self.rounds}"

    @property
    def trials(self) -> int:
        return self.popsize * self.rounds


def trial_duration(k: int, i: int, seed: int = SEED) -> float:
    """Seconds that candidate i of round k sleeps: 0.5 + 0.5 * Lomax(1.5), clipped to 3 s."""
    rng = np.random.default_rng([seed, k, i])
    draw = DURATION_MIN_S + PARETO_SCALE_S * rng.pareto(PARETO_SHAPE)
    return round(float(min(DURATION_MAX_S, draw)), 3)


def durations_for(config: Config) -> dict[str, float]:
    return {f"r{k}c{i}": trial_duration(k, i)
            for k in range(config.rounds) for i in range(config.popsize)}


def _round_durations(config: Config, durations: dict[str, float], k: int) -> list[float]:
    return [durations[f"r{k}c{i}"] for i in range(config.popsize)]


def ideal_makespan(config: Config, durations: dict[str, float]) -> float:
    """Sum over rounds of max(longest trial, total / S): no schedule of the rounds beats it."""
    total = 0.0
    for k in range(config.rounds):
        d = _round_durations(config, durations, k)
        total += max(max(d), sum(d) / config.slots)
    return total


def simulated_makespan(config: Config, durations: dict[str, float], *, waves: bool) -> float:
    """Zero-overhead makespan of the greedy pool (candidates in index order) or of waves."""
    total = 0.0
    for k in range(config.rounds):
        d = _round_durations(config, durations, k)
        if waves:
            total += sum(max(d[j:j + config.slots]) for j in range(0, len(d), config.slots))
        else:
            free = [0.0] * config.slots
            for x in d:
                free.sort()
                free[0] += x
            total += max(free)
    return total


# ----------------------------------------------------------------------- one run

@dataclass
class Run:
    mode: str
    config: Config
    t0: float  # command start (unix time)
    t_exit: float
    events: list[tuple[str, float, int, int]] = field(default_factory=list)


def read_events(path: Path) -> list[tuple[str, float, int, int]]:
    events = []
    for line in path.read_text().splitlines():
        kind, when, k, i = line.split()
        events.append((kind, float(when), int(k), int(i)))
    return events


def _check_events(run: Run) -> None:
    starts = {(k, i) for kind, _, k, i in run.events if kind == "start"}
    ends = {(k, i) for kind, _, k, i in run.events if kind == "end"}
    want = {(k, i) for k in range(run.config.rounds) for i in range(run.config.popsize)}
    if starts != want or ends != want or len(run.events) != 2 * len(want):
        raise RuntimeError(f"{run.mode} {run.config.name}: expected one start and one end per trial, "
                           f"got {len(starts)} starts and {len(ends)} ends in {len(run.events)} events")


def _trial_argv(python: str, flags: list[str], k: int, i: int, work: Path,
                durations_path: Path, events_path: Path) -> list[str]:
    return [python, SLEEP_SCRIPT, *flags,
            f"--saved_params_dir={work / f'round{k}' / f'model-{i}'}",
            f"--durations={durations_path}", f"--events={events_path}"]


def run_without_prefect(config: Config, work: Path, durations_path: Path, *, waves: bool) -> Run:
    """The bare pool (or the original's waves): the same tuner and trials, no Prefect."""
    from tuners import SearchSpace, make_tuner

    space = SearchSpace.from_yaml(work.parent / "hparam.yaml")
    tuner = make_tuner(TUNER, space, popsize=config.popsize, seed=SEED)
    events_path = work / "events.txt"
    work.mkdir(parents=True)

    def run_one(k: int, i: int, params: dict) -> float | None:
        trial_dir = work / f"round{k}"
        (trial_dir / f"model-{i}").mkdir(parents=True, exist_ok=True)
        result = trial_dir / f"result-{i}"
        flags = [f"--{name}={space.format_value(name, params[name])}" for name in space.names]
        argv = _trial_argv(sys.executable, flags, k, i, work, durations_path, events_path)
        env = dict(os.environ, AUTOFINETUNE_RESULT_FILE=str(result), CUDA_VISIBLE_DEVICES="",
                   PYTHONUNBUFFERED="1")
        with open(trial_dir / f"log-{i}.info", "wb") as log:
            code = subprocess.call(argv, cwd=_ROOT, env=env, stdout=log, stderr=subprocess.STDOUT,
                                   stdin=subprocess.DEVNULL, start_new_session=True)
        return float(result.read_text()) if code == 0 and result.exists() else None

    t0 = time.time()
    with concurrent.futures.ThreadPoolExecutor(max_workers=config.slots) as pool:
        for k in range(config.rounds):
            candidates = tuner.ask()
            if waves:
                scores = []
                for j in range(0, len(candidates), config.slots):
                    wave = [pool.submit(run_one, k, i, candidates[i])
                            for i in range(j, min(j + config.slots, len(candidates)))]
                    scores += [f.result() for f in wave]
            else:
                futures = [pool.submit(run_one, k, i, p) for i, p in enumerate(candidates)]
                scores = [f.result() for f in futures]
            if any(s is None for s in scores):
                raise RuntimeError(f"a trial failed in {work}")
            tuner.tell(scores)
    run = Run("waves" if waves else "pool", config, t0, time.time(), read_events(events_path))
    _check_events(run)
    return run


def run_flow(config: Config, work: Path, durations_path: Path, env: dict, mode: str = "flow") -> Run:
    """The real CLI in a subprocess; ``env`` picks the Prefect API (server or ephemeral);
    mode ``dask`` runs the trials on a local Dask cluster of S workers."""
    events_path = work / "events.txt"
    work.mkdir(parents=True)
    where = ["--dask-local" if mode == "dask" else "--cpu-slots", str(config.slots)]
    argv = [sys.executable, "-m", "flows.autofinetune", SLEEP_SCRIPT,
            "--param-file", str(work.parent / "hparam.yaml"), "--evaluator", "fulltrail",
            "--tuning-strategy", TUNER, *where,
            "--popsize", str(config.popsize), "--round", str(config.rounds), "--seed", str(SEED),
            "--output-dir", str(work / "out"),
            "durations", str(durations_path), "events", str(events_path)]
    with open(work / "cli.log", "wb") as log:
        t0 = time.time()
        code = subprocess.call(argv, cwd=_ROOT, env=env, stdout=log, stderr=subprocess.STDOUT,
                               stdin=subprocess.DEVNULL)
        t_exit = time.time()
    if code != 0:
        raise RuntimeError(f"the flow exited {code}; see {work / 'cli.log'}:\n"
                           f"{(work / 'cli.log').read_text()[-3000:]}")
    run = Run(mode, config, t0, t_exit, read_events(events_path))
    _check_events(run)
    return run


# ----------------------------------------------------------------------- Prefect server

def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _base_env(home: Path) -> dict:
    """A child's environment: its own PREFECT_HOME, no API URL, and bytecode cached as a user's
    Python does (this machine sets PYTHONDONTWRITEBYTECODE; every import would compile)."""
    env = dict(os.environ, PREFECT_HOME=str(home), PREFECT_SERVER_ANALYTICS_ENABLED="false",
               PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS="120")
    env.pop("PREFECT_API_URL", None)
    env.pop("PYTHONDONTWRITEBYTECODE", None)
    return env


STARTS = ("embedded, cold PREFECT_HOME", "embedded, warm PREFECT_HOME", "running server")


def measure_starts(tmp: Path, server: "PrefectServer", durations_path: Path, repeats: int) -> dict:
    """Seconds to the first trial (a 2x1 search) against an empty Prefect flow's start
    (``bench/empty_flow.py``), side by side, interleaved, in each way of reaching an API."""
    warm = tmp / "warm-home"
    warm.mkdir()
    subprocess.run([sys.executable, str(_BENCH_DIR / "empty_flow.py"), str(tmp / "warm-mark")], cwd=_ROOT,
                   env=_base_env(warm), check=True, capture_output=True)  # the database exists now
    found: dict = {}
    n = 0
    for rep in range(repeats):
        for how in STARTS:
            for what in ("empty flow", "autofinetune"):
                n += 1
                if how == STARTS[0]:
                    home = tmp / f"cold-home-{n}"
                    home.mkdir()
                    env = _base_env(home)
                else:
                    env = _base_env(warm) if how == STARTS[1] else server.client_env()
                if what == "empty flow":
                    mark = tmp / f"start-mark-{n}"
                    t0 = time.time()
                    subprocess.run([sys.executable, str(_BENCH_DIR / "empty_flow.py"), str(mark)], cwd=_ROOT,
                                   env=env, check=True, capture_output=True)
                    seconds = float(mark.read_text()) - t0
                else:
                    run = run_flow(Config(2, 2, 1), tmp / f"start-{n}", durations_path, env)
                    seconds = min(t for kind, t, _, _ in run.events if kind == "start") - run.t0
                found.setdefault((how, what), []).append(seconds)
                print(f"  [{rep + 1}/{repeats}] start, {how}, {what}: {seconds:.2f} s", file=sys.stderr, flush=True)
    return found


def prefect_floor(tmp: Path, server: "PrefectServer", n: int = 10) -> dict:
    """ms per empty subflow run (heartbeat off) and per empty task run, against the server."""
    mark = tmp / "floor.json"
    subprocess.run([sys.executable, str(_BENCH_DIR / "empty_flow.py"), str(mark), "--subflows", str(n)],
                   cwd=_ROOT, env=server.client_env(), check=True, capture_output=True)
    floor = json.loads(mark.read_text())
    print(f"  Prefect's floor: {floor['subflow_ms']:.0f} ms per empty subflow run, {floor['task_ms']:.0f} ms "
          "per empty task run", file=sys.stderr, flush=True)
    return floor


def starts_table(found: dict) -> list[str]:
    lines = ["| Prefect API | empty flow: command → body s (runs) | autofinetune: command → first trial s "
             "(runs) | difference s (medians) |", "|---|---:|---:|---:|"]
    for how in STARTS:
        empty, ours = found[(how, "empty flow")], found[(how, "autofinetune")]
        lines.append(f"| {how} | {_median(empty):.2f} ({', '.join(f'{x:.1f}' for x in empty)}) "
                     f"| {_median(ours):.2f} ({', '.join(f'{x:.1f}' for x in ours)}) "
                     f"| {_median(ours) - _median(empty):+.2f} |")
    return lines


class PrefectServer:
    """``prefect server start`` on a free 127.0.0.1 port with its own PREFECT_HOME."""

    def __init__(self, home: Path) -> None:
        self.home = home
        port = _free_port()
        env = dict(_base_env(home), PREFECT_SERVER_API_HOST="127.0.0.1",
                   PREFECT_SERVER_API_PORT=str(port))
        self.url = f"http://127.0.0.1:{port}/api"
        self._log = open(home / "server.log", "wb")
        t0 = time.monotonic()
        self.proc = subprocess.Popen([str(Path(sys.executable).parent / "prefect"), "server", "start",
                                      "--no-ui", "--log-level", "WARNING"],
                                     env=env, stdout=self._log, stderr=subprocess.STDOUT,
                                     stdin=subprocess.DEVNULL, start_new_session=True)
        deadline = t0 + 180
        while True:
            try:
                with urllib.request.urlopen(f"{self.url}/health", timeout=2) as r:
                    if r.status == 200:
                        break
            except OSError:
                pass
            if self.proc.poll() is not None or time.monotonic() > deadline:
                self.stop()
                raise RuntimeError(f"prefect server did not start: "
                                   f"{(home / 'server.log').read_text()[-2000:]}")
            time.sleep(0.2)
        self.startup_s = time.monotonic() - t0

    def died(self) -> str | None:
        """None while the server runs; else its exit status and the end of its log."""
        code = self.proc.poll()
        if code is None:
            return None
        self._log.flush()
        lines = [x.strip() for x in (self.home / "server.log").read_text(errors="replace").splitlines()]
        tail = " | ".join([x for x in lines if x][-3:])[-600:]
        return f"exit status {code}; last log lines: {tail or '(none)'}"

    def client_env(self) -> dict:
        return dict(_base_env(self.home), PREFECT_API_URL=self.url)

    def stop(self) -> None:
        try:
            os.killpg(self.proc.pid, signal.SIGTERM)
            self.proc.wait(timeout=20)
        except ProcessLookupError:
            self.proc.wait()
        except subprocess.TimeoutExpired:
            os.killpg(self.proc.pid, signal.SIGKILL)
            self.proc.wait()
        self._log.close()


# ----------------------------------------------------------------------- analysis

def analyse(run: Run, durations: dict[str, float]) -> dict:
    S = run.config.slots
    starts = {(k, i): t for kind, t, k, i in run.events if kind == "start"}
    ends = {(k, i): t for kind, t, k, i in run.events if kind == "end"}
    first, last = min(starts.values()), max(ends.values())
    slot_gaps, round_gaps, busy_extra = [], [], []
    for k in range(run.config.rounds):
        ks = sorted(t for (r, _), t in starts.items() if r == k)
        ke = sorted(t for (r, _), t in ends.items() if r == k)
        slot_gaps += [ks[j] - ke[j - S] for j in range(S, len(ks))]
        if k > 0:
            round_gaps.append(ks[0] - max(t for (r, _), t in ends.items() if r == k - 1))
    busy_extra = [ends[key] - starts[key] - durations[f"r{key[0]}c{key[1]}"] for key in starts]
    return {
        "wall": run.t_exit - run.t0,
        "to_first": first - run.t0,
        "makespan": last - first,
        "tail": run.t_exit - last,
        "slot_gaps": slot_gaps,
        "round_gaps": round_gaps,
        "busy_extra": busy_extra,
    }


def _median(xs: list[float]) -> float:
    return statistics.median(xs) if xs else float("nan")


def _mean(xs: list[float]) -> float:
    return statistics.fmean(xs) if xs else float("nan")


def summarise(runs: list[dict], ideal: float, trials: int, bare_makespan: float | None) -> dict:
    """Medians over the repeats; gaps pooled over the repeats."""
    makespan = _median([r["makespan"] for r in runs])
    return {
        "n": len(runs),
        "wall": _median([r["wall"] for r in runs]),
        "to_first": _median([r["to_first"] for r in runs]),
        "makespan": makespan,
        "makespan_min": min(r["makespan"] for r in runs),
        "makespan_max": max(r["makespan"] for r in runs),
        "tail": _median([r["tail"] for r in runs]),
        "efficiency": ideal / makespan,
        "x_pool": None if bare_makespan is None else makespan / bare_makespan,
        "overhead_ms": None if bare_makespan is None else 1000 * (makespan - bare_makespan) / trials,
        "slot_gap_ms": 1000 * _mean([g for r in runs for g in r["slot_gaps"]]),
        "slot_gap_p90_ms": 1000 * float(np.percentile([g for r in runs for g in r["slot_gaps"]], 90))
        if any(r["slot_gaps"] for r in runs) else float("nan"),
        "round_gap_ms": 1000 * _mean([g for r in runs for g in r["round_gaps"]]),
        "busy_extra_ms": 1000 * _mean([g for r in runs for g in r["busy_extra"]]),
    }


# ----------------------------------------------------------------------- report

def _machine() -> list[str]:
    cpu = "unknown"
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    return [
        f"- CPU: {cpu}; {os.cpu_count()} logical cores",
        f"- Python {platform.python_version()} ({platform.system()} {platform.release()})",
        f"- prefect {metadata.version('prefect')}, numpy {metadata.version('numpy')}",
    ]


def _other_benchmarks() -> list[str]:
    """Command lines of other benchmark processes on this host (they would skew timings)."""
    found = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit() or int(entry.name) == os.getpid():
            continue
        try:
            cmd = (entry / "cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace").strip()
        except (FileNotFoundError, ProcessLookupError, PermissionError):
            continue
        if "bench/tuners.py" in cmd:
            found.append(cmd)
    return found


def _cpu_seconds() -> tuple[float, float]:
    """(CPU-seconds every process on the host used since boot, those of this script and its
    waited-for descendants): the difference over a run is what other processes used."""
    fields = Path("/proc/stat").read_text().splitlines()[0].split()[1:]
    ticks = [int(x) for x in fields[:8]]  # user nice system idle iowait irq softirq steal
    busy = sum(ticks) - ticks[3] - ticks[4]
    t = os.times()
    return busy / os.sysconf("SC_CLK_TCK"), t.user + t.system + t.children_user + t.children_system


def keep_or_remove(tmp: Path, *, keep: bool) -> None:
    """The temp dir of a run: kept (and said so) or removed."""
    if keep:
        print(f"kept {tmp}", file=sys.stderr)
    else:
        shutil.rmtree(tmp, ignore_errors=True)


def other_cpu_since(start: tuple[float, float]) -> float:
    """CPU-seconds other processes used since ``start`` (a ``_cpu_seconds()`` reading)."""
    end = _cpu_seconds()
    return max(0.0, (end[0] - start[0]) - (end[1] - start[1]))


def _f(x: float | None, fmt: str) -> str:
    return "—" if x is None or x != x else format(x, fmt)


TABLE_HEAD = ("| config | mode | runs | wall s | to 1st trial s | makespan s (min–max) | × pool "
              "| efficiency | overhead ms/trial | slot gap ms (mean / p90) | round gap ms | tail s |\n"
              "|---|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|")


def table_row(config: Config, mode: str, s: dict) -> str:
    return (f"| {config.name} | {mode} | {s['n']} | {_f(s['wall'], '.2f')} | {_f(s['to_first'], '.2f')} "
            f"| {_f(s['makespan'], '.2f')} ({_f(s['makespan_min'], '.2f')}–{_f(s['makespan_max'], '.2f')}) "
            f"| {_f(s['x_pool'], '.3f')} | {_f(s['efficiency'], '.3f')} | {_f(s['overhead_ms'], '.0f')} "
            f"| {_f(s['slot_gap_ms'], '.0f')} / {_f(s['slot_gap_p90_ms'], '.0f')} "
            f"| {_f(s['round_gap_ms'], '.0f')} | {_f(s['tail'], '.2f')} |")


def what_this_shows(configs: list[Config], summaries: dict, schedule: dict, floor: dict) -> list[str]:
    """The findings paragraph, its numbers taken from this run."""
    lines = ["## What this shows", ""]
    for c in configs:
        pool, waves, fl = summaries[(c, "pool")], summaries[(c, "waves")], summaries[(c, "flow")]
        rg = fl["round_gap_ms"] - pool["round_gap_ms"]
        sg = fl["slot_gap_ms"] - pool["slot_gap_ms"]
        lines.append(
            f"- {c.name}: the flow's makespan is {fl['x_pool']:.2f}× the bare pool's "
            f"({fl['overhead_ms']:+.0f} ms per trial; efficiency {fl['efficiency']:.2f} against "
            f"{pool['efficiency']:.2f} for the pool), the original's waves {waves['x_pool']:.2f}× "
            f"(efficiency {waves['efficiency']:.2f}; {schedule[c]['waves'] / schedule[c]['greedy']:.2f}× "
            f"even with zero overhead). Of the flow's extra time, {rg:.0f} ms is added at each of the "
            f"{c.rounds - 1} round boundaries and {sg:.0f} ms to each slot hand-over inside a round "
            f"({c.trials - c.rounds * min(c.slots, c.popsize)} of them); the whole command takes "
            f"{fl['wall']:.1f} s against the pool's {pool['wall']:.1f} s, with {fl['to_first']:.1f} s "
            f"before the first trial and {fl['tail']:.1f} s after the last.")
        per_round = (fl["round_gap_ms"] - pool["round_gap_ms"]) / 1000
        waves_loss = schedule[c]["waves"] - schedule[c]["greedy"]
        slower = fl["makespan"] > waves["makespan"]
        round_s = schedule[c]["greedy"] / c.rounds
        lines[-1] += (
            f" Here the flow is {'slower' if slower else 'faster'} than the waves ({fl['makespan']:.2f} s "
            f"against {waves['makespan']:.2f} s): rounds last ~{round_s:.1f} s, and the flow's "
            f"{fl['makespan'] - pool['makespan']:.2f} s of overhead {'outweighs' if slower else 'is less than'} "
            f"the {waves_loss:.2f} s that the waves leave slots idle. Scaled by 60 (trials of "
            f"{60 * DURATION_MIN_S:.0f} s to {DURATION_MAX_S:.0f} min; an extrapolation, not measured), the "
            f"same per-round cost would be {100 * per_round / (60 * round_s):.1f}% of a round, while the "
            f"waves would still lose {100 * waves_loss / schedule[c]['greedy']:.0f}%.")
    for c in configs:
        if (c, "dask") in summaries:
            d, fl = summaries[(c, "dask")], summaries[(c, "flow")]
            lines.append(
                f"- {c.name} on a local Dask cluster of {c.slots} workers (`--dask-local {c.slots}`): makespan "
                f"{d['makespan']:.2f} s, {d['x_pool']:.3f}× the bare pool's and {d['makespan'] / fl['makespan']:.3f}× "
                f"the flow's on local slots ({d['overhead_ms']:+.0f} ms per trial against the pool; slot hand-over "
                f"{d['slot_gap_ms']:.0f} ms, round gap {d['round_gap_ms']:.0f} ms). Before the first trial it "
                f"takes {d['to_first']:.1f} s ({d['to_first'] - fl['to_first']:+.1f} s for starting the "
                "cluster's processes and checking that every worker sees the run dir).")
    eph = [(c, summaries[(c, "flow-ephemeral")]) for c in configs if (c, "flow-ephemeral") in summaries]
    for c, e in eph:
        lines.append(
            f"- With the embedded (ephemeral) API in a fresh PREFECT_HOME ({c.name}, one run) the first "
            f"trial starts {e['to_first']:.1f} s after the command, against "
            f"{summaries[(c, 'flow')]['to_first']:.1f} s with a running server: the embedded server's "
            f"start-up and database creation. Its makespan is {e['makespan']:.2f} s "
            f"({e['x_pool']:.2f}× the pool).")
    if floor:
        c = configs[0]
        fl, pool = summaries[(c, "flow")], summaries[(c, "pool")]
        lines.append(
            f"- Prefect's floor, measured in isolation against the same server (`bench/empty_flow.py "
            f"--subflows {floor['n']}`): an empty subflow run named `round-<k>`, without the heartbeat, costs "
            f"{floor['subflow_ms']:.0f} ms, an empty task run {floor['task_ms']:.0f} ms. A round here costs "
            f"{fl['round_gap_ms'] - pool['round_gap_ms']:.0f} ms more than the pool's round gap ({c.name}): "
            f"{floor['subflow_ms'] + floor['task_ms']:.0f} ms of it is that floor (one subflow run and the "
            "`update_tuner` task run; with fulltrail and all checkpoints kept there is no "
            "`select_and_copy_checkpoints` run), the rest the tuner's ask and tell, state.json, "
            "log_file.txt, the table artifact and the trials' submission.")
    lines += ["", NOTES, ""]
    return lines


# Written from reading the runs' logs and Prefect 3's flow engine; true of any run of this script.
NOTES = """\
Notes. The slot hand-over is cheap: a task thread notices its child's exit within the 50 ms
poll of `runtime.trial`, records the trial and the next queued task takes the slot, so a freed
slot idles only tens of ms longer than in the bare pool (which pays the child interpreter's
exit and start-up too). The flow's cost is per round, and most of it is Prefect's: each round
is one `round-<k>` subflow run (a tracking task run, the flow run, its state changes: about
six API calls) plus its bookkeeping task runs. Until this version, Prefect's flow engine also
joined each run's heartbeat thread when the run ended (`prefect.flow_engine._send_heartbeats`),
which sleeps in whole 1 s steps from the run's start: every round lasted until its next whole
second, 0.5 s on average. The rounds (and the CLI's top flow) now run with the heartbeat off
(`heartbeat_frequency` None in a settings context entered once per search) unless
`PREFECT_FLOWS_HEARTBEAT_FREQUENCY` is set, as deployments set it for the crash automation;
the UI-cancel watch gets the top run's id instead of looking it up (two API calls a round);
the round proposes in its body and records the best inside `update_tuner` (two task runs a
round fewer); VisualDL's writing runs on a thread of its own. Time to the first trial with a
running server is the CLI importing Prefect and creating the flow run; with the embedded API
it adds the start of a local API server (and, cold, its SQLite database), during which the
CLI now imports the flow engine, the watchers and the tuner's backend. Trials only sleep, so
2 cores suffice for S = 4, but the flow's own Python process, the server and the trials'
interpreter start-ups share those cores."""


def build_report(*, command: str, started: datetime.datetime, wall: float, configs: list[Config],
                 schedule: dict, summaries: dict, server_startup: float | None,
                 busy_notes: list[str], load: tuple[list[float], list[float]],
                 other_cpu: float, incidents: list[str], starts: dict,
                 floor: dict) -> tuple[str, str]:
    rows = [table_row(c, m, summaries[(c, m)]) for c in configs for m in (*MODES, "flow-ephemeral")
            if (c, m) in summaries]
    table = "\n".join([TABLE_HEAD, *rows])
    sched = ["| config | trials | sum of durations s | ideal s | greedy pool, no overhead s "
             "| waves, no overhead s |", "|---|---:|---:|---:|---:|---:|"]
    for c in configs:
        d = schedule[c]
        sched.append(f"| {c.name} | {c.trials} | {d['sum']:.2f} | {d['ideal']:.2f} | {d['greedy']:.2f} "
                     f"| {d['waves']:.2f} |")
    lines = [
        "# Orchestration benchmark",
        "",
        f"- Date: {started:%Y-%m-%d %H:%M %Z}",
        f"- Command (from the repo root): `{command}`",
        f"- Wall time: {wall:.0f} s ({wall / 60:.1f} min)",
        *_machine(),
        f"- Prefect API: a `prefect server start` (SQLite, temp PREFECT_HOME, 127.0.0.1), started once"
        + (f" in {server_startup:.1f} s" if server_startup is not None else "")
        + "; `flow-ephemeral` instead uses the embedded API in a fresh PREFECT_HOME",
        f"- Load average (1/5/15 min) at start {load[0][0]:.2f}/{load[0][1]:.2f}/{load[0][2]:.2f}, "
        f"at end {load[1][0]:.2f}/{load[1][1]:.2f}/{load[1][2]:.2f}",
        f"- Other processes on the host used {other_cpu:.0f} CPU-seconds during the run, "
        f"{100 * other_cpu / (wall * (os.cpu_count() or 1)):.0f}% of the {os.cpu_count()} cores "
        "(from /proc/stat minus this script's own process tree)",
        *([f"- **The machine was busy**: other processes took "
           f"{100 * other_cpu / (wall * (os.cpu_count() or 1)):.0f}% of its CPU time"]
          if other_cpu > 0.2 * wall * (os.cpu_count() or 1) else []),
        *([f"- **The machine was busy**: {n}" for n in busy_notes] or
          ["- No other benchmark (`bench/tuners.py`) ran during the measurement"]),
        *[f"- Incident: {n}" for n in incidents],
        "",
        "Every trial is `bench/sleep_train.py`, which sleeps a duration fixed per (round, candidate): "
        f"{DURATION_MIN_S} s + {PARETO_SCALE_S} s × Lomax(shape {PARETO_SHAPE}), clipped to "
        f"{DURATION_MAX_S} s (seed {SEED}), and logs its own start and end times. The same durations "
        "run three ways on S slots: **flow** = the real CLI (`python -m flows.autofinetune "
        f"bench/sleep_train.py --evaluator fulltrail --tuning-strategy {TUNER} --cpu-slots S ...`) in a "
        "subprocess; **pool** = no Prefect, the same tuner asks each round's candidates and a "
        "`ThreadPoolExecutor(max_workers=S)` runs them as subprocesses (the baseline); **waves** = the "
        "original's schedule, a round's candidates in waves of S, each wave waiting for its slowest "
        "trial. Rounds run one after another in every mode (a round's candidates exist only after the "
        "round before was told).",
        "",
        "## The schedules the durations allow",
        "",
        *sched,
        "",
        "ideal = Σ over rounds of max(longest trial, Σ durations / S): a lower bound for any schedule "
        "without overhead. Greedy pool = candidates started in index order on the first free slot "
        "(what pool and flow do), simulated with zero overhead; waves likewise.",
        "",
        "## Results",
        "",
        table,
        "",
        "Medians over the runs; gaps are pooled over the runs. makespan = first trial start → last "
        "trial end. × pool = makespan / the pool's makespan in the same invocation. efficiency = "
        "ideal / makespan. overhead ms/trial = (makespan − the pool's makespan) / trials. slot gap = "
        "within a round, the j-th trial to start (j ≥ S) minus the end of the (j−S)-th trial to end "
        "(the slot it took was freed then); it includes the child interpreter's exit and start-up, "
        "which every mode pays. round gap = first start of round k+1 − last end of round k. to 1st "
        "trial = command start → first trial start. tail = last trial end → command exit. "
        "wall = the whole command.",
        "",
        *what_this_shows(configs, summaries, schedule, floor),
        *(["", "## Time to the first trial against Prefect's own start", "",
           "Side by side, interleaved: `bench/empty_flow.py` (an empty `@flow` whose body writes the time) "
           "against the CLI's first trial (a 2-candidate, 1-round search; the trial's own interpreter start "
           "counted), from the command's start. Cold: a fresh PREFECT_HOME per run (the embedded server "
           "creates its database); warm: one used before; running server: the `prefect server start` above.",
           "", *starts_table(starts)] if starts else []),
    ]
    return "\n".join(lines), table


# ----------------------------------------------------------------------- main

def _parse_configs(text: str) -> list[Config]:
    configs = []
    for part in text.split(","):
        try:
            s, p, r = (int(x) for x in part.lower().split("x"))
        except ValueError:
            raise argparse.ArgumentTypeError(f"config {part!r} is not SLOTSxPOPSIZExROUNDS, e.g. 2x6x3")
        if min(s, p, r) < 1:
            raise argparse.ArgumentTypeError(f"config {part!r}: every number must be >= 1")
        configs.append(Config(s, p, r))
    return configs


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--configs", type=_parse_configs,
                        help="SLOTSxPOPSIZExROUNDS,... (default 2x6x3,4x8x3)")
    parser.add_argument("--repeats", type=int, default=None, help="runs per (config, mode) (default 3)")
    parser.add_argument("--start-repeats", type=int, default=None,
                        help="runs per way of reaching the API for the time to the first trial (default 2; 0: none)")
    parser.add_argument("--no-ephemeral", action="store_true",
                        help="skip the run with the embedded (ephemeral) Prefect API")
    parser.add_argument("--out", type=Path, help="Markdown report (default bench/results/orchestration.md; "
                        "--quick writes none unless given)")
    parser.add_argument("--keep", action="store_true", help="keep the temp dir (events, logs, run dirs)")
    parser.add_argument("--quick", action="store_true", help="smoke run: 2x3x2, one repeat, no ephemeral run")
    args = parser.parse_args(argv)

    configs = args.configs or ([Config(2, 3, 2)] if args.quick else [Config(*c) for c in DEFAULT_CONFIGS])
    repeats = args.repeats if args.repeats is not None else (1 if args.quick else 3)
    ephemeral = not (args.no_ephemeral or args.quick)
    default_out = _BENCH_DIR / "results" / "orchestration.md"
    out = args.out if args.out is not None else (None if args.quick else default_out)

    started = datetime.datetime.now().astimezone()
    command = shlex.join([os.path.relpath(sys.executable, _ROOT), os.path.relpath(__file__, _ROOT),
                          *(sys.argv[1:] if argv is None else argv)])
    if os.nice(0):
        command = f"nice -n {os.nice(0)} {command}"
    load_start = list(os.getloadavg())
    busy_notes: list[str] = []
    incidents: list[str] = []

    def note_busy(when: str) -> None:
        others = _other_benchmarks()
        if others:
            busy_notes.append(f"{when}, `bench/tuners.py` was running ({len(others)} processes)")

    note_busy("at the start")
    tmp = Path(tempfile.mkdtemp(prefix="bench-orchestration-"))
    (tmp / "hparam.yaml").write_text(HPARAM_YAML)
    schedule, durations_paths = {}, {}
    for c in configs:
        d = durations_for(c)
        path = tmp / f"durations-{c.slots}x{c.popsize}x{c.rounds}.json"
        path.write_text(json.dumps(d))
        durations_paths[c] = path
        schedule[c] = {"sum": sum(d.values()), "ideal": ideal_makespan(c, d),
                       "greedy": simulated_makespan(c, d, waves=False),
                       "waves": simulated_makespan(c, d, waves=True), "durations": d}

    t_start = time.perf_counter()
    cpu_start = _cpu_seconds()
    servers: list[PrefectServer] = []
    results: dict[tuple[Config, str], list[dict]] = {}
    starts: dict = {}
    floor: dict = {}

    def start_server() -> PrefectServer:
        home = tmp / f"server-home-{len(servers)}"
        home.mkdir()
        print("starting prefect server ...", file=sys.stderr, flush=True)
        servers.append(PrefectServer(home))
        print(f"  up in {servers[-1].startup_s:.1f} s at {servers[-1].url}", file=sys.stderr, flush=True)
        return servers[-1]

    failed = True
    try:
        server = start_server()
        # One warm-up flow run: the server creates the flow and task records on first use.
        warm = Config(1, 1, 1)
        warm_d = tmp / "durations-warmup.json"
        warm_d.write_text(json.dumps({"r0c0": 0.0}))
        run_flow(warm, tmp / "warmup", warm_d, server.client_env())
        start_repeats = args.start_repeats if args.start_repeats is not None else (1 if args.quick else 2)
        if start_repeats:
            start_d = tmp / "durations-start.json"
            start_d.write_text(json.dumps({"r0c0": 0.2, "r0c1": 0.2}))
            starts = measure_starts(tmp, server, start_d, start_repeats)
        floor = prefect_floor(tmp, server)
        for rep in range(repeats):
            for c in configs:
                for mode in MODES:
                    work = tmp / f"{mode}-{c.slots}x{c.popsize}x{c.rounds}-{rep}"
                    if mode in ("flow", "dask"):
                        for attempt in (1, 2):
                            try:
                                run = run_flow(c, work, durations_paths[c], server.client_env(), mode=mode)
                                break
                            except RuntimeError:
                                why = server.died()
                                if why is None or attempt == 2:
                                    raise
                            # Seen once in development, cause unknown: start a new one, rerun, say so.
                            incidents.append(f"the Prefect server ended during a flow run ({why}); "
                                              "a new one was started and the run repeated")
                            print(f"  the server died ({why}); restarting", file=sys.stderr, flush=True)
                            server.stop()
                            server = start_server()
                            shutil.rmtree(work)
                    else:
                        run = run_without_prefect(c, work, durations_paths[c], waves=mode == "waves")
                    a = analyse(run, schedule[c]["durations"])
                    results.setdefault((c, mode), []).append(a)
                    print(f"  [{rep + 1}/{repeats}] {c.name:<16} {mode:<6} wall {a['wall']:6.2f} s  "
                          f"makespan {a['makespan']:6.2f} s  to 1st trial {a['to_first']:5.2f} s",
                          file=sys.stderr, flush=True)
            note_busy(f"after repeat {rep + 1}")
        if ephemeral:
            c = configs[0]
            home = tmp / "ephemeral-home"
            home.mkdir()
            run = run_flow(c, tmp / f"flow-ephemeral-{c.slots}x{c.popsize}x{c.rounds}",
                           durations_paths[c], _base_env(home), mode="flow-ephemeral")
            a = analyse(run, schedule[c]["durations"])
            results[(c, "flow-ephemeral")] = [a]
            print(f"  {c.name:<16} flow-ephemeral wall {a['wall']:6.2f} s  makespan {a['makespan']:6.2f} s"
                  f"  to 1st trial {a['to_first']:5.2f} s", file=sys.stderr, flush=True)
            note_busy("after the ephemeral run")
        failed = False
    finally:
        for server in servers:
            server.stop()
        keep_or_remove(tmp, keep=args.keep or failed)
    wall = time.perf_counter() - t_start
    other_cpu = other_cpu_since(cpu_start)

    summaries = {}
    for c in configs:
        bare = _median([r["makespan"] for r in results[(c, "pool")]])
        for mode in (*MODES, "flow-ephemeral"):
            if (c, mode) in results:
                summaries[(c, mode)] = summarise(results[(c, mode)], schedule[c]["ideal"], c.trials,
                                                 None if mode == "pool" else bare)
    report, table = build_report(command=command, started=started, wall=wall, configs=configs,
                                 schedule=schedule, summaries=summaries,
                                 server_startup=servers[0].startup_s if servers else None,
                                 busy_notes=busy_notes, load=(load_start, list(os.getloadavg())),
                                 other_cpu=other_cpu, incidents=incidents, starts=starts,
                                 floor=floor)
    print(table)
    print(f"wall time {wall:.0f} s")
    if out is not None:
        out.parent.mkdir(parents=True, exist_ok=True)
        out.write_text(report)
        print(f"wrote {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
