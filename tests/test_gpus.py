"""GPU selection as a job sees its GPUs: the parent's CUDA_VISIBLE_DEVICES, NVML (a strict
fake: absent, working, or failing as the real one fails), ``--gpu`` ids (indices, GPU-/MIG-
UUIDs), and what reaches the slots, the lock files and the CLI."""

from __future__ import annotations

import threading

import pytest

from conftest import PYTHON
from fake_nvml import ERR, FakeNvml, fake_uuid, install_nvml
from flows.cli import main
from runtime.gpus import (GpuChoice, GpuSelectionError, detect_gpus, gpu_uuid, parse_gpu_ids, select_gpus,
                          visible_entries)
from runtime.settings import resolve_settings
from runtime.slots import Slot
from runtime.trial import TrialSpec, run_trial

MIG = "MIG-aaaaaaaa-bbbb-cccc-dddd-eeeeeeeeeeee"
FOUR = ("A", "B", "C", "D")


def test_ids_are_parsed_and_checked_for_shape():
    assert parse_gpu_ids(" 1, 0") == ["1", "0"] and parse_gpu_ids("01") == ["1"]
    assert parse_gpu_ids(f"{fake_uuid(0)},{MIG}") == [fake_uuid(0), MIG]
    with pytest.raises(GpuSelectionError, match=r"--gpu 'a': expected comma-separated GPU ids: indices such as"):
        parse_gpu_ids("a")
    with pytest.raises(GpuSelectionError, match="a GPU is listed twice"):
        parse_gpu_ids("0,00")


def test_cuda_visible_devices_is_read_as_cuda_reads_it():
    assert visible_entries(None) is None
    assert visible_entries("") == [] and visible_entries("-1") == [] and visible_entries(" ") == []
    assert visible_entries("2,3") == ["2", "3"] and visible_entries(" 2 , 3 ") == ["2", "3"]
    assert visible_entries("0,-1,1") == ["0"]  # CUDA stops at the first entry that is no id
    assert visible_entries(f"{MIG},GPU-1234") == [MIG, "GPU-1234"]


# -- CUDA_VISIBLE_DEVICES unset: NVML's GPUs ----------------------------------------------------

def test_unset_uses_every_nvml_gpu_by_index_and_resolves_uuids():
    nvml = FakeNvml()
    assert select_gpus(None, None, nvml=nvml) == GpuChoice(("0", "1"), (fake_uuid(0), fake_uuid(1)))
    assert select_gpus("1, 0", None, nvml=nvml).gpus == ("1", "0")
    by_uuid = select_gpus(f"{fake_uuid(1)}", None, nvml=nvml)
    assert by_uuid == GpuChoice((fake_uuid(1),), (fake_uuid(1),))  # the id as written, for the trial
    assert select_gpus("GPU-00000001", None, nvml=nvml).uuids == (fake_uuid(1),)  # a unique prefix, as CUDA
    with pytest.raises(GpuSelectionError, match=r"GPU 3 does not exist \(NVML reports GPUs 0-1\)"):
        select_gpus("0,3", None, nvml=nvml)
    with pytest.raises(GpuSelectionError, match="two ids name the same GPU"):
        select_gpus(f"0,{fake_uuid(0)}", None, nvml=nvml)
    with pytest.raises(GpuSelectionError, match="no GPUs"):
        select_gpus("0", None, nvml=FakeNvml(gpus=()))
    assert nvml.inits == nvml.shutdowns  # every view closes NVML again


def test_unset_without_nvml_is_cpu_slots_and_refuses_an_unchecked_gpu():
    for absent in (FakeNvml.absent(), FakeNvml(init_error=ERR.DRIVER_NOT_LOADED)):
        assert select_gpus(None, None, nvml=absent) == GpuChoice((), ())  # no warning: a normal machine
        with pytest.raises(GpuSelectionError) as err:
            select_gpus("7", None, nvml=absent)
        assert str(err.value).startswith("--gpu '7': cannot check GPU ids: NVML not available (")
        assert "set CUDA_VISIBLE_DEVICES=7 to name the GPUs this search may use" in str(err.value)


# -- CUDA_VISIBLE_DEVICES set: the job's GPUs -------------------------------------------------

def test_the_jobs_gpus_with_nvml():
    nvml = FakeNvml(gpus=FOUR)
    assert select_gpus(None, "2,3", nvml=nvml) == GpuChoice(("2", "3"), (fake_uuid(2), fake_uuid(3)))
    assert select_gpus("3", "2,3", nvml=nvml).gpus == ("3",)
    assert select_gpus(fake_uuid(3), "2,3", nvml=nvml).gpus == ("3",)  # the job's entry, as written
    with pytest.raises(GpuSelectionError) as err:
        select_gpus("0", "2,3", nvml=nvml)
    assert str(err.value) == ("--gpu '0': GPU 0 is not one this job may use (CUDA_VISIBLE_DEVICES='2,3'); "
                              "pick from 2,3, or omit --gpu to use them all")
    with pytest.raises(GpuSelectionError, match=r"CUDA_VISIBLE_DEVICES='2,7': GPU 7 is not one NVML reports"):
        select_gpus(None, "2,7", nvml=nvml)


