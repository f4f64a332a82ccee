"""Check GPU slots and GPU telemetry on a machine with an NVIDIA GPU. Not a test: run it by hand.

    .venv/bin/python bench/gpu_check.py                     # GPU 0, two trials on it, ~8 s each
    .venv/bin/python bench/gpu_check.py --gpu 1 --seconds 15 --sample-s 1 --keep /tmp/gpu-check

It needs PyTorch in the interpreter that runs the trials (``--python``, default this one);
torch is not a project dependency: ``pip install torch``. Steps:

1. list the GPUs NVML sees: index, name, UUID, memory, compute processes already running;
2. write a tiny ``train.py`` (a few seconds of matmuls on CUDA, then
   ``report_final_result``) and its ``hparam.yaml`` into a work dir;
3. run a short real search there::

       python -m flows.autofinetune train.py --param-file hparam.yaml --gpu G \\
           --trials-per-gpu 2 --popsize 2 --round 1 --evaluator fulltrail --output-dir out \\
           seconds S

   with ``$AUTOFINETUNE_GPU_SAMPLE_S`` set to ``--sample-s``;
4. print what each trial saw (``CUDA_VISIBLE_DEVICES``, torch's device name and UUID, its
   peak memory) and the ``gpu_samples`` NVML took into its ``trial-<i>.json``, and check:
   both trials scored; each ran on CUDA, on the GPU whose UUID NVML gives for index G (a
   mismatch means CUDA and NVML number the GPUs differently: ``CUDA_DEVICE_ORDER=PCI_BUS_ID``
   fixes that); each has samples; utilization was above 0 at least once.

Exit status: 0 every check passed; 1 a check failed; 2 this machine cannot run the check
(no torch, no NVML, no such GPU).
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
MIB = 1024 * 1024

TRAIN_PY = '''\
"""gpu_check's trial: matmuls on CUDA for --seconds, then report a score."""
import argparse
import json
import math
import os
import time

import torch

from autofinetune import report_final_result

parser = argparse.ArgumentParser()
parser.add_argument("--lr", type=float, default=0.01)
parser.add_argument("--seconds", type=float, default=8.0)
parser.add_argument("--size", type=int, default=4096)
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
x = torch.randn(args.size, args.size, device=device)
w = torch.randn(args.size, args.size, device=device) / math.sqrt(args.size)
t0, steps = time.monotonic(), 0
while time.monotonic() - t0 < args.seconds:
    for _ in range(10):
        x = torch.tanh(x @ w)
    if device.type == "cuda":
        torch.cuda.synchronize()
    steps += 1
seen["steps"] = steps
if device.type == "cuda":
    seen["max_memory_allocated_mib"] = torch.cuda.max_memory_allocated() // 2**20
os.makedirs(args.saved_params_dir, exist_ok=True)
with open(os.path.join(args.saved_params_dir, "seen.json"), "w") as f:
    json.dump(seen, f, indent=1)
