"""GPU telemetry: the real no-NVML path in a real search; the start-up watcher and the
per-trial sampler (which runs with the trial, wherever it runs) against a small fake NVML."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import threading
import time
from pathlib import Path
from types import SimpleNamespace

import pytest

from conftest import ROOT
from flows.cli import main
from runtime import gpu_sampling
from runtime.gpu_sampling import GpuSampler, interval_from_env
from runtime.slots import Slot
from runtime.trial import TrialSpec, run_trial
from watch.gpu_telemetry import GpuTelemetry, busy_warning, gpu_line, process_name

MIB = 1024 * 1024


def nvml_works() -> bool:
    try:
        import pynvml

        pynvml.nvmlInit()
    except Exception:  # noqa: BLE001
        return False
    pynvml.nvmlShutdown()
    return True


class FakeNvml:
    """The few NVML calls the telemetry makes, over scripted readings."""

    class NVMLError(Exception):
        pass

    def __init__(self, gpus=("Fake GPU A", "Fake GPU B"), processes=None, fail_init=None):
        self.names = list(gpus)
        self.utilization = {i: [50] for i in range(len(gpus))}  # readings, the last repeats
        self.used = {i: 1024 * MIB for i in range(len(gpus))}
        self.processes = processes or {}
        self.fail_init = fail_init
        self.broken: set[int] = set()
        self.inits = self.shutdowns = 0

    def nvmlInit(self):
        if self.fail_init:
            raise self.NVMLError(self.fail_init)
        self.inits += 1

    def nvmlShutdown(self):
        self.shutdowns += 1

    def nvmlDeviceGetHandleByIndex(self, index):
        if index >= len(self.names):
            raise self.NVMLError("Invalid Argument")
        return ("handle", index)

    def nvmlDeviceGetName(self, handle):
        return self.names[handle[1]].encode()  # older nvidia-ml-py returns bytes

    def nvmlDeviceGetMemoryInfo(self, handle):
        if handle[1] in self.broken:
            raise self.NVMLError("GPU is lost")
        return SimpleNamespace(total=81559 * MIB, used=self.used[handle[1]], free=0)

    def nvmlDeviceGetUtilizationRates(self, handle):
        if handle[1] in self.broken:
            raise self.NVMLError("GPU is lost")
        readings = self.utilization[handle[1]]
        return SimpleNamespace(gpu=readings.pop(0) if len(readings) > 1 else readings[0], memory=0)

    def nvmlDeviceGetComputeRunningProcesses(self, handle):
        return [SimpleNamespace(pid=pid, usedGpuMemory=used)
                for pid, used in self.processes.get(handle[1], [])]


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


# -- the real machine: no NVML here ---------------------------------------------------------

@pytest.mark.usefixtures("prefect_api", "lock_dir")
def test_without_nvml_a_search_on_gpu_slots_says_one_line_and_runs(toy, monkeypatch, capsys):
    if nvml_works():
        pytest.skip("NVML works on this machine; this test is about one without it")
    monkeypatch.chdir(toy)
    code = main(["train.py", "--param-file", "hparam.yaml", "--evaluator", "fulltrail",
                 "--popsize", "2", "--round", "1", "--gpu", "0", "--trials-per-gpu", "2",
                 "--output-dir", "out"])
    assert code == 0
    captured = capsys.readouterr()
    lines = [line for line in (captured.out + captured.err).splitlines() if "GPU telemetry" in line]
    assert len(lines) == 1
    assert lines[0].startswith("[autofinetune] GPU telemetry off: NVML not available (")
    assert "Traceback" not in captured.err
    for i in range(2):
        record = json.loads((toy / "out" / "round0" / f"trial-{i}.json").read_text())
        assert record["outcome"] == "ok" and record["gpu"] == "0" and "gpu_samples" not in record


def test_without_nvml_the_watcher_and_the_sampler_are_inert():
    if nvml_works():
        pytest.skip("NVML works on this machine")
    said = []
    telemetry = GpuTelemetry(say=said.append)  # the real pynvml
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
    assert bad.error == "sampling GPU 1 failed (GPU is lost); stopped sampling it"
    assert GpuSampler("7", nvml=nvml).start().error == "GPU 7 cannot be read through NVML (Invalid Argument)"
    assert nvml.inits == nvml.shutdowns == 3


def test_nvml_init_failure_is_one_info_line():
    said = []
    telemetry = GpuTelemetry(nvml=FakeNvml(fail_init="Driver Not Loaded"), say=said.append)
    started(telemetry, gpu_slots("0"))
    assert said == ["GPU telemetry off: NVML not available (Driver Not Loaded)"]
    sampler = GpuSampler("0", nvml=FakeNvml(fail_init="Driver Not Loaded")).start()
    sampler.stop()
    assert not sampler.sampled and sampler.error is None  # no NVML: a normal machine

    said.clear()
    nvml = FakeNvml()
    telemetry = GpuTelemetry(nvml=nvml, say=said.append)
    started(telemetry, gpu_slots(None))
    assert said == ["GPU telemetry off: the trials run on CPU slots"] and nvml.shutdowns == 1


# -- bench/gpu_check.py ---------------------------------------------------------------------

def test_gpu_check_script_parses_and_needs_torch():
    script = ROOT / "bench" / "gpu_check.py"
    env = dict(os.environ, PYTHONPATH=str(ROOT))
    help_run = subprocess.run([sys.executable, str(script), "--help"], capture_output=True, text=True,
                              env=env, timeout=60)
    assert help_run.returncode == 0 and "--gpu" in help_run.stdout
    try:
        import torch  # noqa: F401
    except ImportError:
        run = subprocess.run([sys.executable, str(script)], capture_output=True, text=True, env=env,
                             timeout=60)
        assert run.returncode == 2 and "pip install torch" in run.stderr