def test_the_jobs_gpus_without_nvml_are_used_unchecked_and_bound_gpu():
    absent = FakeNvml.absent()
    assert select_gpus(None, "2,3", nvml=absent) == GpuChoice(("2", "3"), (None, None))
    assert select_gpus("3", "2,3", nvml=absent).gpus == ("3",)
    with pytest.raises(GpuSelectionError, match=r"--gpu '0': GPU 0 is not one this job may use"):
        select_gpus("0", "2,3", nvml=absent)


def test_uuid_and_mig_entries_reach_the_trial_as_written():
    nvml = FakeNvml(gpus=FOUR, migs={MIG: 1})
    visible = f"{fake_uuid(2)},{MIG}"
    choice = select_gpus(None, visible, nvml=nvml)
    assert choice == GpuChoice((fake_uuid(2), MIG), (fake_uuid(2), MIG))
    assert select_gpus("2", visible, nvml=nvml).gpus == (fake_uuid(2),)  # index 2 is that UUID


def test_an_empty_list_means_no_gpu():
    for visible in ("", "-1"):
        assert select_gpus(None, visible, nvml=FakeNvml()) == GpuChoice((), ())
        with pytest.raises(GpuSelectionError, match=f"CUDA_VISIBLE_DEVICES={visible!r} gives this job no GPU"):
            select_gpus("0", visible, nvml=FakeNvml())


# -- NVML failing: one warning, never a traceback -----------------------------------------------

@pytest.mark.parametrize("nvml, says", [
    (FakeNvml(init_error=ERR.NO_PERMISSION), "Insufficient Permissions (NVMLError_NoPermission)"),
    (FakeNvml(init_error=ERR.LIB_RM_VERSION_MISMATCH), "RM has detected an NVML/RM version mismatch. "
                                                       "(NVMLError_LibRmVersionMismatch)"),
    (FakeNvml(init_error=ERR.UNKNOWN), "Unknown Error (NVMLError_Unknown)"),
    (FakeNvml(gpus=FOUR, denied={1}), "Insufficient Permissions (NVMLError_NoPermission)"),  # counted, then denied
], ids=["no-permission", "mismatch", "unknown", "denied-handle"])
def test_a_failing_nvml_is_one_warning_and_the_jobs_gpus(nvml, says):
    cpu = select_gpus(None, None, nvml=nvml)
    assert cpu.gpus == () and cpu.warning == (
        f"WARNING: NVML failed ({says}): cannot tell which GPUs to use, so the trials run on CPU slots; "
        "set CUDA_VISIBLE_DEVICES to the GPUs to use, or fix NVML")
    job = select_gpus(None, "2,3", nvml=nvml)
    assert job.gpus == ("2", "3") and job.uuids == (None, None)
    assert job.warning == (f"WARNING: NVML failed ({says}): using the GPUs CUDA_VISIBLE_DEVICES names (2,3) "
                           "without checking them; GPU telemetry may be off")
    assert select_gpus("3", "2,3", nvml=nvml).gpus == ("3",)
    with pytest.raises(GpuSelectionError, match=r"--gpu '0': cannot check GPU ids: NVML failed \("):
        select_gpus("0", None, nvml=nvml)


def test_detect_and_gpu_uuid_never_raise():
    view = detect_gpus(nvml=FakeNvml(gpus=FOUR, denied={2}))
    assert view.gpus is None and not view.problem.absent
    assert detect_gpus(nvml=FakeNvml.absent()).problem.absent
    working = detect_gpus(nvml=FakeNvml())
    assert [g.uuid for g in working.gpus] == [fake_uuid(0), fake_uuid(1)] and working.driver == "580.95.05"
    assert gpu_uuid("1", nvml=FakeNvml()) == fake_uuid(1)
    assert gpu_uuid(MIG, nvml=FakeNvml(migs={MIG: 0})) == MIG
    assert gpu_uuid("9", nvml=FakeNvml()) is None and gpu_uuid("0", nvml=FakeNvml.absent()) is None


# -- settings, slots, lock files, trials, the CLI --------------------------------------------------

def settings(toy, monkeypatch, visible, **options):
    if visible is None:
        monkeypatch.delenv("CUDA_VISIBLE_DEVICES", raising=False)
    else:
        monkeypatch.setenv("CUDA_VISIBLE_DEVICES", visible)
    return resolve_settings(cwd=str(toy), output_dir="out", **options)


