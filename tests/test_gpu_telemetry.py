"""GPU telemetry: the no-NVML path in a real search; the start-up watcher and the per-trial
sampler (which runs with the trial, wherever it runs) against a strict fake NVML
(``tests/fake_nvml.py``); a real search whose trials see the job's CUDA_VISIBLE_DEVICES and
are sampled by UUID."""

from __future__ import annotations

import importlib.util
import json
import os
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest

from conftest import ROOT
from fake_nvml import ERR, MIB, FakeNvml, fake_uuid, install_nvml
from flows.cli import main
from runtime import gpu_sampling
from runtime.gpu_sampling import GpuSampler, interval_from_env
from runtime.slots import Slot
from runtime.trial import TrialSpec, run_trial
from watch.gpu_telemetry import GpuTelemetry, busy_warning, gpu_line, process_name


class FakeClock:
    def __init__(self):
        self.now = 500.0

    def __call__(self):
        return self.now


def gpu_slots(*gpus):
    return [{"index": n, "gpu": g, "ordinal": 0} for n, g in enumerate(gpus)]


def started(telemetry, slots):
    telemetry.search_started({"output_dir": "/x", "names": ["x"], "rounds": 1, "popsize": 2,
                              "next_round": 0, "slots": slots, "resumed": False, "trials": []})


# -- a real search on the job's GPUs (CUDA_VISIBLE_DEVICES=2,3), NVML failing and working ------

def seen_gpus(out, popsize):
    """What CUDA_VISIBLE_DEVICES each trial's process saw (the toy train.py logs it)."""
    return [next(line.split("cuda=")[1].split()[0] for line in
                 (out / "round0" / f"log-{i}.info").read_text().splitlines() if "cuda=" in line)
            for i in range(popsize)]


@pytest.mark.usefixtures("prefect_api", "lock_dir")
def test_a_failing_nvml_is_one_warning_and_the_search_runs_on_the_jobs_gpus(toy, monkeypatch, capsys):
    """NVML counts a GPU whose handle then raises NoPermission (a cgroup-restricted job):
    one warning naming the error, no traceback, the trials on what CUDA_VISIBLE_DEVICES names.
    (Without NVML at all: tests/test_pipeline.py::test_gpu_slots_each_trial_sees_its_gpu.)"""
    install_nvml(monkeypatch, FakeNvml(gpus=("A", "B", "C", "D"), denied={0}))
    monkeypatch.chdir(toy)
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "2,3")  # what a scheduler hands the job
    code = main(["train.py", "--param-file", "hparam.yaml", "--evaluator", "fulltrail",
                 "--popsize", "3", "--round", "1", "--output-dir", "out"])
    assert code == 0
    captured = capsys.readouterr()
    warnings = [line for line in (captured.out + captured.err).splitlines() if "WARNING" in line]
    assert warnings == ["[autofinetune] WARNING: NVML failed (Insufficient Permissions (NVMLError_NoPermission)): "
                        "using the GPUs CUDA_VISIBLE_DEVICES names (2,3) without checking them; GPU telemetry "
                        "may be off"]
    assert "Traceback" not in captured.err + captured.out
    records = [json.loads((toy / "out" / "round0" / f"trial-{i}.json").read_text()) for i in range(3)]
    assert {r["gpu"] for r in records} == {"2", "3"}  # one slot per GPU of the job
    assert seen_gpus(toy / "out", 3) == [f"'{r['gpu']}'" for r in records]
    assert all(r["outcome"] == "ok" and r["gpu_uuid"] is None for r in records)


