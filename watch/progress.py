"""Live progress of a search in the terminal: a watcher (see ``watch.watchers``).

On a terminal it draws a small rich ``Live`` panel below the normal output: round k of N,
trials running / done / stopped early / failed (this round and in total), the best score so far with its
hyperparameters, the elapsed time and an estimate of the time left. Everything else
printed meanwhile (the flow's per-round lines, crash warnings, Prefect's console log)
still appears, above the panel: while the panel is up, ``sys.stdout``, ``sys.stderr``
(when it is the terminal too) and Prefect's console handlers write through a proxy
stream that prints each complete line above the live region (as rich's ``FileProxy``).

When stdout is not a terminal (CI, a log file, pytest) it prints plain one-line records
instead, with no control characters::

    [autofinetune] round 1/3: r0c2 done in 1.3s, score 0.91 | running 1 | this round: 2 done,
    0 failed of 4 | total: 5 done, 0 failed of 12 | best 0.93 (r0c1) | elapsed 12s, left ~20s
    (trial mean 1.3s)

(one line in reality). Rounds are numbered from 1 here ("round 1/3"); ``r<k>c<i>`` is the
trial's round and candidate as in ``round<k>/`` and the Prefect task ``train-r<k>-c<i>``.

Time left is estimated from trials, not rounds: the mean duration of the finished trials
times the waves still to run, where a wave is up to ``min(slots, popsize)`` trials at once
and a round waits for its last trial (so ``ceil(left in this round / slots)`` waves now, and
``ceil(popsize / slots)`` per round still to come). It says "left ?" until a trial finished.

A display must never break a search: a closed stdout or a terminal that fails silences
the display; it never raises.
"""

from __future__ import annotations

import io
import logging
import math
import os
import sys
import threading
import time
from typing import Callable, TextIO

from rich.ansi import AnsiDecoder
from rich.console import Console, Group
from rich.live import Live
from rich.panel import Panel
from rich.table import Table
from rich.text import Text

from runtime.rundir import trial_rank_key
from runtime.trial import FINAL_OUTCOMES

__all__ = ["ProgressDisplay", "MODES", "MODE_ENV", "format_duration"]

MODE_ENV = "AUTOFINETUNE_PROGRESS"  # auto | live | plain | off
MODES = ("auto", "live", "plain", "off")
_PREFIX = "[autofinetune]"
_MAX_RUNNING_SHOWN = 6  # running trials listed by name in the live panel


def format_duration(seconds: float) -> str:
    """``7s``, ``3m05s``, ``2h04m``: short and free of control characters."""
    s = max(0, int(round(seconds)))
    if s < 60:
        return f"{s}s"
    if s < 3600:
        return f"{s // 60}m{s % 60:02d}s"
    return f"{s // 3600}h{s % 3600 // 60:02d}m"


def _printable(text: str) -> str:
    return "".join(ch if ch.isprintable() else "?" for ch in text)


def _isatty(stream) -> bool:
    try:
        return bool(stream is not None and stream.isatty())
    except (ValueError, OSError, AttributeError):  # closed, or not a file at all
        return False


def _trial_name(k: int, i: int) -> str:
    return f"r{k}c{i}"


class _AboveLive(io.TextIOBase):
    """A text stream whose complete lines print above the live panel.

    rich's ``FileProxy`` does this for ``Live(redirect_stdout=True)``, but it buffers without
    a lock (trials' threads print concurrently) and ``Console.file`` unwraps it, so it
    cannot be handed to another Console (Prefect's console handler has its own).
    """

    def __init__(self, console: Console, file: TextIO, lock: threading.Lock) -> None:
        super().__init__()
        self._console = console
        self._file = file
        self._lock = lock
        self._buffer: list[str] = []
        self._decoder = AnsiDecoder()

    @property
    def encoding(self) -> str:  # type: ignore[override]
        return getattr(self._file, "encoding", None) or "utf-8"

    def writable(self) -> bool:
        return True

    def isatty(self) -> bool:
        return _isatty(self._file)

    def fileno(self) -> int:
        return self._file.fileno()

    def write(self, text: str) -> int:
        with self._lock:
            *complete, rest = text.split("\n")
            if complete:
                complete[0] = "".join(self._buffer) + complete[0]
                self._buffer = []
                self._print(complete)
            if rest:
                self._buffer.append(rest)
        return len(text)

    def flush(self) -> None:
        with self._lock:
            if self._buffer:
                self._print(["".join(self._buffer)])
                self._buffer = []

    def _print(self, lines: list[str]) -> None:
        self._console.print(Text("\n").join(self._decoder.decode_line(line) for line in lines))


