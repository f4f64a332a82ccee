"""A tiny deterministic train.py for the tests.

Score: -(x - 0.3)^2 - (n - 4)^2 / 100 + 0.01 * steps trained (a child continues its
parent's steps) for hyperparameters x (float) and n (int). It finds
its own round and candidate from --saved_params_dir (".../round<k>/model-<i>") so a test
can make one trial misbehave with --plan '{"r0c1": "crash", ...}'. Behaviours: crash,
noreport, nan, hang, garbage, sigkill, sigkill_once (only the first attempt). With --events FILE it appends one line
"start|end <time> <pid> <round> <candidate> <CUDA_VISIBLE_DEVICES>" per event, which the
tests use to measure concurrency and slot use.
"""

import argparse
import json
import os
import re
import signal
import sys
import time

parser = argparse.ArgumentParser()
parser.add_argument("--x", type=float, default=0.0)
parser.add_argument("--n", type=int, default=1)
parser.add_argument("--saved_params_dir", required=True)
parser.add_argument("--model_path", default=None)
parser.add_argument("--plan", default="{}")
parser.add_argument("--events", default=None)
parser.add_argument("--sleep", type=float, default=0.0)
parser.add_argument("--epochs", type=int, default=None)
parser.add_argument("--echo", default=None, help="printed, to check forwarded extras")
args, unknown = parser.parse_known_args()

match = re.search(r"round(\d+)[/\\]model-(\d+)", args.saved_params_dir)
k, i = (int(match.group(1)), int(match.group(2))) if match else (-1, -1)
behaviour = json.loads(args.plan).get(f"r{k}c{i}")
cuda = os.environ.get("CUDA_VISIBLE_DEVICES", "<unset>")


def event(kind):
    if args.events:
        with open(args.events, "a") as f:
            f.write(f"{kind} {time.time():.6f} {os.getpid()} {k} {i} {cuda or '-'}\n")


event("start")
print(f"toy: round {k} candidate {i} x={args.x} n={args.n} cuda={cuda!r} "
      f"order={os.environ.get('CUDA_DEVICE_ORDER')} echo={args.echo} "
      f"epochs={args.epochs} model_path={args.model_path} unknown={unknown}", flush=True)
if args.sleep:
    time.sleep(args.sleep)
if behaviour == "hang":
    child = os.fork()  # a grandchild in the same process group: a timeout must kill it too
    if child == 0:
        time.sleep(3600)
        os._exit(0)
    with open(os.path.join(args.saved_params_dir, "pids"), "w") as f:
        f.write(f"{os.getpid()} {child}\n")
    time.sleep(3600)
lineage = [f"r{k}c{i}"]
steps = args.epochs or 1
if args.model_path:  # Population-Based: continue from the parent's checkpoint (read only)
    with open(os.path.join(args.model_path, "weights.json")) as f:
        parent = json.load(f)
    lineage = parent["lineage"] + lineage
    steps += parent["steps"]
os.makedirs(args.saved_params_dir, exist_ok=True)
with open(os.path.join(args.saved_params_dir, "weights.json"), "w") as f:
    json.dump({"x": args.x, "n": args.n, "round": k, "candidate": i, "lineage": lineage,
               "steps": steps}, f)
event("end")
if behaviour == "crash":
    print("toy: crashing on purpose", file=sys.stderr)
    sys.exit(3)
if behaviour == "sigkill":
    os.kill(os.getpid(), signal.SIGKILL)
if behaviour == "sigkill_once" and not os.path.exists(os.path.join(args.saved_params_dir, "killed")):
    open(os.path.join(args.saved_params_dir, "killed"), "w").close()
    os.kill(os.getpid(), signal.SIGKILL)
if behaviour == "noreport":
    sys.exit(0)

from autofinetune import report_final_result  # noqa: E402

if behaviour == "nan":
    report_final_result(float("nan"))
elif behaviour == "garbage":
    with open(os.environ["AUTOFINETUNE_RESULT_FILE"], "w") as f:
        f.write("not a number")
else:
    # Training longer helps a little, so Population-Based lineages matter to the score.
    report_final_result(-(args.x - 0.3) ** 2 - (args.n - 4) ** 2 / 100 + 0.01 * min(steps, 10))
