"""SlotPool: GPU ids per slot, and the per-GPU flock that holds across processes."""

import subprocess
import sys
import threading

import pytest

from runtime.gpus import GpuInfo, GpuSelectionError, parse_gpu_list
from runtime.slots import SlotPool, SlotWaitInterrupted, make_slots


def test_make_slots_spreads_over_gpus_first():
    slots = make_slots(["0", "1"], trials_per_gpu=2, cpu_slots=3)
    assert [(s.gpu, s.ordinal) for s in slots] == [("0", 0), ("1", 0), ("0", 1), ("1", 1)]
    cpu = make_slots(None, trials_per_gpu=2, cpu_slots=3)
    assert [s.cuda_visible_devices for s in cpu] == ["", "", ""]


def test_pool_hands_out_each_slot_once(tmp_path):
    pool = SlotPool(make_slots(["0", "1"], trials_per_gpu=1, cpu_slots=1), lock_dir=tmp_path)
    with pool.acquire() as a, pool.acquire() as b:
        assert {a.gpu, b.gpu} == {"0", "1"}
        stop = threading.Event()
        threading.Timer(0.3, stop.set).start()
        with pytest.raises(SlotWaitInterrupted):  # both taken: a third waits until stopped
            with pool.acquire(stop):
                pass
    with pool.acquire() as again:
        assert again.gpu == "0"


def test_gpu_lock_holds_across_processes_and_dies_with_its_holder(tmp_path):
    holder = subprocess.Popen(
        [sys.executable, "-c",
         "import fcntl, os, sys; fd = os.open(sys.argv[1], os.O_RDWR | os.O_CREAT); "
         "fcntl.flock(fd, fcntl.LOCK_EX); print('locked', flush=True); sys.stdin.read()",
         str(tmp_path / "gpu-0.0.lock")],
        stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline().strip() == "locked"
        pool = SlotPool(make_slots(["0"], trials_per_gpu=1, cpu_slots=1), lock_dir=tmp_path)
        stop = threading.Event()
        threading.Timer(0.5, stop.set).start()
        with pytest.raises(SlotWaitInterrupted):  # the other process holds GPU 0's only place
            with pool.acquire(stop):
                pass
    finally:
        holder.kill()
        holder.wait()
    with pool.acquire() as slot:  # the kernel released the dead holder's lock
        assert slot.gpu == "0"


def test_gpu_list_is_checked_against_nvml():
    two = [GpuInfo(0, "A", 1), GpuInfo(1, "B", 1)]
    assert parse_gpu_list("1, 0", two) == ["1", "0"]
    with pytest.raises(GpuSelectionError, match=r"GPU 3 does not exist \(NVML reports GPUs 0-1\)"):
        parse_gpu_list("0,3", two)
    with pytest.raises(GpuSelectionError, match="no GPUs"):
        parse_gpu_list("0", [])
    assert parse_gpu_list("0,1", None) == ["0", "1"]  # no NVML: trust the user
