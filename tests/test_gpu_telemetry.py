"""GPU telemetry: the real no-NVML path in a real search; the sampler against a small fake NVML."""

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
from flows.autofinetune import main
from watch import gpu_telemetry
from watch.gpu_telemetry import GpuTelemetry, busy_warning, gpu_line, interval_from_env, process_name

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


def test_without_nvml_the_watcher_is_inert():
    if nvml_works():
        pytest.skip("NVML works on this machine")
    said = []
    telemetry = GpuTelemetry(say=said.append)  # the real pynvml
    started(telemetry, gpu_slots("0", "1"))
    telemetry.trial_started(0, 0, {"index": 0, "gpu": "0"}, {})
    record = {"round": 0, "candidate": 0}
    telemetry.trial_finished(record)
    telemetry.close()
    assert len(said) == 1 and said[0].startswith("GPU telemetry off: NVML not available (")
    assert record == {"round": 0, "candidate": 0} and not telemetry.enabled


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


def test_interval_from_env(monkeypatch):
    monkeypatch.delenv(gpu_telemetry.INTERVAL_ENV, raising=False)
    assert interval_from_env() == 2.0
    monkeypatch.setenv(gpu_telemetry.INTERVAL_ENV, "0.5")
    assert interval_from_env() == 0.5
    for bad in ("-1", "soon", "inf", "0"):
        monkeypatch.setenv(gpu_telemetry.INTERVAL_ENV, bad)
        assert interval_from_env() == 2.0
    with pytest.raises(ValueError, match="interval_s=0"):
        GpuTelemetry(interval_s=0)


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
        telemetry = GpuTelemetry(nvml=nvml, say=said.append, interval_s=3600)
        started(telemetry, gpu_slots("0", "1", "0"))
        telemetry.close()
    finally:
        sleeper.kill()
        sleeper.wait()
    assert said[0] == "GPU 0: Fake GPU A, 81559 MiB (1024 MiB in use), 2 trial slots"
    assert said[1] == "GPU 1: Fake GPU B, 81559 MiB (1024 MiB in use), 1 trial slot"
    assert said[2].startswith("WARNING: GPU 1 is already in use by another program: "
                              f"pid {sleeper.pid} (sleep 30, 900 MiB); pid 999999999 (not visible")
    assert str(os.getpid()) not in said[2]  # this process is not "another program"
    assert len(said) == 3 and nvml.inits == nvml.shutdowns == 1


def test_samples_land_in_the_record_of_each_gpu_trial():
    nvml, clock, said = FakeNvml(), FakeClock(), []
    nvml.utilization[0] = [10, 95, 97]
    telemetry = GpuTelemetry(nvml=nvml, say=said.append, clock=clock, interval_s=3600)
    started(telemetry, gpu_slots("0", "1") + [{"index": 2, "gpu": None, "ordinal": 0}])
    telemetry.trial_started(0, 0, {"index": 0, "gpu": "0"}, {})
    telemetry.trial_started(0, 1, {"index": 2, "gpu": None}, {})  # a CPU slot: nothing to sample
    for used in (100, 2000, 2100):
        clock.now += 2
        nvml.used[0] = used * MIB
        telemetry.sample_now()
    telemetry.trial_started(0, 2, {"index": 1, "gpu": "1"}, {})
    clock.now += 2.5
    telemetry.sample_now()
    gpu_record, cpu_record, late = ({"round": 0, "candidate": i} for i in range(3))
    telemetry.trial_finished(gpu_record)
    telemetry.trial_finished(cpu_record)
    telemetry.trial_finished(late)
    telemetry.close()
    assert gpu_record["gpu_samples"] == [
        {"t": 2.0, "utilization": 10, "memory_used_mib": 100},
        {"t": 4.0, "utilization": 95, "memory_used_mib": 2000},
        {"t": 6.0, "utilization": 97, "memory_used_mib": 2100},
        {"t": 8.5, "utilization": 97, "memory_used_mib": 2100}]
    assert "gpu_samples" not in cpu_record
    assert late["gpu_samples"] == [{"t": 2.5, "utilization": 50, "memory_used_mib": 1024}]
    json.dumps(gpu_record)  # lands in trial-<i>.json as is


def test_a_long_trial_keeps_a_bounded_thinned_series(monkeypatch):
    monkeypatch.setattr(gpu_telemetry, "MAX_SAMPLES", 4)
    nvml, clock = FakeNvml(), FakeClock()
    telemetry = GpuTelemetry(nvml=nvml, say=lambda line: None, clock=clock, interval_s=3600)
    started(telemetry, gpu_slots("0"))
    telemetry.trial_started(0, 0, {"index": 0, "gpu": "0"}, {})
    for _ in range(20):
        clock.now += 1
        telemetry.sample_now()
    record = {"round": 0, "candidate": 0}
    telemetry.trial_finished(record)
    telemetry.close()
    times = [s["t"] for s in record["gpu_samples"]]
    assert 2 <= len(times) < 4 and times == sorted(times) and times[0] == 1.0
    assert times[-1] >= 16  # the series still reaches the end of the trial


def test_a_failing_gpu_is_reported_once_and_others_go_on():
    nvml, said = FakeNvml(), []
    telemetry = GpuTelemetry(nvml=nvml, say=said.append, interval_s=3600)
    started(telemetry, gpu_slots("0", "1"))
    telemetry.trial_started(0, 0, {"index": 0, "gpu": "0"}, {})
    telemetry.trial_started(0, 1, {"index": 1, "gpu": "1"}, {})
    nvml.broken.add(1)
    for _ in range(3):
        telemetry.sample_now()
    records = [{"round": 0, "candidate": i} for i in range(2)]
    for record in records:
        telemetry.trial_finished(record)
    telemetry.close()
    assert [line for line in said if "sampling GPU 1 failed" in line] == [
        "GPU telemetry: sampling GPU 1 failed (GPU is lost); skipping it"]
    assert len(records[0]["gpu_samples"]) == 3 and records[1]["gpu_samples"] == []


def test_nvml_init_failure_is_one_info_line():
    said = []
    telemetry = GpuTelemetry(nvml=FakeNvml(fail_init="Driver Not Loaded"), say=said.append)
    started(telemetry, gpu_slots("0"))
    telemetry.trial_started(0, 0, {"index": 0, "gpu": "0"}, {})
    telemetry.close()
    assert said == ["GPU telemetry off: NVML not available (Driver Not Loaded)"]

    said.clear()
    nvml = FakeNvml()
    telemetry = GpuTelemetry(nvml=nvml, say=said.append)
    started(telemetry, gpu_slots(None))
    telemetry.close()
    assert said == ["GPU telemetry off: the trials run on CPU slots"] and nvml.shutdowns == 1


def test_the_sampler_thread_samples_and_stops_cleanly():
    nvml = FakeNvml()
    telemetry = GpuTelemetry(nvml=nvml, say=lambda line: None, interval_s=0.01)
    started(telemetry, gpu_slots("0"))
    telemetry.trial_started(0, 0, {"index": 0, "gpu": "0"}, {})
    deadline = time.monotonic() + 10
    while time.monotonic() < deadline:
        with telemetry._lock:
            if len(telemetry._running[(0, 0)]["samples"]) >= 3:
                break
        time.sleep(0.01)
    record = {"round": 0, "candidate": 0}
    telemetry.trial_finished(record)
    thread = telemetry._thread
    telemetry.close()
    assert len(record["gpu_samples"]) >= 3
    assert not thread.is_alive() and nvml.shutdowns == 1
    assert not any(t.name == "autofinetune-gpu-telemetry" for t in threading.enumerate())


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