@pytest.mark.usefixtures("prefect_api")
def test_with_nvml_the_jobs_gpus_are_sampled_and_locked_by_uuid(toy, monkeypatch, capsys, lock_dir):
    nvml = FakeNvml(gpus=("A", "B", "C", "D"), no_utilization={3})
    install_nvml(monkeypatch, nvml)
    monkeypatch.chdir(toy)
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "2,3")
    monkeypatch.setenv(gpu_sampling.INTERVAL_ENV, "0.1")
    code = main(["train.py", "--param-file", "hparam.yaml", "--evaluator", "fulltrail", "--popsize", "4",
                 "--round", "1", "--trials-per-gpu", "2", "--output-dir", "out", "sleep", "0.6"])
    assert code == 0
    out = capsys.readouterr().out
    assert "[autofinetune] GPU 2: C, 81559 MiB (1024 MiB in use), 2 trial slots" in out
    records = [json.loads((toy / "out" / "round0" / f"trial-{i}.json").read_text()) for i in range(4)]
    assert seen_gpus(toy / "out", 4) == [f"'{r['gpu']}'" for r in records]
    assert {(r["gpu"], r["gpu_uuid"]) for r in records} == {("2", fake_uuid(2)), ("3", fake_uuid(3))}
    for r in records:
        assert r["gpu_samples"] and all(s["memory_used_mib"] == 1024 for s in r["gpu_samples"])
        # GPU 3 does not support utilization: its memory samples are kept all the same
        assert all(("utilization" in s) == (r["gpu"] == "2") for s in r["gpu_samples"])
    assert sorted(p.name for p in lock_dir.iterdir()) == sorted(
        f"gpu-{fake_uuid(g)}.{j}.lock" for g in (2, 3) for j in (0, 1))
    assert nvml.inits == nvml.shutdowns


def test_without_nvml_the_watcher_and_the_sampler_are_inert():
    said = []
    telemetry = GpuTelemetry(say=said.append)  # pynvml as the conftest left it: absent
    started(telemetry, gpu_slots("0", "1"))
    with GpuSampler("0", interval_s=0.01) as sampler:
        time.sleep(0.05)
    assert len(said) == 1 and said[0].startswith("GPU telemetry off: NVML not available (")
    assert not sampler.sampled and sampler.samples == [] and sampler.error is None


# -- pure parts -----------------------------------------------------------------------------

def test_gpu_line_and_busy_warning_text():
    assert gpu_line(0, "NVIDIA H100 80GB HBM3", 81559 * MIB, 4 * MIB, 2) == (
        "GPU 0: NVIDIA H100 80GB HBM3, 81559 MiB (4 MiB in use), 2 trial slots")
    assert gpu_line("1", "X", 1024 * MIB, 0, 1).endswith("1 trial slot")
    text = busy_warning("1", [(4242, "python other_train.py --lr 0.1", 1536 * MIB), (77, None, None)])
    assert text == ("WARNING: GPU 1 is already in use by another program: pid 4242 (python "
                    "other_train.py --lr 0.1, 1536 MiB); pid 77 (not visible from here, e.g. another "
                    "container). Trials on it will share its memory and compute; pick another with "
                    "--gpu, or stop that program")


def test_process_name_reads_proc(tmp_path):
    (tmp_path / "42").mkdir()
    (tmp_path / "42" / "cmdline").write_bytes(b"python\0train.py\0--lr\0" + b"x" * 100 + b"\0")
    (tmp_path / "43").mkdir()
    (tmp_path / "43" / "cmdline").write_bytes(b"")  # a kernel thread: no argv
    (tmp_path / "43" / "comm").write_text("kworker\n")
    name = process_name(42, tmp_path)
    assert name.startswith("python train.py --lr xxx") and name.endswith("...") and len(name) == 80
    assert process_name(43, tmp_path) == "kworker"
    assert process_name(44, tmp_path) is None
    assert "sleep" in process_name(os.getpid()) or "python" in process_name(os.getpid())


def test_interval_from_env_and_a_bad_one_is_said_at_start(monkeypatch):
    monkeypatch.delenv(gpu_sampling.INTERVAL_ENV, raising=False)
    assert interval_from_env() == 2.0
    monkeypatch.setenv(gpu_sampling.INTERVAL_ENV, "0.5")
    assert interval_from_env() == 0.5
    for bad in ("-1", "soon", "inf", "0"):
        monkeypatch.setenv(gpu_sampling.INTERVAL_ENV, bad)
        assert interval_from_env() == 2.0
    said = []
    started(GpuTelemetry(nvml=FakeNvml(), say=said.append), gpu_slots("0"))
    assert said[0] == ("ignoring AUTOFINETUNE_GPU_SAMPLE_S='0': expected a positive number of seconds; "
                       "sampling every 2s")
    with pytest.raises(ValueError, match="interval_s=0"):
        GpuSampler("0", interval_s=0)


# -- the watcher over a fake NVML -----------------------------------------------------------