def test_settings_give_each_slot_its_uuid_and_name_locks_by_it(toy, monkeypatch):
    install_nvml(monkeypatch, FakeNvml(gpus=FOUR))
    s = settings(toy, monkeypatch, "3,1", trials_per_gpu=2, cpu_slots=5)
    assert [(x.gpu, x.ordinal, x.uuid) for x in s.slots] == [
        ("3", 0, fake_uuid(3)), ("1", 0, fake_uuid(1)), ("3", 1, fake_uuid(3)), ("1", 1, fake_uuid(1))]
    assert s.slots[0].lock_name == f"gpu-{fake_uuid(3)}.0.lock" and s.gpu_warning is None
    assert s.run.slots[0] == {"index": 0, "gpu": "3", "ordinal": 0, "uuid": fake_uuid(3)}
    assert settings(toy, monkeypatch, None).slots[1].gpu == "1"  # unset: every NVML GPU
    install_nvml(monkeypatch, FakeNvml(init_error=ERR.NO_PERMISSION))
    failing = settings(toy, monkeypatch, None, cpu_slots=3)
    assert [x.gpu for x in failing.slots] == [None] * 3 and failing.gpu_warning.startswith("WARNING: NVML failed")
    assert Slot(index=0, gpu=MIG.replace("MIG-", "MIG-GPU-") + "/1/0").lock_name.count("/") == 0


def test_a_trial_gets_its_slots_entry_exactly_as_written(tmp_path):
    script = tmp_path / "train.py"
    script.write_text("import os\nopen('seen', 'w').write(os.environ['CUDA_VISIBLE_DEVICES'])\n"
                      "open(os.environ['AUTOFINETUNE_RESULT_FILE'], 'w').write('1')\n")
    for gpu in (MIG, "3", None):
        spec = TrialSpec(round=0, candidate=0, params={}, flags=[], python=PYTHON, script=str(script),
                         cwd=str(tmp_path), saved_params_dir=str(tmp_path / "model"),
                         log_path=str(tmp_path / "log"), result_path=str(tmp_path / "result"),
                         pid_path=str(tmp_path / "pid"))
        record = run_trial(spec, Slot(index=0, gpu=gpu, uuid=gpu and "GPU-x"), stop=threading.Event())
        assert record["outcome"] == "ok" and (tmp_path / "seen").read_text() == (gpu or "")
        assert record["gpu"] == gpu and record["gpu_uuid"] == (gpu and "GPU-x")


@pytest.mark.parametrize("nvml, visible, args, says", [
    (None, None, ["--gpu", "7"], "--gpu '7': cannot check GPU ids: NVML not available ("),
    (FakeNvml(init_error=ERR.LIB_RM_VERSION_MISMATCH), None, ["--gpu", "0"],
     "--gpu '0': cannot check GPU ids: NVML failed (RM has detected an NVML/RM version mismatch."),
    (FakeNvml(gpus=FOUR), "2,3", ["--gpu", "0"], "--gpu '0': GPU 0 is not one this job may use"),
    (None, "", ["--gpu", "0"], "--gpu '0': CUDA_VISIBLE_DEVICES='' gives this job no GPU"),
], ids=["no-nvml", "failing-nvml", "not-the-jobs", "no-gpu"])
def test_cli_refuses_a_gpu_it_cannot_use_in_one_line(toy, monkeypatch, capsys, nvml, visible, args, says):
    monkeypatch.chdir(toy)
    if nvml is not None:
        install_nvml(monkeypatch, nvml)
    if visible is None:
        monkeypatch.delenv("CUDA_VISIBLE_DEVICES")
    else:
        monkeypatch.setenv("CUDA_VISIBLE_DEVICES", visible)
    before = sorted(p.name for p in toy.iterdir())
    assert main(["train.py", "--cpu-slots", "2", *args]) == 2
    err = capsys.readouterr().err
    assert err.startswith(f"autofinetune: error: {says}") and err.count("\n") == 1
    assert sorted(p.name for p in toy.iterdir()) == before


def test_a_dask_worker_locks_its_own_gpu_by_uuid(monkeypatch, lock_dir):
    """A trial on a Dask worker uses the worker's CUDA_VISIBLE_DEVICES, locked by NVML UUID."""
    import distributed

    from runtime.cluster import WorkerPlacement

    monkeypatch.setattr(distributed, "get_worker", lambda: type("W", (), {"address": "tcp://127.0.0.1:9"})())
    install_nvml(monkeypatch, FakeNvml(gpus=FOUR))
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "3,1")
    with WorkerPlacement(trials_per_gpu=2).acquire() as slot:
        assert (slot.gpu, slot.uuid, slot.worker) == ("3,1", fake_uuid(3), "tcp://127.0.0.1:9")
        assert (lock_dir / f"gpu-{fake_uuid(3)}.0.lock").exists()
    install_nvml(monkeypatch, FakeNvml.absent())
    with WorkerPlacement().acquire() as slot:  # no NVML on the worker: locked by the id
        assert slot.uuid is None and slot.lock_name == "gpu-3.0.lock"
