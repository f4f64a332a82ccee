"""Check GPU slots, CUDA_VISIBLE_DEVICES and GPU telemetry on a machine with an NVIDIA GPU, with a
real PyTorch train.py. Not a test: run it by hand, from the repo root, with a Python that has torch.

    python3 bench/gpu_check.py                  # the plain layer, no Prefect needed
    python3 bench/gpu_check.py --mode cli       # the whole CLI (needs Prefect: the project's .venv)
    python3 bench/gpu_check.py --gpu 1 --seconds 15 --keep /tmp/gpu-check

The default mode needs only what the lent GPU machine has (Python 3.12, torch, numpy, PyYAML,
nvidia-ml-py): it imports ``runtime`` and ``tuners`` from this checkout (no Prefect, no cmaes,
no Optuna: the search uses the PSHE2 tuner) and never installs anything. Steps:

1. NVML: the driver version and every GPU (index, name, UUID, memory, compute processes).
2. torch in the trial interpreter (``--python``): its version, the CUDA it was built for and
   the devices it sees. Without CUDA it stops (exit 2) and prints the driver version: a torch
   built for a newer CUDA than the driver supports sees no device.
3. pass ``index``: ``runtime.settings.resolve_settings`` picks the GPUs as a search does (the
   parent's ``CUDA_VISIBLE_DEVICES`` if set, else NVML's; ``--gpu`` narrows them), two slots
   per GPU; then a real search of ``--rounds`` rounds of ``--popsize`` trials runs through the
   plain layer's steps (propose, run_candidate on a ``SlotPool``, tell, record_best), each
   trial a real subprocess training a small MLP on CUDA for ``--seconds``, sampled by NVML
   every ``--sample-s`` seconds.
4. pass ``uuid``: the same with the parent's ``CUDA_VISIBLE_DEVICES`` set to those GPUs'
   NVML UUIDs, as a scheduler may set it: one round of two trials.
5. per trial: what it saw (``CUDA_VISIBLE_DEVICES``, torch's device name and UUID, peak memory)
   and what NVML sampled; checks: every trial scored; each saw exactly its slot's id, one
   CUDA device, the GPU whose UUID NVML gives for its slot (else CUDA and NVML number GPUs
   differently); each has memory samples, and utilization above 0 at least once where the
   GPU reports it (a MIG device does not).

``--mode cli`` runs ``python -m flows.autofinetune`` instead of pass ``index`` and checks the
same. Exit status: 0 every check passed; 1 a check failed; 2 this machine cannot run the check
(no torch, torch sees no CUDA, no GPU, or for ``--mode cli`` no Prefect).
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import logging
import os
import shutil
import subprocess
import sys
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from runtime.gpus import detect_gpus  # noqa: E402 - the plain layer of this checkout
from runtime.rundir import RunDir  # noqa: E402
from runtime.search import new_state, propose, record_best, run_candidate, tell_round  # noqa: E402
from runtime.settings import resolve_settings  # noqa: E402
from runtime.slots import SlotPool  # noqa: E402

MIB = 1024 * 1024

TRAIN_PY = '''\
"""gpu_check's trial: a small MLP trained on CUDA for --seconds; reports minus its loss."""
import argparse
import json
import os
import time

import torch

from autofinetune import report_final_result

parser = argparse.ArgumentParser()
parser.add_argument("--lr", type=float, default=0.001)
parser.add_argument("--width", type=int, default=2048)
parser.add_argument("--seconds", type=float, default=8.0)
parser.add_argument("--saved_params_dir", required=True)
args, _unknown = parser.parse_known_args()

seen = {"CUDA_VISIBLE_DEVICES": os.environ.get("CUDA_VISIBLE_DEVICES"), "pid": os.getpid(),
        "cuda": torch.cuda.is_available(), "torch": torch.__version__}