def test_start_lists_gpus_and_warns_about_other_programs(tmp_path):
    sleeper = subprocess.Popen(["sleep", "30"])
    deadline = time.monotonic() + 10
    while b"sleep" not in Path(f"/proc/{sleeper.pid}/cmdline").read_bytes() and time.monotonic() < deadline:
        time.sleep(0.01)  # until the child has exec'd
    try:
        nvml = FakeNvml(processes={1: [(sleeper.pid, 900 * MIB), (os.getpid(), 5 * MIB),
                                       (999_999_999, None)]})
        said = []
        telemetry = GpuTelemetry(nvml=nvml, say=said.append)
        started(telemetry, gpu_slots("0", "1", "0"))
    finally:
        sleeper.kill()
        sleeper.wait()
    assert said[0] == "GPU 0: Fake GPU A, 81559 MiB (1024 MiB in use), 2 trial slots"
    assert said[1] == "GPU 1: Fake GPU B, 81559 MiB (1024 MiB in use), 1 trial slot"
    assert said[2].startswith("WARNING: GPU 1 is already in use by another program: "
                              f"pid {sleeper.pid} (sleep 30, 900 MiB); pid 999999999 (not visible")
    assert str(os.getpid()) not in said[2]  # this process is not "another program"
    assert len(said) == 3 and nvml.inits == nvml.shutdowns == 1


def test_a_real_trial_on_a_gpu_slot_records_its_samples(tmp_path):
    """run_trial samples the slot's GPU while the child runs (here on a fake NVML) and puts
    the series into the record; the sampler thread is gone afterwards."""
    nvml = FakeNvml()
    nvml.utilization[1] = [10, 95, 97]
    script = tmp_path / "train.py"
    script.write_text("import os, time\ntime.sleep(0.5)\n"
                      "open(os.environ['AUTOFINETUNE_RESULT_FILE'], 'w').write('0.5')\n")
    spec = TrialSpec(round=0, candidate=0, params={}, flags=[], python=sys.executable, script=str(script),
                     cwd=str(tmp_path), saved_params_dir=str(tmp_path / "model"),
                     log_path=str(tmp_path / "log"), result_path=str(tmp_path / "result"),
                     pid_path=str(tmp_path / "pid"))
    record = run_trial(spec, Slot(index=0, gpu="1"), stop=threading.Event(),
                       gpu_sampler=GpuSampler("1", interval_s=0.05, nvml=nvml))
    assert record["outcome"] == "ok" and record["gpu"] == "1"
    samples = record["gpu_samples"]
    assert len(samples) >= 3 and [s["utilization"] for s in samples[:3]] == [10, 95, 97]
    assert all(s["memory_used_mib"] == 1024 for s in samples)
    assert [s["t"] for s in samples] == sorted(s["t"] for s in samples) and samples[-1]["t"] < 5
    assert nvml.inits == nvml.shutdowns == 1 and "gpu_sampling_error" not in record
    assert not any(t.name.startswith("autofinetune-gpu") for t in threading.enumerate())


def test_a_long_trial_keeps_a_bounded_thinned_series(monkeypatch):
    monkeypatch.setattr(gpu_sampling, "MAX_SAMPLES", 4)
    clock = FakeClock()
    sampler = GpuSampler("0", nvml=FakeNvml(), clock=clock, interval_s=3600).start()
    for _ in range(20):
        clock.now += 1
        sampler.sample_now()
    sampler.stop()
    times = [s["t"] for s in sampler.samples]
    assert 2 <= len(times) < 4 and times == sorted(times) and times[0] == 1.0
    assert times[-1] >= 16  # the series still reaches the end of the trial


def test_a_failing_gpu_stops_its_sampler_and_says_why_in_the_record():
    nvml = FakeNvml()
    good = GpuSampler("0", nvml=nvml, interval_s=3600).start()
    bad = GpuSampler("1", nvml=nvml, interval_s=3600).start()
    nvml.broken.add(1)
    for _ in range(3):
        good.sample_now()
        bad.sample_now()
    good.stop()
    bad.stop()
    assert len(good.samples) == 3 and bad.samples == []
    assert bad.error == "sampling GPU 1 failed (GPU is lost (NVMLError_GpuIsLost)); stopped sampling it"
    assert GpuSampler("7", nvml=nvml).start().error == ("GPU 7 cannot be read through NVML "
                                                       "(Invalid Argument (NVMLError_InvalidArgument))")
    assert nvml.inits == nvml.shutdowns == 3