class ProgressDisplay:
    """Watcher that shows a search's progress: a live panel on a TTY, plain lines otherwise.

    ``mode``: ``"auto"`` (live when ``stream`` is a terminal), ``"live"`` or ``"plain"``.
    ``stream``: where to write; None means the current ``sys.stdout`` at each write.
    ``console``: the rich Console of the live panel (tests pass one writing to a StringIO
    with ``force_terminal=True``); by default one on ``stream``.
    ``refresh_s``: how often the live panel redraws (its clock keeps running between events).
    """

    def __init__(self, *, mode: str = "auto", stream: TextIO | None = None,
                 console: Console | None = None, refresh_s: float = 0.5,
                 clock: Callable[[], float] = time.monotonic) -> None:
        if mode not in MODES or mode == "off":
            raise ValueError(f"ProgressDisplay mode must be one of auto, live, plain, got {mode!r}")
        if mode == "auto":
            target = stream if stream is not None else sys.stdout
            live = _isatty(target) and os.environ.get("TERM", "") not in ("dumb", "unknown")
            mode = "live" if live else "plain"
        self.mode = mode
        self._stream = stream
        self._console = console
        self._refresh_s = refresh_s
        self._clock = clock
        self._lock = threading.Lock()  # guards the counters below (and orders plain lines)
        self._write_lock = threading.Lock()
        self._silent = False  # set once writing failed (closed stdout): say nothing more
        # what the search told us
        self._rounds = 0
        self._popsize = 0
        self._slots = 1
        self._gpus: list[str] = []
        self._t0: float | None = None
        self._round = 0
        self._round_t0: float | None = None
        self._round_done: set[int] = set()
        # Per finished trial only (ok, pruned, seconds), and running sums: a search of thousands of
        # trials neither keeps every record (~3.5 KB each) nor rescans them on every event.
        self._finished: dict[tuple[int, int], tuple[bool, bool, float | None]] = {}  # (ok, pruned, s)
        self._per_round: dict[int, list[int]] = {}  # k -> [ok, pruned, finished]
        self._total_ok = 0
        self._total_pruned = 0
        self._durations = [0.0, 0]  # sum, count
        self._running: dict[tuple[int, int], tuple[str, float]] = {}
        self._best: dict | None = None
        self._finished_all = False
        # live mode only
        self._live: Live | None = None
        self._ticker: threading.Thread | None = None
        self._stop = threading.Event()
        self._restore: list[Callable[[], None]] = []
        self._proxies: list[_AboveLive] = []

    @classmethod
    def from_env(cls) -> "ProgressDisplay | None":
        """The display ``$AUTOFINETUNE_PROGRESS`` asks for (default auto); None for ``off``."""
        mode = os.environ.get(MODE_ENV, "auto").strip().lower() or "auto"
        if mode == "off":
            return None
        if mode not in MODES:
            print(f"{_PREFIX} ignoring {MODE_ENV}={mode!r}: expected one of {', '.join(MODES)}",
                  flush=True)
            mode = "auto"
        return cls(mode=mode)

    # -- watcher hooks ----------------------------------------------------------------
    def search_started(self, info: dict) -> None:
        with self._lock:
            self._t0 = self._clock()
            self._rounds = int(info["rounds"])
            self._popsize = int(info["popsize"])
            self._slots = max(1, len(info.get("slots") or ()))
            self._gpus = sorted({str(s["gpu"]) for s in info.get("slots") or () if s.get("gpu") is not None},
                                key=lambda g: (len(g), g))
            self._round = min(int(info.get("next_round", 0)), max(self._rounds - 1, 0))
            self._round_done = set(range(int(info.get("next_round", 0))))
            for record in info.get("trials") or ():
                if record.get("outcome") in FINAL_OUTCOMES:
                    self._count(record)
                    self._consider_best(record)
            resumed = bool(info.get("resumed"))
            finished = len(self._finished)
            where = (f"on GPU {','.join(self._gpus)} ({self._slots} slots)" if self._gpus
                     else f"on {self._slots} CPU slot{'s' if self._slots != 1 else ''}")
            if any(s.get("worker") for s in info.get("slots") or ()):
                where = f"on {self._slots} Dask worker{'s' if self._slots != 1 else ''}"
        if self.mode == "live":
            self._start_live()
            return
        line = f"{_PREFIX} search: {self._rounds} rounds of {self._popsize} trials {where}"
        if resumed:
            line += f"; resuming at round {self._round + 1}/{self._rounds} with {finished} trials already finished"
        self._say(line)

    def trial_started(self, k: int, i: int, slot: dict, params: dict) -> None:
        where = f"gpu {slot.get('gpu')}" if slot.get("gpu") is not None else f"cpu-slot {slot.get('index')}"
        if slot.get("worker"):  # a Dask worker's trial
            where = (f"gpu {slot['gpu']} of " if slot.get("gpu") is not None else "") + str(slot["worker"])
        with self._lock:
            if k != self._round or self._round_t0 is None:
                self._round, self._round_t0 = k, self._clock()
            self._running[(k, i)] = (where, self._clock())
            line = None if self.mode == "live" else (
                f"{_PREFIX} round {k + 1}/{self._rounds}: {_trial_name(k, i)} started on {where}"
                f" | {self._status()}")
            self._emit(line)  # under the lock: lines come out in the order counted
        self._refresh()

    def trial_finished(self, record: dict) -> None:
        k, i = record["round"], record["candidate"]
        with self._lock:
            self._running.pop((k, i), None)
            outcome = record.get("outcome")
            duration = record.get("duration_s")
            took = f" in {duration:.1f}s" if isinstance(duration, (int, float)) else ""
            new_best = False
            if outcome in FINAL_OUTCOMES:
                self._count(record)
                new_best = self._consider_best(record)
            if outcome == "ok":
                what = f"done{took}, score {record['score']:.6g}" + (" (new best)" if new_best else "")
            elif outcome == "pruned":
                last = (record.get("curve") or [[None, None]])[-1]
                what = f"stopped early{took} at step {last[0]} (value {last[1]})"
            elif outcome == "interrupted":
                what = "interrupted"
            else:
                error = f" ({record['error']})" if record.get("error") else ""
                what = f"failed{took}: {outcome}{error}"
            line = None if self.mode == "live" else (
                f"{_PREFIX} round {k + 1}/{self._rounds}: {_trial_name(k, i)} {what} | {self._status()}")
            self._emit(line)  # under the lock: lines come out in the order counted
        self._refresh()

    def round_finished(self, k: int, records: list[dict], best: dict | None) -> None:
        with self._lock:
            for record in records:
                if record.get("outcome") in FINAL_OUTCOMES:
                    self._count(record)
            if best is not None:
                self._best = best  # the run dir's verdict (trial_rank_key) wins
            self._round_done.add(k)
            took = f" in {format_duration(self._clock() - self._round_t0)}" if self._round_t0 else ""
            done, pruned, failed, _ = self._round_counts(k)
            line = None if self.mode == "live" else (
                f"{_PREFIX} round {k + 1}/{self._rounds} finished{took}: {done} done, "
                f"{f'{pruned} stopped early, ' if pruned else ''}{failed} failed"
                f" | best {self._best_text(params=True)} | {self._times()}")
            if k + 1 < self._rounds:
                self._round, self._round_t0 = k + 1, None
            self._emit(line)  # under the lock: lines come out in the order counted
        self._refresh()

    def search_finished(self, summary: dict) -> None:
        with self._lock:
            self._finished_all = True
            done, pruned, failed = self._totals()
            elapsed = format_duration(self._clock() - self._t0) if self._t0 is not None else "?"
            line = None if self.mode == "live" else (
                f"{_PREFIX} search finished in {elapsed}: {done} done, "
                f"{f'{pruned} stopped early, ' if pruned else ''}{failed} failed"
                f" | best {self._best_text(params=True)}")
            self._emit(line)  # under the lock: lines come out in the order counted
        self._refresh()

    def close(self) -> None:
        self._stop.set()
        if self._ticker is not None:
            self._ticker.join(timeout=5)
            self._ticker = None
        live, self._live = self._live, None
        for proxy in self._proxies:
            try:
                proxy.flush()  # a last line printed without its newline
            except Exception:  # noqa: BLE001
                pass
        self._proxies = []
        if live is not None:
            try:
                live.stop()  # draws the last frame, which stays on screen
            except Exception:  # noqa: BLE001 - a dead terminal must not fail the search
                pass
        while self._restore:
            self._restore.pop()()

    # -- counting (callers hold self._lock) --------------------------------------------
    def _count(self, record: dict) -> None:
        """Count a finished trial once (a trial reported again replaces its first count)."""
        key = (record["round"], record["candidate"])
        duration = record.get("duration_s")
        now = (record.get("outcome") == "ok", record.get("outcome") == "pruned",
               duration if isinstance(duration, (int, float)) else None)
        for entry, sign in ((self._finished.get(key), -1), (now, 1)):
            if entry is None:
                continue
            ok, pruned, seconds = entry
            counts = self._per_round.setdefault(key[0], [0, 0, 0])
            counts[0] += sign * ok
            counts[1] += sign * pruned
            counts[2] += sign
            self._total_ok += sign * ok
            self._total_pruned += sign * pruned
            if seconds is not None:
                self._durations[0] += sign * seconds
                self._durations[1] += sign
        self._finished[key] = now

    def _consider_best(self, record: dict) -> bool:
        if record.get("outcome") != "ok" or record.get("score") is None:
            return False
        if self._best is None or trial_rank_key(record) < trial_rank_key(self._best):
            self._best = record
            return True
        return False

    def _round_counts(self, k: int) -> tuple[int, int, int, int]:
        """(done, stopped early, failed, running) of round k."""
        done, pruned, finished = self._per_round.get(k, (0, 0, 0))
        running = sum(1 for (rk, _) in self._running if rk == k)
        return done, pruned, finished - done - pruned, running

    def _totals(self) -> tuple[int, int, int]:
        """(done, stopped early, failed) of the whole search."""
        return self._total_ok, self._total_pruned, len(self._finished) - self._total_ok - self._total_pruned

    def _best_text(self, *, params: bool) -> str:
        best = self._best
        if best is None:
            return "- (no score yet)"
        text = f"{best['score']:.6g} ({_trial_name(best['round'], best['candidate'])})"
        if params and best.get("params"):
            text += ": " + ", ".join(f"{n}={v}" for n, v in best["params"].items())
        return text

    def _estimate(self) -> tuple[float | None, float | None]:
        """(seconds left, mean trial seconds) — see the module docstring."""
        total, n = self._durations
        if not n or self._rounds == 0:
            return None, None
        mean = total / n
        width = max(1, min(self._slots, self._popsize))
        done, pruned, failed, _ = self._round_counts(self._round)
        left_now = 0 if self._round in self._round_done else max(0, self._popsize - done - pruned - failed)
        later = max(0, self._rounds - self._round - 1)
        waves = math.ceil(left_now / width) + later * math.ceil(self._popsize / width)
        return mean * waves, mean

    def _times(self) -> str:
        elapsed = format_duration(self._clock() - self._t0) if self._t0 is not None else "0s"
        left, mean = self._estimate()
        if left is None:
            return f"elapsed {elapsed}, left ?"
        return f"elapsed {elapsed}, left ~{format_duration(left)} (trial mean {mean:.1f}s)"

    def _status(self) -> str:
        done, round_pruned, failed, _ = self._round_counts(self._round)
        total_done, total_pruned, total_failed = self._totals()
        pruned = (f"{round_pruned} stopped early, ", f"{total_pruned} stopped early, ") \
            if total_pruned else ("", "")  # said once a trial was stopped early
        return (f"running {len(self._running)} | this round: {done} done, {pruned[0]}{failed} failed of "
                f"{self._popsize} | total: {total_done} done, {pruned[1]}{total_failed} failed of "
                f"{self._rounds * self._popsize} | best {self._best_text(params=False)} | {self._times()}")

    # -- plain output --------------------------------------------------------------------
    def _emit(self, line: str | None) -> None:
        if line is not None:
            self._say(line)

    def _say(self, line: str) -> None:
        if self._silent:
            return
        stream = self._stream if self._stream is not None else sys.stdout
        try:
            with self._write_lock:
                stream.write(_printable(line) + "\n")
                stream.flush()
        except (OSError, ValueError, AttributeError):  # closed or missing stdout: go quiet
            self._silent = True

    # -- live panel ----------------------------------------------------------------------
    def render(self) -> Panel:
        """The live panel as a rich renderable (what the terminal shows now)."""
        with self._lock:
            k, rounds = self._round, self._rounds
            state = "finished" if self._finished_all else (
                "done" if k in self._round_done else "running")
            head = Text(f"round {k + 1}/{rounds} {state}  ·  {self._times()}", no_wrap=False)
            table = Table(box=None, padding=(0, 1), show_edge=False, expand=False)
            table.add_column("trials")
            total_done, total_pruned, total_failed = self._totals()
            stopped = total_pruned > 0  # a column once a trial was stopped early
            for name in ("running", "done", *(["stopped"] if stopped else []), "failed", "of"):
                table.add_column(name, justify="right")
            done, pruned, failed, running = self._round_counts(k)
            table.add_row("this round", str(running), str(done), *([str(pruned)] if stopped else []),
                          str(failed), str(self._popsize))
            table.add_row("total", str(len(self._running)), str(total_done),
                          *([str(total_pruned)] if stopped else []), str(total_failed),
                          str(rounds * self._popsize))
            best = Text(_printable(f"best {self._best_text(params=True)}"), overflow="ellipsis")
            now = self._clock()
            running_now = sorted(self._running.items())
            names = [f"{_trial_name(*key)} on {where} {format_duration(now - t0)}"
                     for key, (where, t0) in running_now[:_MAX_RUNNING_SHOWN]]
            if len(running_now) > _MAX_RUNNING_SHOWN:
                names.append(f"+{len(running_now) - _MAX_RUNNING_SHOWN} more")
        lines = [head, table, best]
        if names:
            lines.append(Text("running: " + ", ".join(names), overflow="ellipsis"))
        return Panel(Group(*lines), title="autofinetune", title_align="left", expand=False)

    def _start_live(self) -> None:
        if self._silent:
            return
        console = self._console or Console(file=self._stream if self._stream is not None else sys.stdout)
        try:
            live = Live(console=console, get_renderable=self.render, auto_refresh=False,
                        redirect_stdout=False, redirect_stderr=False, transient=False)
            self._redirect(console)
            live.start(refresh=True)
        except Exception:  # noqa: BLE001 - no live panel, but the search goes on
            while self._restore:
                self._restore.pop()()
            self._silent = True
            return
        self._live = live
        self._ticker = threading.Thread(target=self._tick, name="autofinetune-progress", daemon=True)
        self._ticker.start()

    def _redirect(self, console: Console) -> None:
        """Route stdout, a terminal stderr and Prefect's terminal log handlers above the panel."""
        lock = threading.Lock()
        out, err = sys.stdout, sys.stderr
        if not isinstance(out, _AboveLive):
            sys.stdout = self._proxy(console, out, lock)
            self._restore.append(lambda: setattr(sys, "stdout", out))
        if _isatty(err) and not isinstance(err, _AboveLive):
            sys.stderr = self._proxy(console, err, lock)
            self._restore.append(lambda: setattr(sys, "stderr", err))
        for handler in _stream_handlers():
            stream = getattr(handler, "stream", None)
            if isinstance(stream, _AboveLive) or not _isatty(stream):
                continue
            proxy = self._proxy(console, stream, lock)
            handler_console = getattr(handler, "console", None)  # Prefect's PrefectConsoleHandler
            if isinstance(handler_console, Console):
                old_file = handler_console.file
                handler_console.file = proxy
                self._restore.append(lambda c=handler_console, f=old_file: setattr(c, "file", f))
            handler.stream = proxy
            self._restore.append(lambda h=handler, s=stream: setattr(h, "stream", s))

    def _proxy(self, console: Console, file: TextIO, lock: threading.Lock) -> "_AboveLive":
        proxy = _AboveLive(console, file, lock)
        self._proxies.append(proxy)
        return proxy

    def _refresh(self) -> None:
        live = self._live
        if live is None or self._silent:
            return
        try:
            live.refresh()
        except Exception:  # noqa: BLE001 - e.g. the terminal went away
            self._silent = True

    def _tick(self) -> None:
        while not self._stop.wait(self._refresh_s):
            self._refresh()


def _stream_handlers() -> list[logging.StreamHandler]:
    loggers = [logging.getLogger()] + [logger for logger in logging.Logger.manager.loggerDict.values()
                                       if isinstance(logger, logging.Logger)]
    seen: dict[int, logging.StreamHandler] = {}
    for logger in loggers:
        for handler in logger.handlers:
            if isinstance(handler, logging.StreamHandler) and not isinstance(handler, logging.FileHandler):
                seen[id(handler)] = handler
    return list(seen.values())
