"""The progress display: plain lines in a real search, the live panel on a (forced or real) TTY."""

from __future__ import annotations

import io
import json
import logging
import os
import pty
import re
import select
import subprocess
import sys
import threading
import time

import pytest
from rich.console import Console

from conftest import ROOT
from flows.cli import main
from watch.progress import ProgressDisplay, format_duration

ANSI = re.compile(r"\x1b\[[0-9;?]*[A-Za-z]")
SLOTS = [{"index": 0, "gpu": None, "ordinal": 0}, {"index": 1, "gpu": None, "ordinal": 0}]


class FakeClock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


def info(rounds=2, popsize=4, slots=SLOTS, trials=(), next_round=0):
    return {"output_dir": "/x", "names": ["x", "n"], "rounds": rounds, "popsize": popsize,
            "next_round": next_round, "slots": list(slots), "resumed": bool(trials),
            "trials": list(trials)}


def record(k, i, score=None, outcome="ok", duration=1.0, **params):
    return {"round": k, "candidate": i, "outcome": outcome, "score": score, "duration_s": duration,
            "params": params or {"x": 0.1 * i, "n": i}, "error": None if outcome == "ok" else "exit status 3"}


def our_lines(text: str) -> list[str]:
    return [line for line in text.splitlines() if line.startswith("[autofinetune] ")]


# -- plain mode, a real search --------------------------------------------------------------

@pytest.mark.usefixtures("prefect_api", "lock_dir")
def test_plain_lines_of_a_real_search(toy, monkeypatch, capsys):
    monkeypatch.delenv("AUTOFINETUNE_PROGRESS", raising=False)
    monkeypatch.chdir(toy)
    code = main(["train.py", "--param-file", "hparam.yaml", "--evaluator", "fulltrail",
                 "--popsize", "3", "--round", "2", "--cpu-slots", "2", "--seed", "3",
                 "--output-dir", "out", "plan", json.dumps({"r0c1": "crash"})])
    assert code == 0
    console = capsys.readouterr().out
    assert "\x1b" not in console and "\r" not in console
    lines = our_lines(console)
    assert "[autofinetune] search: 2 rounds of 3 trials on 2 CPU slots" in lines
    assert sum(" started on cpu-slot " in line for line in lines) == 6
    finished = [line for line in lines if re.search(r": r\dc\d (done|failed)", line)]
    assert len(finished) == 6
    crashed = next(line for line in finished if ": r0c1 failed" in line)
    assert "crashed (exit status 3)" in crashed
    # The last trial of each round sees the whole round counted.
    assert "this round: 2 done, 1 failed of 3 | total: 2 done, 1 failed of 6" in finished[2]
    assert "this round: 3 done, 0 failed of 3 | total: 5 done, 1 failed of 6" in finished[5]
    assert all(re.search(r"\| elapsed \d+s, left ~\d+s \(trial mean \d+\.\ds\)$", line) for line in finished)
    # The best, with its hyperparameters, is the run dir's best.
    state = json.loads((toy / "out" / "state.json").read_text())
    best = state["best"]
    trial = json.loads((toy / "out" / f"round{best['round']}" / f"trial-{best['candidate']}.json").read_text())
    expected = (f"best {best['score']:.6g} (r{best['round']}c{best['candidate']}): "
                f"x={trial['params']['x']}, n={trial['params']['n']}")
    assert lines[-1].startswith("[autofinetune] search finished in ")
    assert lines[-1].endswith(f": 5 done, 1 failed | {expected}")
    assert sum(line.startswith("[autofinetune] round 1/2 finished") for line in lines) == 1
    assert lines[-2].startswith("[autofinetune] round 2/2 finished in ") and "left ~0s" in lines[-2]
    # The flow's own per-round lines are still there.
    assert "The local best eval value in the 0-th round is" in console
    assert "The local best eval value in the 1-th round is" in console

    # Extending the search resumes: trials already on disk count, nothing is run twice.
    code = main(["train.py", "--param-file", "hparam.yaml", "--evaluator", "fulltrail",
                 "--popsize", "3", "--round", "3", "--cpu-slots", "2", "--seed", "3",
                 "--output-dir", "out"])
    assert code == 0
    lines = our_lines(capsys.readouterr().out)
    assert lines[1] == ("[autofinetune] search: 3 rounds of 3 trials on 2 CPU slots; "
                        "resuming at round 3/3 with 6 trials already finished")
    assert sum(" started on " in line for line in lines) == 3
    assert "total: 8 done, 1 failed of 9" in lines[-3]