def test_nvml_init_failure_is_one_info_line():
    said = []
    telemetry = GpuTelemetry(nvml=FakeNvml(init_error=ERR.DRIVER_NOT_LOADED), say=said.append)
    started(telemetry, gpu_slots("0"))
    assert said == ["GPU telemetry off: NVML not available (Driver Not Loaded (NVMLError_DriverNotLoaded))"]
    for code in (ERR.DRIVER_NOT_LOADED, ERR.NO_PERMISSION):  # a failing NVML was said once, at start
        sampler = GpuSampler("0", nvml=FakeNvml(init_error=code)).start()
        sampler.stop()
        assert not sampler.sampled and sampler.error is None

    said.clear()
    nvml = FakeNvml()
    telemetry = GpuTelemetry(nvml=nvml, say=said.append)
    started(telemetry, gpu_slots(None))
    assert said == ["GPU telemetry off: the trials run on CPU slots"] and nvml.shutdowns == 1


def test_each_field_is_read_on_its_own_and_memory_used_is_v2():
    mig = "MIG-aaaaaaaa-bbbb-cccc-dddd-eeeeeeeeeeee"
    nvml = FakeNvml(migs={mig: 0}, no_utilization={1})
    nvml.used[0] = 2048 * MIB
    for gpu, expected in ((mig, {"memory_used_mib": 2048}), ("1", {"memory_used_mib": 1024}),
                          ("0", {"utilization": 50, "memory_used_mib": 2048})):
        sampler = GpuSampler(gpu, nvml=nvml, interval_s=3600).start()
        sampler.sample_now()
        sampler.stop()
        assert sampler.error is None and [{k: v for k, v in s.items() if k != "t"} for s in sampler.samples] == [expected]
    old = FakeNvml(no_memory_v2=True)  # a driver without the v2 call: v1, reserved memory included
    sampler = GpuSampler("0", nvml=old, interval_s=3600).start()
    sampler.sample_now()
    sampler.stop()
    assert sampler.samples[0]["memory_used_mib"] == 1024 + 300
    said = []
    started(GpuTelemetry(nvml=nvml, say=said.append), [{"index": 0, "gpu": mig, "ordinal": 0, "uuid": mig}])
    assert said == ["GPU MIG-aaaaaaaa-bbbb-cccc-dddd-eeeeeeeeeeee: Fake GPU A MIG 1g.10gb, 81559 MiB "
                    "(2048 MiB in use), 1 trial slot"]


def test_a_gpu_that_supports_no_field_stops_its_sampler():
    nvml = FakeNvml(no_utilization={0})
    nvml.nvmlDeviceGetMemoryInfo = lambda handle, version=None: (_ for _ in ()).throw(nvml.error(ERR.NOT_SUPPORTED))
    sampler = GpuSampler("0", nvml=nvml, interval_s=3600).start()
    sampler.sample_now()
    sampler.stop()
    assert sampler.samples == [] and "Not Supported" in sampler.error


# -- bench/gpu_check.py (it runs on the lent GPU machine; here, what runs without a GPU) -----

LENT_MACHINE_LACKS = ("prefect", "cmaes", "optuna", "distributed")


