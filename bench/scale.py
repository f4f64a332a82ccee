"""Benchmark a search at scale: thousands of instant trials, what the controller costs per
trial and per round, and whether anything grows with the search's length.

Not a test: a script that prints tables and writes a Markdown report.

    .venv/bin/python bench/scale.py                           # 100, 1,000 and 5,000 trials
    .venv/bin/python bench/scale.py --sizes 20x5,50x20        # what fits (POPSIZExROUNDS)
    .venv/bin/python bench/scale.py --quick                   # smoke run, no report

Every trial is ``bench/instant_train.py`` (reports at once: the trial is the interpreter's
start and exit). Each size runs the real CLI (``--cpu-slots 4 --evaluator fulltrail
--tuning-strategy hazero``) with the embedded Prefect API, in one PREFECT_HOME that an
empty flow has used first (warm). While it runs, this script samples every 0.5 s the CLI's
and its embedded server's /proc: peak RSS (VmHWM) and the CLI's own CPU time (not its
trials'). It reports:

  wall              command start -> exit
  CPU s / trial     the CLI process's own user+system CPU over the run / trials
  peak RSS          VmHWM of the CLI and of the server, separately
  run dir           bytes and files under --output-dir
  round gap         last trial end of round k -> first trial start of round k+1, from the
                    trials' records, by round: all the per-round overhead (Prefect's subflow
                    run, the tuner, the bookkeeping, the watchers)
  bookkeeping       a replay, on the largest run dir, of each round's bookkeeping with this
                    checkout's code: state.json (read, write), log_file.txt and best_model/
                    (``record_best``), VisualDL (the round's points, appended to a scratch copy),
                    the artifact's table; timed per round, so growth with the round shows
  resume            the largest search again, SIGKILLed once its last round started, then
                    the same command: its start -> the first new trial, against an empty
                    Prefect flow's start (bench/empty_flow.py) measured just before it
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import shlex
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

_BENCH_DIR = Path(__file__).resolve().parent
_ROOT = _BENCH_DIR.parent
sys.path[:] = [p for p in sys.path if Path(p or ".").resolve() != _BENCH_DIR]  # bench/tuners.py shadows tuners
if str(_ROOT) not in sys.path:
    sys.path.insert(0, str(_ROOT))

from bench.orchestration import (HPARAM_YAML, _base_env, _cpu_seconds, _machine,  # noqa: E402
                                 keep_or_remove, other_cpu_since)
from flows.ephemeral_server import children_serving_prefect  # noqa: E402

SCRIPT = "bench/instant_train.py"
SLOTS = 4
SAMPLE_S = 0.5
DEFAULT_SIZES = ((20, 5), (50, 20), (100, 50))


@dataclass(frozen=True)
class Size:
    popsize: int
    rounds: int

    @property
    def trials(self) -> int:
        return self.popsize * self.rounds

    @property
    def name(self) -> str:
        return f"{self.popsize}×{self.rounds}"


# ----------------------------------------------------------------------- /proc sampling

def _status(pid: int) -> dict[str, int]:
    """VmHWM and VmRSS in kB, and own CPU ticks (utime + stime), of a live process."""
    out = {}
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith(("VmHWM:", "VmRSS:")):
                out[line.split(":")[0]] = int(line.split()[1])
        fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
        out["ticks"] = int(fields[11]) + int(fields[12])
    except (FileNotFoundError, ProcessLookupError, IndexError):
        return {}
    return out


class Sampler:
    """The CLI's and its server's peaks and the CLI's own CPU, from /proc, while it runs."""

    def __init__(self, pid: int, out: Path) -> None:
        self.pid, self.out = pid, out
        self.cli: dict[str, int] = {}
        self.server: dict[str, int] = {}
        self.rss_by_round: dict[int, int] = {}  # rounds started -> the CLI's VmRSS then

    def sample(self) -> None:
        cli = _status(self.pid)
        if cli:
            self.cli = cli
            rounds = sum(1 for _ in self.out.glob("round*")) if self.out.is_dir() else 0
            self.rss_by_round.setdefault(rounds, cli["VmRSS"])
        for server in children_serving_prefect(self.pid):
            got = _status(server)
            if got and got.get("VmHWM", 0) >= self.server.get("VmHWM", 0):
                self.server = got