# -- plain mode, driven directly --------------------------------------------------------------

def test_plain_estimate_counts_waves_of_slots():
    out, clock = io.StringIO(), FakeClock()
    display = ProgressDisplay(mode="plain", stream=out, clock=clock)
    display.search_started(info(rounds=2, popsize=4))
    for i in range(2):
        display.trial_started(0, i, SLOTS[i], {})
    clock.now += 10
    display.trial_finished(record(0, 0, score=0.5, duration=10.0))
    display.trial_finished(record(0, 1, outcome="crashed", duration=10.0))
    display.close()
    lines = out.getvalue().splitlines()
    assert lines[0] == "[autofinetune] search: 2 rounds of 4 trials on 2 CPU slots"
    assert lines[1].endswith("best - (no score yet) | elapsed 0s, left ?")
    # 2 trials left in round 1 on 2 slots = 1 wave, then 1 round of 2 waves: 3 x 10 s.
    assert lines[4] == ("[autofinetune] round 1/2: r0c1 failed in 10.0s: crashed (exit status 3) "
                        "| running 0 | this round: 1 done, 1 failed of 4 | total: 1 done, 1 failed "
                        "of 8 | best 0.5 (r0c0) | elapsed 10s, left ~30s (trial mean 10.0s)")
    assert "(new best)" in lines[3]


def test_trials_stopped_early_are_counted_apart():
    out = io.StringIO()
    display = ProgressDisplay(mode="plain", stream=out, clock=FakeClock())
    display.search_started(info(rounds=2, popsize=3))
    stopped = {**record(0, 1, outcome="pruned"), "curve": [[1, 0.25], [3, 0.125]]}
    records = [record(0, 0, score=0.5), stopped, record(0, 2, outcome="crashed")]
    for r in records:
        display.trial_finished(r)
    display.round_finished(0, records, None)
    lines = out.getvalue().splitlines()
    assert ": r0c1 stopped early in 1.0s at step 3 (value 0.125) | " in lines[2]
    assert "this round: 1 done, 1 stopped early, 1 failed of 3 | total: 1 done, 1 stopped early, 1 failed" \
        in lines[3]
    assert "finished: 1 done, 1 stopped early, 1 failed" in lines[4]
    panel = Console(file=io.StringIO(), width=120, record=True)
    panel.print(display.render())
    text = panel.export_text()
    assert re.search(r"stopped", text) and re.search(r"total\s+0\s+1\s+1\s+1\s+6", text)


def test_a_trial_reported_again_is_counted_once_and_no_record_is_kept():
    out, clock = io.StringIO(), FakeClock()
    display = ProgressDisplay(mode="plain", stream=out, clock=clock)
    display.search_started(info(rounds=2, popsize=2, trials=[record(0, 0, score=0.1, duration=4.0)],
                                next_round=0))
    first = record(0, 1, outcome="crashed", duration=8.0)
    display.trial_finished(first)
    display.round_finished(0, [record(0, 0, score=0.1, duration=4.0), first], None)  # both again
    display.close()
    assert out.getvalue().splitlines()[-1] == (
        "[autofinetune] round 1/2 finished: 1 done, 1 failed | best 0.1 (r0c0): x=0.0, n=0 "
        "| elapsed 0s, left ~6s (trial mean 6.0s)")  # one wave of 2 left
    assert all(isinstance(v, tuple) for v in display._finished.values())


def test_the_time_left_does_not_wait_for_trials_already_stopped_early():
    out = io.StringIO()
    display = ProgressDisplay(mode="plain", stream=out, clock=FakeClock())
    display.search_started(info(rounds=1, popsize=3, slots=[{"index": 0, "gpu": None}]))
    display.trial_finished({**record(0, 0, outcome="pruned", duration=4.0), "curve": [[1, 0.25]]})
    assert "left ~8s (trial mean 4.0s)" in out.getvalue().splitlines()[-1]  # 2 trials left, one slot