def load_gpu_check():
    spec = importlib.util.spec_from_file_location("gpu_check", ROOT / "bench" / "gpu_check.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_gpu_check_needs_no_prefect_and_stops_without_cuda(tmp_path):
    """The plain mode imports nothing the lent machine lacks; without torch, and with a torch
    that sees no CUDA, it stops with exit 2 and the driver version."""
    for name in LENT_MACHINE_LACKS:
        (tmp_path / f"{name}.py").write_text(f"raise ImportError('{name} is not on the lent GPU machine')\n")
    script = [sys.executable, str(ROOT / "bench" / "gpu_check.py")]
    env = dict(os.environ, PYTHONPATH=str(tmp_path))
    help_run = subprocess.run([*script, "--help"], capture_output=True, text=True, env=env, timeout=60)
    assert help_run.returncode == 0 and "--mode" in help_run.stdout
    try:
        import torch  # noqa: F401
        has_torch = True
    except ImportError:
        has_torch = False
    if not has_torch:
        run = subprocess.run(script, capture_output=True, text=True, env=env, timeout=60)
        assert run.returncode == 2 and "gpu_check: torch is not installed for" in run.stderr
        assert "; NVIDIA driver " in run.stderr and "Traceback" not in run.stderr
    (tmp_path / "torch").mkdir()  # a torch without CUDA, as on a driver too old for its CUDA
    (tmp_path / "torch" / "__init__.py").write_text(
        "from types import SimpleNamespace\n__version__ = '2.9.0+fake'\nversion = SimpleNamespace(cuda='13.0')\n"
        "cuda = SimpleNamespace(is_available=lambda: False)\n")
    run = subprocess.run(script, capture_output=True, text=True, env=env, timeout=60)
    assert run.returncode == 2 and "Traceback" not in run.stderr
    assert "gpu_check: torch 2.9.0+fake (built for CUDA 13.0) sees no CUDA device; NVIDIA driver " in run.stderr
    assert "NVIDIA driver: " in run.stdout


FAKE_CUDA_TRAIN = """\
import argparse, json, math, os, time
from autofinetune import report_final_result
p = argparse.ArgumentParser()
p.add_argument("--lr", type=float)
p.add_argument("--seconds", type=float)
p.add_argument("--saved_params_dir")
args, _ = p.parse_known_args()
cuda = os.environ["CUDA_VISIBLE_DEVICES"]
uuid = cuda if cuda.startswith("GPU-") else "GPU-%08x-1111-2222-3333-444444444444" % int(cuda)
time.sleep(args.seconds)
os.makedirs(args.saved_params_dir, exist_ok=True)
json.dump({"CUDA_VISIBLE_DEVICES": cuda, "cuda": True, "device_count": 1, "name": "Fake GPU",
           "uuid": uuid.removeprefix("GPU-"), "max_memory_allocated_mib": 9, "steps": 1},
          open(os.path.join(args.saved_params_dir, "seen.json"), "w"))
report_final_result(-abs(math.log10(args.lr) + 3))
"""


def test_gpu_check_runs_its_passes_and_checks_each_trial(tmp_path, monkeypatch, capsys):
    """gpu_check's plain mode on a fake NVML with a train.py that plays CUDA: both passes run,
    every trial is reported and checked (torch itself only runs on the lent machine)."""
    gpu_check = load_gpu_check()
    install_nvml(monkeypatch, FakeNvml())
    monkeypatch.delenv("CUDA_VISIBLE_DEVICES")
    monkeypatch.setattr(gpu_check, "TRAIN_PY", FAKE_CUDA_TRAIN)
    monkeypatch.setattr(gpu_check, "probe_torch", lambda python, timeout: (
        {"torch": "fake", "built_for_cuda": "13.0", "cuda": True, "devices": ["Fake GPU"], "import_s": 0}, None))
    for name in ("AUTOFINETUNE_GPU_SAMPLE_S", "AUTOFINETUNE_LOCK_DIR", "PYTHONPATH"):
        monkeypatch.setenv(name, os.environ.get(name, ""))  # check() sets them: restored afterwards
    code = gpu_check.main(["--gpu", "1", "--seconds", "0.4", "--sample-s", "0.1", "--keep", str(tmp_path / "w")])
    out = capsys.readouterr().out
    assert code == 0, out
    assert "NVIDIA driver: 580.95.05" in out and f"GPU 1: Fake GPU B, {fake_uuid(1)}" in out
    assert f"pass uuid: the parent's CUDA_VISIBLE_DEVICES={fake_uuid(1)}" in out
    assert out.count("saw: CUDA_VISIBLE_DEVICES='1'") == 4 and out.count(f"saw: CUDA_VISIBLE_DEVICES='{fake_uuid(1)}'") == 2
    assert f"lock gpu-{fake_uuid(1)}.1.lock" in out and "OK: every trial ran on its slot's GPU" in out
    record = {"round": 0, "candidate": 1, "outcome": "ok", "gpu": "1", "gpu_uuid": fake_uuid(1), "log": "l",
              "gpu_samples": [{"t": 1, "utilization": 0, "memory_used_mib": 0}]}
    assert gpu_check.trial_problems(record, {"CUDA_VISIBLE_DEVICES": "1", "cuda": True, "device_count": 1,
                                             "uuid": fake_uuid(0)}) == [
        f"round 0 trial 1: CUDA device {fake_uuid(0)} is not NVML's {fake_uuid(1)} for slot '1': CUDA numbers "
        "the GPUs differently (CUDA_DEVICE_ORDER?)",
        "round 0 trial 1: no memory sample above 0 MiB", "round 0 trial 1: every utilization sample is 0%"]
