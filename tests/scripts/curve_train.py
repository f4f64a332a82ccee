"""A train.py with known curves for the early-stopping tests (instant; no training).

For hyperparameter x (float) the score is f(x) = -(x - 0.3)^2 and the curve, reported with
report_intermediate at steps 1..--steps, is v(s) = f(x) + 0.01 * s; the final result is
v(steps). So a worse x is worse at every step, by the same margin.

After each report it waits up to --wait seconds for should_stop() and, once it is true,
prints "should_stop at step <s>" and exits 0 (a cooperative script). With --ignore=1 it never
asks: after its reports it sleeps until a signal comes, and on SIGTERM it writes
"<saved_params_dir>/sigterm" and exits.
"""

import argparse
import os
import signal
import sys
import time

from autofinetune import report_final_result, report_intermediate, should_stop

parser = argparse.ArgumentParser()
parser.add_argument("--x", type=float, default=0.0)
parser.add_argument("--n", type=int, default=1)
parser.add_argument("--saved_params_dir", required=True)
parser.add_argument("--model_path", default=None)
parser.add_argument("--steps", type=int, default=6)
parser.add_argument("--wait", type=float, default=0.0)
parser.add_argument("--ignore", type=int, default=0)
args = parser.parse_args()
os.makedirs(args.saved_params_dir, exist_ok=True)


def on_sigterm(signum, frame):
    open(os.path.join(args.saved_params_dir, "sigterm"), "w").close()
    sys.exit(143)


signal.signal(signal.SIGTERM, on_sigterm)
f = -(args.x - 0.3) ** 2
for step in range(1, args.steps + 1):
    report_intermediate(f + 0.01 * step, step)
    if args.ignore:
        continue
    deadline = time.monotonic() + args.wait
    while not should_stop() and time.monotonic() < deadline:
        time.sleep(0.01)
    if should_stop():
        print(f"should_stop at step {step}", flush=True)
        sys.exit(0)
if args.ignore:
    while True:
        time.sleep(1)
with open(os.path.join(args.saved_params_dir, "weights.txt"), "w") as out:
    out.write(f"{args.x}\n")
report_final_result(f + 0.01 * args.steps)