def test_plain_mode_is_thread_safe():
    out = io.StringIO()
    display = ProgressDisplay(mode="plain", stream=out)
    n_threads, per_thread = 8, 25
    display.search_started(info(rounds=1, popsize=n_threads * per_thread, slots=[SLOTS[0]] * n_threads))
    barrier = threading.Barrier(n_threads)

    def work(t):
        barrier.wait()
        for j in range(per_thread):
            i = t * per_thread + j
            display.trial_started(0, i, {"index": t, "gpu": None}, {})
            display.trial_finished(record(0, i, score=float(i)))

    threads = [threading.Thread(target=work, args=(t,)) for t in range(n_threads)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    display.search_finished({})
    lines = out.getvalue().splitlines()
    assert len(lines) == 2 + 2 * n_threads * per_thread
    assert all(line.startswith("[autofinetune] ") for line in lines)
    total = n_threads * per_thread
    assert lines[-1].endswith(f": {total} done, 0 failed | best {total - 1} (r0c{total - 1}): "
                              f"x={0.1 * (total - 1)}, n={total - 1}")


def test_a_closed_stream_silences_the_display():
    out = io.StringIO()
    display = ProgressDisplay(mode="plain", stream=out)
    out.close()
    display.search_started(info())
    display.trial_started(0, 0, SLOTS[0], {})
    display.trial_finished(record(0, 0, score=1.0))
    display.round_finished(0, [], None)
    display.search_finished({})
    display.close()


def test_control_characters_in_values_never_reach_the_log():
    out = io.StringIO()
    display = ProgressDisplay(mode="plain", stream=out)
    display.search_started(info(rounds=1, popsize=1))
    display.trial_started(0, 0, SLOTS[0], {})
    display.trial_finished(record(0, 0, score=1.0, opt="ad\x1b[2Jam\r"))
    display.search_finished({})
    assert "\x1b" not in out.getvalue() and "\r" not in out.getvalue()
    assert "opt=ad?[2Jam?" in out.getvalue()


def test_auto_mode_picks_plain_off_a_tty_and_env_can_turn_it_off(monkeypatch):
    assert ProgressDisplay(stream=io.StringIO()).mode == "plain"
    closed = io.StringIO()
    closed.close()
    assert ProgressDisplay(stream=closed).mode == "plain"
    monkeypatch.setenv("AUTOFINETUNE_PROGRESS", "off")
    assert ProgressDisplay.from_env() is None
    monkeypatch.setenv("AUTOFINETUNE_PROGRESS", "plain")
    assert ProgressDisplay.from_env().mode == "plain"
    with pytest.raises(ValueError, match="got 'fancy'"):
        ProgressDisplay(mode="fancy")


def test_format_duration():
    assert [format_duration(s) for s in (0, 7.4, 59.6, 185, 7440)] == ["0s", "7s", "1m00s", "3m05s", "2h04m"]


# -- live mode ------------------------------------------------------------------------------

def live_display(width=80, **kwargs):
    buffer = io.StringIO()
    console = Console(file=buffer, force_terminal=True, width=width, height=30, color_system="standard")
    return ProgressDisplay(mode="live", console=console, refresh_s=3600, **kwargs), buffer


def last_frame(buffer: io.StringIO) -> str:
    """The text of the last panel drawn (escape codes removed)."""
    text = ANSI.sub("", buffer.getvalue())
    return text[text.rindex("╭─ autofinetune"):]


def test_live_panel_shows_round_trials_best_and_running():
    clock = FakeClock()
    display, buffer = live_display(clock=clock)
    display.search_started(info(rounds=3, popsize=4))
    display.trial_started(0, 0, SLOTS[0], {})
    display.trial_started(0, 1, SLOTS[1], {})
    clock.now += 4
    display.trial_finished(record(0, 0, score=0.875, duration=4.0, lr=0.01, layers=3))
    display.trial_finished(record(0, 1, outcome="crashed", duration=4.0))
    display.trial_started(0, 2, SLOTS[0], {})
    clock.now += 2
    frame = ANSI.sub("", display_frame(display))
    assert "round 1/3 running" in frame and "elapsed 6s" in frame
    assert "left ~" in frame and "(trial mean 4.0s)" in frame
    assert re.search(r"this round\s+1\s+1\s+1\s+4", frame)  # running, done, failed, of
    assert re.search(r"total\s+1\s+1\s+1\s+12", frame)
    assert "best 0.875 (r0c0): lr=0.01, layers=3" in frame
    assert "running: r0c2 on cpu-slot 0 2s" in frame
    display.close()
    assert "best 0.875 (r0c0)" in last_frame(buffer)


def display_frame(display: ProgressDisplay) -> str:
    console = Console(file=io.StringIO(), width=80, force_terminal=False)
    console.print(display.render())
    return console.file.getvalue()


def test_live_panel_prints_other_output_above_it_and_restores_streams():
    display, buffer = live_display()
    # A terminal log handler (as Prefect's console handler) is moved above the panel too.
    master, slave = pty.openpty()
    tty_stream = os.fdopen(slave, "w")
    handler = logging.StreamHandler(tty_stream)
    logger = logging.getLogger("autofinetune.test_progress")
    logger.addHandler(handler)
    logger.propagate = False
    stdout_before = sys.stdout
    try:
        display.search_started(info(rounds=2, popsize=2))
        assert sys.stdout is not stdout_before and handler.stream is not tty_stream
        display.trial_started(0, 0, SLOTS[0], {})
        print("The local best eval value in the 0-th round is 0.5.")
        print("partial line without newline", end="")
        logger.warning("a log line from a worker")
        display.round_finished(0, [record(0, 0, score=0.5)], record(0, 0, score=0.5))
        display.search_finished({})
    finally:
        display.close()
        logger.removeHandler(handler)
    assert sys.stdout is stdout_before and handler.stream is tty_stream
    text = ANSI.sub("", buffer.getvalue())
    for line in ("The local best eval value in the 0-th round is 0.5.", "partial line without newline",
                 "a log line from a worker"):
        assert line in text
    # What was printed comes before the final panel, which stays on screen.
    assert text.rindex("a log line from a worker") < text.rindex("╭─ autofinetune")
    assert "round 2/2 finished" in last_frame(buffer) or "round 1/2 finished" in last_frame(buffer)
    tty_stream.close()
    os.close(master)


def test_live_panel_survives_a_narrow_terminal_and_a_dead_one():
    display, buffer = live_display(width=12)
    display.search_started(info())
    display.trial_started(0, 0, SLOTS[0], {})
    display.trial_finished(record(0, 0, score=0.5, name="a-very-long-hyperparameter-value" * 3))
    display.close()
    assert max(len(line) for line in ANSI.sub("", buffer.getvalue()).splitlines()) <= 12

    stdout_before = sys.stdout
    display, buffer = live_display()
    display.search_started(info())
    buffer.close()  # the terminal went away
    display.trial_started(0, 0, SLOTS[0], {})
    display.trial_finished(record(0, 0, score=0.5))
    display.search_finished({})
    display.close()
    assert sys.stdout is stdout_before


@pytest.mark.slow
@pytest.mark.usefixtures("lock_dir")
def test_cli_under_a_pty_draws_the_panel_and_keeps_the_round_lines(toy, prefect_server):
    """The real command in a real terminal: the panel, the flow's lines and Prefect's log."""
    master, slave = pty.openpty()
    env = dict(prefect_server, PYTHONPATH=str(ROOT), TERM="xterm-256color", COLUMNS="100", LINES="40")
    env.pop("AUTOFINETUNE_PROGRESS", None)
    proc = subprocess.Popen([sys.executable, "-m", "flows.autofinetune", "train.py", "--param-file",
                             "hparam.yaml", "--popsize", "3", "--round", "2", "--cpu-slots", "2",
                             "--evaluator", "fulltrail", "--output-dir", "out"],
                            cwd=toy, env=env, stdin=slave, stdout=slave, stderr=slave)
    os.close(slave)
    chunks, deadline = [], time.monotonic() + 240
    while time.monotonic() < deadline:
        ready, _, _ = select.select([master], [], [], 1)
        if ready:
            try:
                data = os.read(master, 65536)
            except OSError:  # EIO: every writer closed the terminal
                break
            if not data:
                break
            chunks.append(data)
        elif proc.poll() is not None:
            break
    os.close(master)
    assert proc.wait(timeout=30) == 0
    raw = b"".join(chunks).decode(errors="replace")
    assert "\x1b[" in raw  # a live display, not plain lines
    text = ANSI.sub("", raw)
    assert "[autofinetune] round " not in text  # no plain lines on a terminal
    assert "The local best eval value in the 0-th round is" in text
    assert "The local best eval value in the 1-th round is" in text
    assert "The final best eval score is" in text
    assert "Task run 'train-r1-c2'" in text  # Prefect's console log, routed above the panel
    final = text[text.rindex("╭─ autofinetune"):]
    assert "round 2/2 finished" in final
    assert re.search(r"total\s+0\s+6\s+0\s+6", final)