def _ms(stamp: str) -> float:
    return datetime.datetime.fromisoformat(stamp).timestamp()


def _records(out: Path, size: Size) -> list[list[dict]]:
    rounds = []
    for k in range(size.rounds):
        rounds.append([json.loads((out / f"round{k}" / f"trial-{i}.json").read_text())
                       for i in range(size.popsize)])
    return rounds


def _dir_size(path: Path) -> tuple[int, int]:
    total = files = 0
    for root, _, names in os.walk(path):
        for name in names:
            try:
                total += os.lstat(os.path.join(root, name)).st_size
                files += 1
            except FileNotFoundError:
                pass
    return total, files


# ----------------------------------------------------------------------- runs

def cli_argv(size: Size, work: Path) -> list[str]:
    return [sys.executable, "-m", "flows.autofinetune", SCRIPT, "--param-file", str(work.parent / "hparam.yaml"),
            "--evaluator", "fulltrail", "--tuning-strategy", "hazero", "--cpu-slots", str(SLOTS),
            "--popsize", str(size.popsize), "--round", str(size.rounds), "--seed", "0",
            "--output-dir", str(work / "out")]


def run_search(size: Size, work: Path, env: dict, *, kill_in_round: int | None = None) -> dict:
    """One CLI run, sampled; with ``kill_in_round``, SIGKILLed once that round's dir appears."""
    work.mkdir(parents=True, exist_ok=True)
    out = work / "out"
    log = open(work / "cli.log", "ab")
    t0 = time.time()
    proc = subprocess.Popen(cli_argv(size, work), cwd=_ROOT, env=env, stdout=log, stderr=subprocess.STDOUT,
                            stdin=subprocess.DEVNULL)
    sampler = Sampler(proc.pid, out)
    while proc.poll() is None:
        sampler.sample()
        if kill_in_round is not None and (out / f"round{kill_in_round}").is_dir():
            proc.send_signal(signal.SIGKILL)
            proc.wait()
            break
        time.sleep(SAMPLE_S if kill_in_round is None else 0.02)  # a kill must land mid-round
    t_exit = time.time()
    log.close()
    if kill_in_round is None and proc.returncode != 0:
        raise RuntimeError(f"the CLI exited {proc.returncode}; see {work / 'cli.log'}:\n"
                           f"{(work / 'cli.log').read_text()[-3000:]}")
    return {"t0": t0, "wall": t_exit - t0, "sampler": sampler, "code": proc.returncode}