device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
if device.type == "cuda":
    props = torch.cuda.get_device_properties(0)
    seen.update(device_count=torch.cuda.device_count(), name=props.name,
                uuid=str(getattr(props, "uuid", "") or ""), memory_mib=props.total_memory // 2**20)
print("gpu_check trial sees:", json.dumps(seen), flush=True)
torch.manual_seed(0)
x = torch.randn(8192, 256, device=device)
y = torch.sin(x[:, :1] * 3) + x[:, 1:2] ** 2
model = torch.nn.Sequential(torch.nn.Linear(256, args.width), torch.nn.ReLU(),
                            torch.nn.Linear(args.width, args.width), torch.nn.ReLU(),
                            torch.nn.Linear(args.width, 1)).to(device)
optimizer = torch.optim.Adam(model.parameters(), lr=args.lr)
t0, steps = time.monotonic(), 0
while time.monotonic() - t0 < args.seconds:
    for _ in range(20):
        loss = torch.nn.functional.mse_loss(model(x), y)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    if device.type == "cuda":
        torch.cuda.synchronize()
    steps += 20
seen.update(steps=steps, loss=float(loss))
if device.type == "cuda":
    seen["max_memory_allocated_mib"] = torch.cuda.max_memory_allocated() // 2**20
os.makedirs(args.saved_params_dir, exist_ok=True)
torch.save(model.state_dict(), os.path.join(args.saved_params_dir, "model.pt"))
with open(os.path.join(args.saved_params_dir, "seen.json"), "w") as f:
    json.dump(seen, f, indent=1)
report_final_result(-float(loss))
'''

HPARAM_YAML = """\
param_list:
  - name: lr
    init_value: 0.001
    type: float
    greater_than: 0.00001
    lower_than: 0.01
    log: true
"""

TORCH_PROBE = """\
import json, torch
found = {"torch": torch.__version__, "built_for_cuda": torch.version.cuda, "cuda": torch.cuda.is_available()}
if found["cuda"]:
    found["devices"] = [torch.cuda.get_device_name(i) for i in range(torch.cuda.device_count())]
print(json.dumps(found))
"""


def fail(message: str, code: int = 2) -> int:
    print(f"gpu_check: {message}", file=sys.stderr, flush=True)
    return code


def driver_version(view) -> str:
    """The NVIDIA driver's version, from NVML or /proc; says why when neither has it."""
    if view.driver:
        return view.driver
    try:
        return Path("/proc/driver/nvidia/version").read_text().splitlines()[0].strip()
    except (OSError, IndexError):
        return f"unknown ({'NVML: ' + view.problem.text if view.problem else 'no /proc/driver/nvidia/version'})"


def probe_torch(python: str, timeout: float) -> tuple[dict | None, str | None]:
    """What torch in ``python`` says, or (None, why). The first import of a CUDA torch can
    take minutes on a cold disk; ``timeout`` allows for it."""
    t0 = time.monotonic()
    try:
        probe = subprocess.run([python, "-c", TORCH_PROBE], capture_output=True, text=True, timeout=timeout)
    except subprocess.TimeoutExpired:
        return None, f"importing torch in {python} took longer than --torch-timeout {timeout:g}s"
    if probe.returncode != 0:
        last = (probe.stderr.strip().splitlines() or ["?"])[-1]
        if "No module named 'torch'" in probe.stderr:
            return None, (f"torch is not installed for {python} ({last}); run this with a Python that "
                          "has torch (the lent GPU machine's python3 has it), or pass --python")
        return None, f"importing torch in {python} failed: {last}"
    found = json.loads(probe.stdout.strip().splitlines()[-1])
    found["import_s"] = round(time.monotonic() - t0, 1)
    return found, None


def print_nvml(view) -> None:
    print(f"NVIDIA driver: {driver_version(view)}")
    if view.gpus is None:
        print(f"NVML: {'not available' if view.problem.absent else 'FAILED'} ({view.problem.text})")
        return
    print(f"NVML sees {len(view.gpus)} GPU(s):")
    import pynvml

    pynvml.nvmlInit()
    try:
        for g in view.gpus:
            handle = pynvml.nvmlDeviceGetHandleByIndex(g.index)
            try:
                busy = [f"pid {p.pid} ({(p.usedGpuMemory or 0) // MIB} MiB)"
                        for p in pynvml.nvmlDeviceGetComputeRunningProcesses(handle)]
            except pynvml.NVMLError as exc:
                busy = [f"unknown ({exc})"]
            print(f"  GPU {g.index}: {g.name}, {g.uuid}, {g.memory_total_mib} MiB; compute processes: "
                  f"{', '.join(busy) or 'none'}")
    finally:
        pynvml.nvmlShutdown()


def _uuid(text: str | None) -> str:
    return (text or "").lower().removeprefix("gpu-")


def trial_problems(record: dict, seen: dict) -> list[str]:
    """What is wrong with one trial's record and what its process saw (empty: all fine)."""
    name = f"round {record['round']} trial {record['candidate']}"
    problems = []
    if record["outcome"] != "ok":
        problems.append(f"{name}: {record['outcome']} ({record.get('error')}); log {record['log']}")
    if seen.get("CUDA_VISIBLE_DEVICES") != record["gpu"]:
        problems.append(f"{name}: saw CUDA_VISIBLE_DEVICES={seen.get('CUDA_VISIBLE_DEVICES')!r}, its slot "
                        f"is {record['gpu']!r}")
    if not seen.get("cuda"):
        problems.append(f"{name}: torch saw no CUDA device")
    elif seen.get("device_count") != 1:
        problems.append(f"{name}: torch saw {seen.get('device_count')} devices, expected its one GPU")
    elif (record.get("gpu_uuid") or "").startswith("GPU-") and seen.get("uuid") \
            and _uuid(seen["uuid"]) != _uuid(record["gpu_uuid"]):
        problems.append(f"{name}: CUDA device {seen['uuid']} is not NVML's {record['gpu_uuid']} for slot "
                        f"{record['gpu']!r}: CUDA numbers the GPUs differently (CUDA_DEVICE_ORDER?)")
    samples = record.get("gpu_samples")
    if not samples:
        problems.append(f"{name}: no gpu_samples ({record.get('gpu_sampling_error') or 'NVML took none'})")
    else:
        if not any(s.get("memory_used_mib") for s in samples):
            problems.append(f"{name}: no memory sample above 0 MiB")
        utilization = [s["utilization"] for s in samples if "utilization" in s]
        if utilization and max(utilization) == 0:
            problems.append(f"{name}: every utilization sample is 0%")
    return problems


def report(out: Path) -> list[str]:
    """Print every trial of the run dir ``out``: what it saw and what NVML sampled; the problems."""
    problems = []
    for path in sorted(out.glob("round*/trial-*.json")):
        record = json.loads(path.read_text())
        seen_path = Path(record.get("saved_params_dir") or "") / "seen.json"
        seen = json.loads(seen_path.read_text()) if seen_path.is_file() else {}
        samples = record.get("gpu_samples") or []
        print(f"  {path.parent.name} trial {record['candidate']}: {record['outcome']}, score {record['score']}, "
              f"slot {record['slot']}, gpu {record['gpu']!r} (NVML {record.get('gpu_uuid')}), "
              f"{record['duration_s']}s")
        print(f"    saw: CUDA_VISIBLE_DEVICES={seen.get('CUDA_VISIBLE_DEVICES')!r}, cuda={seen.get('cuda')}, "
              f"{seen.get('device_count')} device(s), {seen.get('name')!r} uuid {seen.get('uuid')!r}, "
              f"peak {seen.get('max_memory_allocated_mib')} MiB, {seen.get('steps')} steps")
        print(f"    NVML sampled ({len(samples)}): " + ", ".join(
            f"t={s['t']}s {s.get('utilization', '-')}% {s.get('memory_used_mib', '-')}MiB" for s in samples[:12])
            + (" ..." if len(samples) > 12 else ""))
        if record.get("gpu_sampling_error"):
            print(f"    sampling error: {record['gpu_sampling_error']}")
        problems += trial_problems(record, seen)
    if not problems and not any(out.glob("round*/trial-*.json")):
        problems.append(f"no trial records under {out}")
    return problems


def plain_search(args: argparse.Namespace, work: Path, out: str, *, popsize: int, rounds: int) -> Path:
    """A real search through the plain layer's steps (what the Prefect tasks call), no Prefect."""
    settings = resolve_settings(script="train.py", param_file="hparam.yaml", cwd=str(work), output_dir=out,
                                gpu=args.gpu, trials_per_gpu=2, popsize=popsize, rounds=rounds,
                                evaluator="fulltrail", tuning_strategy="pshe2", seed=0, python=args.python,
                                extras=["seconds", str(args.seconds)])
    if settings.gpu_warning:
        print(settings.gpu_warning)
    if not settings.slots or settings.slots[0].gpu is None:
        raise SystemExit(fail(f"no GPU to run on (CUDA_VISIBLE_DEVICES={os.environ.get('CUDA_VISIBLE_DEVICES')!r}, "
                              "NVML above); pass --gpu or check the driver"))
    pool = SlotPool(settings.slots)
    for slot in settings.slots:
        print(f"  slot {slot.index}: CUDA_VISIBLE_DEVICES={slot.gpu!r}, NVML {slot.uuid}, lock {slot.lock_name}")
    run_dir = RunDir(settings.output_dir)
    run_dir.path.mkdir(parents=True)
    run_dir.write_state(new_state(settings.search, settings.rounds, settings.run))
    logger = logging.getLogger("gpu_check")
    # Trials launch only while a search holds the run dir (runtime.rundir.TrialStop).
    with run_dir.lock(), ThreadPoolExecutor(max_workers=len(settings.slots)) as threads:
        for k in range(rounds):
            candidates = propose(run_dir, k)
            records = list(threads.map(lambda i: run_candidate(run_dir, k, i, candidates[i], None, pool, logger),
                                       range(popsize)))
            tell_round(run_dir, k, records)
    best = record_best(run_dir, ["lr"], final=True)
    print(f"  best: {best and best['params']} score {best and best['score']}")
    return run_dir.path


def cli_search(args: argparse.Namespace, work: Path) -> Path:
    command = [sys.executable, "-m", "flows.autofinetune", "train.py", "--param-file", "hparam.yaml",
               *(["--gpu", args.gpu] if args.gpu else []), "--trials-per-gpu", "2",
               "--popsize", str(args.popsize), "--round", str(args.rounds), "--evaluator", "fulltrail",
               "--tuning-strategy", "pshe2", "--seed", "0", "--output-dir", "cli-out",
               "--python", args.python, "seconds", str(args.seconds)]
    print(f"  running in {work}:\n    {' '.join(command)}", flush=True)
    try:
        code = subprocess.run(command, cwd=work, timeout=args.timeout).returncode
    except subprocess.TimeoutExpired:
        raise SystemExit(fail(f"the search took longer than --timeout {args.timeout:g}s", 1)) from None
    print(f"  search exit status {code}")
    return work / "cli-out"


def check(args: argparse.Namespace, work: Path) -> int:
    view = detect_gpus()
    print_nvml(view)
    torch, why = probe_torch(args.python, args.torch_timeout)
    if torch is None:
        return fail(f"{why}; NVIDIA driver {driver_version(view)}")
    print(f"torch {torch['torch']} built for CUDA {torch['built_for_cuda']} ({args.python}, imported in "
          f"{torch['import_s']}s): {'sees ' + ', '.join(torch['devices']) if torch['cuda'] else 'NO CUDA device'}")
    if not torch["cuda"]:
        return fail(f"torch {torch['torch']} (built for CUDA {torch['built_for_cuda']}) sees no CUDA device; NVIDIA "
                    f"driver {driver_version(view)}. A driver older than the one that CUDA needs, no GPU, or "
                    f"CUDA_VISIBLE_DEVICES={os.environ.get('CUDA_VISIBLE_DEVICES')!r} hiding it")
    if args.mode == "cli" and importlib.util.find_spec("prefect") is None:
        return fail("--mode cli needs Prefect, which this Python cannot import; run the default "
                    "--mode plain, or use the project's .venv (bash scripts/test.sh sets it up)")
    (work / "train.py").write_text(TRAIN_PY)
    (work / "hparam.yaml").write_text(HPARAM_YAML)
    os.environ.update(AUTOFINETUNE_GPU_SAMPLE_S=str(args.sample_s), AUTOFINETUNE_LOCK_DIR=str(work / "gpu-locks"),
                      PYTHONPATH=os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH")])))
    problems = []
    t0 = time.monotonic()
    if args.mode == "cli":
        print("\npass cli: the whole CLI, GPUs chosen as a search chooses them", flush=True)
        out = cli_search(args, work)
    else:
        print("\npass index: GPUs chosen as a search chooses them", flush=True)
        out = plain_search(args, work, "out-index", popsize=args.popsize, rounds=args.rounds)
    problems += report(out)
    uuids = sorted({r["gpu_uuid"] for r in map(json.loads, (p.read_text() for p in out.glob("round*/trial-*.json")))
                    if r.get("gpu_uuid")})
    if uuids:
        print(f"\npass uuid: the parent's CUDA_VISIBLE_DEVICES={','.join(uuids)}", flush=True)
        os.environ["CUDA_VISIBLE_DEVICES"] = ",".join(uuids)
        args.gpu = None
        problems += report(plain_search(args, work, "out-uuid", popsize=2, rounds=1))
    else:
        problems.append("no slot was resolved to an NVML UUID; pass uuid skipped")
    print(f"\n{time.monotonic() - t0:.0f}s of searches")
    if problems:
        print("FAILED:\n  " + "\n  ".join(problems))
        return 1
    print("OK: every trial ran on its slot's GPU, as CUDA_VISIBLE_DEVICES named it, and NVML sampled it.")
    return 0


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description="Run short real searches on this machine's GPU(s) with a PyTorch "
                                            "train.py and print what each trial saw and what NVML sampled.")
    p.add_argument("--mode", choices=("plain", "cli"), default="plain",
                   help="plain: the plain layer without Prefect (default); cli: the whole CLI (needs Prefect)")
    p.add_argument("--gpu", default=None, help="GPU ids, as --gpu of the CLI (default: as a search picks them)")
    p.add_argument("--seconds", type=float, default=8.0, help="seconds each trial trains (default 8)")
    p.add_argument("--popsize", type=int, default=2, help="trials per round of the first pass (default 2)")
    p.add_argument("--rounds", type=int, default=2, help="rounds of the first pass (default 2)")
    p.add_argument("--sample-s", type=float, default=0.5,
                   help="GPU telemetry sampling interval, $AUTOFINETUNE_GPU_SAMPLE_S (default 0.5)")
    p.add_argument("--python", default=sys.executable,
                   help="interpreter that runs the trials; it needs torch (default: this one)")
    p.add_argument("--torch-timeout", type=float, default=900,
                   help="seconds the first torch import may take (default 900)")
    p.add_argument("--timeout", type=float, default=900, help="seconds the --mode cli search may take (default 900)")
    p.add_argument("--keep", default=None, metavar="DIR",
                   help="work in DIR and keep it (default: a temp dir, removed afterwards)")
    return p


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    logging.basicConfig(level=logging.WARNING, format="  %(message)s")
    if args.keep:
        work = Path(args.keep).resolve()
        if work.exists() and any(work.iterdir()):
            return fail(f"--keep {work}: not empty; choose an empty or new directory")
        work.mkdir(parents=True, exist_ok=True)
        return check(args, work)
    work = Path(tempfile.mkdtemp(prefix="gpu-check-"))
    try:
        return check(args, work)
    finally:
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    sys.exit(main())