report_final_result(-abs(math.log10(args.lr) + 2))  # best at lr = 0.01
'''

HPARAM_YAML = """\
param_list:
  - name: lr
    init_value: 0.01
    type: float
    greater_than: 0.0001
    lower_than: 0.1
    log: true
"""


def fail(message: str, code: int = 2) -> int:
    print(f"gpu_check: {message}", file=sys.stderr, flush=True)
    return code


def torch_version(python: str) -> str | None:
    """``"2.5.1 cuda=True"`` from the trial interpreter, or None when it has no torch."""
    probe = subprocess.run([python, "-c", "import torch; print(torch.__version__, "
                            "'cuda=%s' % torch.cuda.is_available())"],
                           capture_output=True, text=True, timeout=120)
    return probe.stdout.strip() if probe.returncode == 0 else None


def nvml_gpus() -> tuple[list[dict] | None, str | None]:
    """What NVML sees, or (None, why) without NVML."""
    try:
        import pynvml
    except ImportError as exc:
        return None, f"nvidia-ml-py is not installed ({exc})"
    try:
        pynvml.nvmlInit()
    except pynvml.NVMLError as exc:
        return None, f"NVML not available ({exc})"
    try:
        gpus = []
        for index in range(pynvml.nvmlDeviceGetCount()):
            handle = pynvml.nvmlDeviceGetHandleByIndex(index)
            memory = pynvml.nvmlDeviceGetMemoryInfo(handle)
            try:
                processes = [(p.pid, p.usedGpuMemory) for p in pynvml.nvmlDeviceGetComputeRunningProcesses(handle)]
            except pynvml.NVMLError:
                processes = []
            gpus.append({"index": index, "name": _text(pynvml.nvmlDeviceGetName(handle)),
                         "uuid": _text(pynvml.nvmlDeviceGetUUID(handle)),
                         "memory_total_mib": int(memory.total) // MIB,
                         "memory_used_mib": int(memory.used) // MIB, "processes": processes})
        return gpus, None
    finally:
        pynvml.nvmlShutdown()


def _text(value) -> str:
    return value.decode() if isinstance(value, bytes) else str(value)


def _uuid(text: str | None) -> str:
    return (text or "").lower().removeprefix("gpu-")


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description="Run a short real search on one GPU and print what "
                                            "NVML saw (needs torch: pip install torch).")
    p.add_argument("--gpu", default="0", help="the GPU index to use (default 0)")
    p.add_argument("--seconds", type=float, default=8.0, help="seconds each trial computes (default 8)")
    p.add_argument("--sample-s", type=float, default=1.0,
                   help="GPU telemetry sampling interval, $AUTOFINETUNE_GPU_SAMPLE_S (default 1)")
    p.add_argument("--python", default=sys.executable,
                   help="interpreter that runs the trials; it needs torch (default: this one)")
    p.add_argument("--keep", default=None, metavar="DIR",
                   help="work in DIR and keep it (default: a temp dir, removed afterwards)")
    p.add_argument("--timeout", type=float, default=600, help="seconds the search may take (default 600)")
    return p


def check(args: argparse.Namespace, work: Path) -> int:
    version = torch_version(args.python)
    if version is None:
        return fail(f"torch is not installed for {args.python}: pip install torch "
                    "(it is not a project dependency; this check needs it to load the GPU)")
    print(f"torch {version} ({args.python})")
    gpus, why = nvml_gpus()
    if gpus is None:
        return fail(f"{why}: this check needs a machine with an NVIDIA driver and GPU")
    print("NVML sees:")
    for g in gpus:
        busy = ", ".join(f"pid {pid} ({(used or 0) // MIB} MiB)" for pid, used in g["processes"]) or "none"
        print(f"  GPU {g['index']}: {g['name']}, {g['uuid']}, {g['memory_used_mib']}/"
              f"{g['memory_total_mib']} MiB used; compute processes: {busy}")
    if not args.gpu.isdigit() or int(args.gpu) >= len(gpus):
        return fail(f"--gpu {args.gpu}: NVML reports {len(gpus)} GPU(s)")
    target = gpus[int(args.gpu)]

    (work / "train.py").write_text(TRAIN_PY)
    (work / "hparam.yaml").write_text(HPARAM_YAML)
    env = dict(os.environ, AUTOFINETUNE_GPU_SAMPLE_S=str(args.sample_s),
               AUTOFINETUNE_LOCK_DIR=str(work / "gpu-locks"),
               PYTHONPATH=os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH")])))
    command = [sys.executable, "-m", "flows.autofinetune", "train.py", "--param-file", "hparam.yaml",
               "--gpu", args.gpu, "--trials-per-gpu", "2", "--popsize", "2", "--round", "1",
               "--evaluator", "fulltrail", "--output-dir", "out", "--python", args.python,
               "seconds", str(args.seconds)]
    print(f"\nrunning in {work}:\n  {' '.join(command)}\n", flush=True)
    try:
        code = subprocess.run(command, cwd=work, env=env, timeout=args.timeout).returncode
    except subprocess.TimeoutExpired:
        return fail(f"the search took longer than --timeout {args.timeout:g}s", 1)
    print(f"\nsearch exit status {code}")

    problems = [] if code == 0 else [f"the search exited with status {code}"]
    print("\nper trial:")
    for i in range(2):
        path = work / "out" / "round0" / f"trial-{i}.json"
        if not path.is_file():
            problems.append(f"trial {i}: no {path}")
            continue
        record = json.loads(path.read_text())
        seen_path = Path(record.get("saved_params_dir") or "") / "seen.json"
        seen = json.loads(seen_path.read_text()) if seen_path.is_file() else {}
        samples = record.get("gpu_samples")
        print(f"  trial {i}: {record['outcome']}, score {record['score']}, slot {record['slot']}, "
              f"gpu {record['gpu']}, {record['duration_s']}s")
        print(f"    the trial saw: CUDA_VISIBLE_DEVICES={seen.get('CUDA_VISIBLE_DEVICES')!r}, "
              f"cuda={seen.get('cuda')}, device {seen.get('name')!r} uuid {seen.get('uuid')!r}, "
              f"peak {seen.get('max_memory_allocated_mib')} MiB, {seen.get('steps')} steps")
        print(f"    gpu_samples ({len(samples or [])}): "
              + ", ".join(f"t={s['t']}s {s['utilization']}% {s['memory_used_mib']}MiB"
                          for s in samples or []))
        if record["outcome"] != "ok":
            problems.append(f"trial {i}: {record['outcome']} ({record.get('error')}); log {record['log']}")
        if seen.get("CUDA_VISIBLE_DEVICES") != args.gpu:
            problems.append(f"trial {i}: saw CUDA_VISIBLE_DEVICES={seen.get('CUDA_VISIBLE_DEVICES')!r}, "
                            f"expected {args.gpu!r}")
        if not seen.get("cuda"):
            problems.append(f"trial {i}: torch saw no CUDA device")
        elif seen.get("uuid") and _uuid(seen["uuid"]) != _uuid(target["uuid"]):
            problems.append(f"trial {i}: CUDA device {seen['uuid']} is not NVML GPU {args.gpu} "
                            f"({target['uuid']}): CUDA numbers GPUs differently; set "
                            "CUDA_DEVICE_ORDER=PCI_BUS_ID for the trials")
        if not samples:
            problems.append(f"trial {i}: no gpu_samples in {path}")
        elif max(s["utilization"] for s in samples) == 0:
            problems.append(f"trial {i}: every sample shows 0% utilization")
    if problems:
        print("\nFAILED:\n  " + "\n  ".join(problems))
        return 1
    print("\nOK: both trials ran on the requested GPU and their records hold NVML samples.")
    return 0


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    if args.keep:
        work = Path(args.keep).resolve()
        if (work / "out").exists():
            return fail(f"--keep {work}: already holds out/; choose an empty directory")
        work.mkdir(parents=True, exist_ok=True)
        return check(args, work)
    work = Path(tempfile.mkdtemp(prefix="gpu-check-"))
    try:
        return check(args, work)
    finally:
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    sys.exit(main())