def empty_flow_start(env: dict, work: Path) -> float:
    """Seconds from the command's start to an empty Prefect flow's body."""
    work.mkdir(parents=True, exist_ok=True)
    mark = work / f"empty-{time.monotonic_ns()}.txt"
    t0 = time.time()
    subprocess.run([sys.executable, str(_BENCH_DIR / "empty_flow.py"), str(mark)], cwd=_ROOT, env=env,
                   check=True, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    return float(mark.read_text()) - t0


def analyse(size: Size, work: Path, run: dict) -> dict:
    out = work / "out"
    rounds = _records(out, size)
    starts = [min(_ms(r["started_at"]) for r in rs) for rs in rounds]
    ends = [max(_ms(r["ended_at"]) for r in rs) for rs in rounds]
    gaps = [starts[k + 1] - ends[k] for k in range(size.rounds - 1)]
    bytes_, files = _dir_size(out)
    s = run["sampler"]
    ticks = os.sysconf("SC_CLK_TCK")
    return {
        "wall": run["wall"], "to_first": starts[0] - run["t0"], "makespan": ends[-1] - starts[0],
        "cpu_per_trial": s.cli.get("ticks", 0) / ticks / size.trials,
        "cli_peak_mb": s.cli.get("VmHWM", 0) / 1024, "server_peak_mb": s.server.get("VmHWM", 0) / 1024,
        "rss_by_round": dict(sorted(s.rss_by_round.items())),
        "bytes": bytes_, "files": files, "round_gaps": gaps,
    }


# ----------------------------------------------------------------------- bookkeeping replay

def replay_bookkeeping(out: Path, size: Size, scratch: Path) -> list[dict]:
    """Each round's bookkeeping, with this checkout's code, on the finished run dir ``out``:
    seconds per round for log_file.txt, state.json, VisualDL and the artifact's table."""
    from flows.artifacts import round_table
    from runtime.rundir import RunDir
    from runtime.search import record_best
    from watch.visualization import VisualDLLogs, round_points

    src = RunDir(out)
    names = ["x", "n"]
    copy = RunDir(scratch / "run")
    copy.path.mkdir(parents=True)
    shutil.copy(src.state_path, copy.state_path)
    logs = VisualDLLogs(scratch / "visualization")
    history = _records(out, size)
    rows = []
    for k in range(size.rounds):
        for i in range(size.popsize):  # the round's records, as its trials wrote them
            copy.round_dir(k).mkdir(exist_ok=True)
            shutil.copy(src.trial_path(k, i), copy.trial_path(k, i))
        t = time.perf_counter()
        state = copy.read_state()
        state.next_round = k + 1  # as tell_round leaves it
        copy.write_state(state)
        t_state = time.perf_counter() - t
        t = time.perf_counter()
        record_best(copy, names, final=False)  # best_model/ and log_file.txt
        t_log = time.perf_counter() - t
        t = time.perf_counter()
        logs.write_round(k, round_points(k, history[:k + 1], names))
        t_vdl = time.perf_counter() - t
        t = time.perf_counter()
        round_table(history[k], names)
        t_art = time.perf_counter() - t
        rows.append({"round": k, "log_file": t_log, "state": t_state, "visualdl": t_vdl, "artifact": t_art})
    return rows


# ----------------------------------------------------------------------- report

def _gap_points(gaps: list[float]) -> str:
    """Round gaps (ms) at the first, middle and last round boundaries, medians of 3."""
    if not gaps:
        return "—"
    n = len(gaps)
    picks = [(1, gaps[:3]), (n // 2 + 1, gaps[max(0, n // 2 - 1):n // 2 + 2]), (n, gaps[-3:])]
    return " / ".join(f"{1000 * statistics.median(g):.0f}" for _, g in picks)


def build_report(*, command: str, started: datetime.datetime, wall: float, sizes: list[Size], results: dict,
                 replay: list[dict], replay_size: Size, resume: dict | None, empty: list[float],
                 load: tuple[list[float], list[float]], other_cpu: float) -> str:
    cores = os.cpu_count() or 1
    lines = [
        "# Scale benchmark", "",
        f"- Date: {started:%Y-%m-%d %H:%M %Z}",
        f"- Command (from the repo root): `{command}`",
        f"- Wall time: {wall:.0f} s ({wall / 60:.1f} min)",
        *_machine(),
        f"- Load average (1/5/15 min) at start {load[0][0]:.2f}/{load[0][1]:.2f}/{load[0][2]:.2f}, "
        f"at end {load[1][0]:.2f}/{load[1][1]:.2f}/{load[1][2]:.2f}",
        f"- Other processes on the host used {other_cpu:.0f} CPU-seconds during the run, "
        f"{100 * other_cpu / (wall * cores):.0f}% of the {cores} cores: **the machine was shared**, so "
        "seconds are noisy; ratios within this run are what to read",
        f"- PYTHONDONTWRITEBYTECODE={os.environ.get('PYTHONDONTWRITEBYTECODE', '(unset)')} in this "
        "environment; the runs here drop it, so imports read cached bytecode as a user's would",
        "",
        f"Every trial is `{SCRIPT}` (reports at once). The CLI: `python -m flows.autofinetune {SCRIPT} "
        f"--evaluator fulltrail --tuning-strategy hazero --cpu-slots {SLOTS} --popsize P --round R ...`, "
        "embedded Prefect API, one warm PREFECT_HOME.",
        "",
        "## Runs",
        "",
        "| popsize × rounds | trials | wall s | to 1st trial s | trials/s | CLI CPU ms / trial | CLI peak RSS MB "
        "| server peak RSS MB | run dir MB (files) | round gap ms: first / middle / last |",
        "|---|---:|---:|---:|---:|---:|---:|---:|---:|---|",
    ]
    for size in sizes:
        r = results[size]
        lines.append(f"| {size.name} | {size.trials} | {r['wall']:.1f} | {r['to_first']:.2f} "
                     f"| {size.trials / r['makespan']:.1f} | {1000 * r['cpu_per_trial']:.1f} | {r['cli_peak_mb']:.0f} "
                     f"| {r['server_peak_mb']:.0f} | {r['bytes'] / 1e6:.1f} ({r['files']}) "
                     f"| {_gap_points(r['round_gaps'])} |")
    small, big = results[sizes[0]], results[sizes[-1]]
    lines += ["", "The CLI's resident memory (VmRSS) when the run dir had n rounds, largest run:", "",
              "| rounds started | " + " | ".join(str(k) for k in _spread(list(big["rss_by_round"]))) + " |",
              "|---|" + "---:|" * len(_spread(list(big["rss_by_round"]))),
              "| CLI VmRSS MB | " + " | ".join(f"{big['rss_by_round'][k] / 1024:.0f}"
                                              for k in _spread(list(big["rss_by_round"]))) + " |", ""]
    lines += [f"CLI peak RSS at {sizes[-1].trials} trials is {big['cli_peak_mb'] / small['cli_peak_mb']:.3f}× "
              f"its peak at {sizes[0].trials} trials (target ≤ 1.10).", ""]
    lines += ["## Bookkeeping per round (replay on the largest run dir)", "",
              f"{replay_size.name}: each round's bookkeeping done again with this checkout's code, in order, "
              "on a copy that grows round by round as the search's did. ms per round:", "",
              "| round | log_file.txt + best_model/ | state.json | VisualDL | artifact table | total |",
              "|---:|---:|---:|---:|---:|---:|"]
    for k in _spread(list(range(replay_size.rounds))):
        row = replay[k]
        total = row["log_file"] + row["state"] + row["visualdl"] + row["artifact"]
        lines.append(f"| {k + 1} | {1000 * row['log_file']:.1f} | {1000 * row['state']:.1f} "
                     f"| {1000 * row['visualdl']:.1f} | {1000 * row['artifact']:.2f} | {1000 * total:.1f} |")
    def total(rows):
        return statistics.median(r["log_file"] + r["state"] + r["visualdl"] + r["artifact"] for r in rows)
    first, last = total(replay[:3]), total(replay[-3:])
    lines += ["", f"Median of the last 3 rounds / median of the first 3: {last / first:.2f}× (target ≤ 2).", ""]
    if resume is not None:
        lines += ["## Resume after a kill in the last round", "",
                  f"{resume['size'].name}: SIGKILL of the CLI once `round{resume['size'].rounds - 1}/` appeared "
                  f"({resume['done_before']} of its trials had finished), then the same command.", "",
                  f"- Resume: command start → first new trial {resume['to_first']:.2f} s "
                  f"(whole command {resume['wall']:.1f} s)",
                  f"- Prefect's empty flow in the same PREFECT_HOME, just before: "
                  f"{', '.join(f'{x:.2f}' for x in empty)} s (median {statistics.median(empty):.2f})",
                  f"- Resume − empty flow: {resume['to_first'] - statistics.median(empty):+.2f} s (target ≤ +2 s)", ""]
    return "\n".join(lines)


def _spread(keys: list[int], n: int = 6) -> list[int]:
    """Up to n keys spread from the first to the last."""
    if len(keys) <= n:
        return keys
    return sorted({keys[round(j * (len(keys) - 1) / (n - 1))] for j in range(n)})


# ----------------------------------------------------------------------- main

def _parse_sizes(text: str) -> list[Size]:
    sizes = []
    for part in text.split(","):
        try:
            p, r = (int(x) for x in part.lower().split("x"))
        except ValueError:
            raise argparse.ArgumentTypeError(f"size {part!r} is not POPSIZExROUNDS, e.g. 50x20")
        sizes.append(Size(p, r))
    return sizes


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--sizes", type=_parse_sizes, help="POPSIZExROUNDS,... smallest first (default "
                        "20x5,50x20,100x50)")
    parser.add_argument("--no-resume", action="store_true", help="skip the kill-and-resume run")
    parser.add_argument("--out", type=Path, help="Markdown report (default bench/results/scale.md)")
    parser.add_argument("--keep", action="store_true", help="keep the temp dir")
    parser.add_argument("--quick", action="store_true", help="smoke run: 4x3,8x4, no report unless --out")
    args = parser.parse_args(argv)
    sizes = args.sizes or ([Size(4, 3), Size(8, 4)] if args.quick else [Size(*s) for s in DEFAULT_SIZES])
    out = args.out if args.out is not None else (None if args.quick else _BENCH_DIR / "results" / "scale.md")

    started = datetime.datetime.now().astimezone()
    command = shlex.join([os.path.relpath(sys.executable, _ROOT), os.path.relpath(__file__, _ROOT),
                          *(sys.argv[1:] if argv is None else argv)])
    load_start = list(os.getloadavg())
    tmp = Path(tempfile.mkdtemp(prefix="bench-scale-"))
    (tmp / "hparam.yaml").write_text(HPARAM_YAML)
    home = tmp / "prefect-home"
    home.mkdir()
    env = dict(_base_env(home), PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS="120",
               AUTOFINETUNE_PROGRESS="plain", CUDA_VISIBLE_DEVICES="")
    env.pop("PYTHONDONTWRITEBYTECODE", None)
    t_start = time.perf_counter()
    cpu_start = _cpu_seconds()
    results, empty, resume = {}, [], None
    failed = True
    try:
        print(f"warming up PREFECT_HOME: empty flow {empty_flow_start(env, tmp / 'empty'):.2f} s", file=sys.stderr)
        for size in sizes:
            work = tmp / f"run-{size.popsize}x{size.rounds}"
            run = run_search(size, work, env)
            results[size] = analyse(size, work, run)
            r = results[size]
            print(f"  {size.name:>7}: wall {r['wall']:.1f} s, CLI {r['cli_peak_mb']:.0f} MB, server "
                  f"{r['server_peak_mb']:.0f} MB, {1000 * r['cpu_per_trial']:.1f} CPU ms/trial", file=sys.stderr)
        big = sizes[-1]
        replay = replay_bookkeeping(tmp / f"run-{big.popsize}x{big.rounds}" / "out", big, tmp / "replay")
        if not args.no_resume:
            work = tmp / "resume"
            run_search(big, work, env, kill_in_round=big.rounds - 1)
            last = work / "out" / f"round{big.rounds - 1}"
            done_before = len(list(last.glob("trial-*.json")))
            empty = [empty_flow_start(env, tmp / "empty") for _ in range(2)]
            again = run_search(big, work, env)
            new_starts = [_ms(json.loads(p.read_text())["started_at"]) for p in last.glob("trial-*.json")]
            new_starts = [t for t in new_starts if t > again["t0"]]
            resume = {"size": big, "done_before": done_before, "wall": again["wall"],
                      "to_first": min(new_starts) - again["t0"] if new_starts else float("nan")}
            print(f"  resume: first new trial after {resume['to_first']:.2f} s; empty flow {empty}", file=sys.stderr)
        failed = False
    finally:
        keep_or_remove(tmp, keep=args.keep or failed)
    wall = time.perf_counter() - t_start
    other_cpu = other_cpu_since(cpu_start)
    report = build_report(command=command, started=started, wall=wall, sizes=sizes, results=results,
                          replay=replay, replay_size=sizes[-1], resume=resume, empty=empty,
                          load=(load_start, list(os.getloadavg())), other_cpu=other_cpu)
    print(report)
    if out is not None:
        out.parent.mkdir(parents=True, exist_ok=True)
        out.write_text(report + "\n")
        print(f"wrote {out}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
