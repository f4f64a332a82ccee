"""SlotPool: GPU ids per slot, and the per-GPU flock that holds across processes and users."""

import os
import shutil
import stat
import subprocess
import sys
import tempfile
import threading
from pathlib import Path

import pytest

from conftest import ROOT
from runtime.slots import SlotPool, SlotWaitInterrupted, make_slots, open_lock_file


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


def test_lock_files_are_shared_whatever_the_umask(tmp_path):
    lock_dir = tmp_path / "a" / "locks"
    old = os.umask(0o077)
    try:
        pool = SlotPool(make_slots(["0"], uuids=["GPU-x"], trials_per_gpu=1, cpu_slots=1), lock_dir=lock_dir)
        with pool.acquire():
            pass
    finally:
        os.umask(old)
    assert stat.S_IMODE(lock_dir.stat().st_mode) == 0o1777  # world-writable and sticky, as /tmp
    assert stat.S_IMODE((lock_dir / "gpu-GPU-x.0.lock").stat().st_mode) == 0o666
    mine = tmp_path / "mine"
    mine.mkdir(mode=0o755)
    os.close(open_lock_file(mine / "gpu-0.0.lock"))
    assert stat.S_IMODE(mine.stat().st_mode) == 0o755  # a dir that was there is left as it is


HOLDER = """import sys
from pathlib import Path
from runtime.slots import SlotPool, make_slots
pool = SlotPool(make_slots(["0", "1"], uuids=["GPU-a", "GPU-b"], trials_per_gpu=1, cpu_slots=1),
                lock_dir=Path(sys.argv[1]))
with pool.acquire(), pool.acquire():
    print("locked", flush=True)
    sys.stdin.read()
"""


def as_nobody(*argv: str) -> list[str]:
    return ["setpriv", "--reuid", "65534", "--regid", "65534", "--clear-groups", *argv]


def test_two_users_share_the_gpu_locks():
    """Root's search made the lock dir; GPU a's lock file is root's, 0644 (as an older
    autofinetune left it). A search of another user (nobody, via setpriv) takes GPU a (its file
    opened read-only: flock needs no write access) and GPU b (a new file); root's then waits
    for both, and gets both once the other's holder is gone. Failed before with
    PermissionError as nobody."""
    if os.geteuid() != 0 or shutil.which("setpriv") is None:
        pytest.skip("needs root and setpriv to run a second locker as another user")
    probe = subprocess.run(as_nobody(sys.executable, "-c", "import runtime.slots"), cwd=ROOT,
                           capture_output=True, text=True)
    if probe.returncode != 0:
        pytest.skip(f"user nobody cannot run {sys.executable} with {ROOT} (needs both world-readable): "
                    f"{probe.stderr.strip()[-200:]}")
    base = Path(tempfile.mkdtemp(prefix="autofinetune-two-users-"))
    try:
        base.chmod(0o755)
        lock_dir = base / "locks"
        mine = SlotPool(make_slots(["0"], uuids=["GPU-z"], trials_per_gpu=1, cpu_slots=1), lock_dir=lock_dir)
        with mine.acquire():  # root creates the dir
            pass
        (lock_dir / "gpu-GPU-a.0.lock").write_text("")
        (lock_dir / "gpu-GPU-a.0.lock").chmod(0o644)
        holder = subprocess.Popen(as_nobody(sys.executable, "-c", HOLDER, str(lock_dir)), cwd=ROOT,
                                  stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                                  text=True)
        try:
            assert holder.stdout.readline().strip() == "locked", holder.stderr.read()
            both = SlotPool(make_slots(["0", "1"], uuids=["GPU-a", "GPU-b"], trials_per_gpu=1, cpu_slots=1),
                            lock_dir=lock_dir)
            stop = threading.Event()
            threading.Timer(0.5, stop.set).start()
            with pytest.raises(SlotWaitInterrupted):  # nobody holds both GPUs' only place
                with both.acquire(stop):
                    pass
        finally:
            holder.kill()
            holder.wait()
        with both.acquire() as a, both.acquire() as b:  # the kernel released nobody's locks
            assert {a.uuid, b.uuid} == {"GPU-a", "GPU-b"}
        theirs = (lock_dir / "gpu-GPU-b.0.lock").stat()
        assert theirs.st_uid == 65534 and stat.S_IMODE(theirs.st_mode) == 0o666
        assert lock_dir.stat().st_uid == 0 and stat.S_IMODE(lock_dir.stat().st_mode) == 0o1777
    finally:
        shutil.rmtree(base, ignore_errors=True)
