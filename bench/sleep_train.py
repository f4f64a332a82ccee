"""A train.py that only sleeps: the trial of ``bench/orchestration.py``.

It finds its round and candidate from ``--saved_params_dir`` (".../round<k>/model-<i>"),
sleeps the seconds that ``--durations FILE`` (JSON {"r<k>c<i>": seconds}) gives that
trial, reports a score and, with ``--events FILE``, appends "start|end <unix time> <k> <i>"
lines (one small O_APPEND write each, so parallel trials never interleave a line).
Hyperparameter flags are accepted and ignored except for the score.
"""

import time

T_START = time.time()  # as early as possible: the interpreter's start-up is still counted

import argparse  # noqa: E402
import json  # noqa: E402
import os  # noqa: E402
import re  # noqa: E402

parser = argparse.ArgumentParser()
parser.add_argument("--saved_params_dir", required=True)
parser.add_argument("--durations", required=True)
parser.add_argument("--events", default=None)
parser.add_argument("--x", type=float, default=0.0)
args, _unknown = parser.parse_known_args()

match = re.search(r"round(\d+)[/\\]model-(\d+)", args.saved_params_dir)
k, i = int(match.group(1)), int(match.group(2))
with open(args.durations) as f:
    seconds = json.load(f)[f"r{k}c{i}"]


def event(kind: str, when: float) -> None:
    if args.events:
        fd = os.open(args.events, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
        try:
            os.write(fd, f"{kind} {when:.6f} {k} {i}\n".encode())
        finally:
            os.close(fd)


event("start", T_START)
time.sleep(max(0.0, seconds - (time.time() - T_START)))  # busy for `seconds` in all

from autofinetune import report_final_result  # noqa: E402

report_final_result(-((args.x - 0.3) ** 2))
event("end", time.time())
