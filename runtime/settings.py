"""Check a search's inputs before anything runs, and turn them into plain settings.

Both entry points use this: the CLI (bad input: one line, exit 2, nothing created on
disk) and the ``autofinetune`` flow itself (a deployment calls the flow directly).
"""

from __future__ import annotations

import os
import re
import secrets
import shutil
import sys
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path

from runtime.cluster import DaskCluster
from runtime.early_stopping import EarlyStopConfig
from runtime.gpus import select_gpus
from runtime.options import SEED_LIMIT, OptionError, check_all
from runtime.rundir import START_FILES
from runtime.slots import Slot, make_slots
from runtime.state import RunOptions, SearchKey
from tuners import SearchSpace

__all__ = ["SettingsError", "Settings", "resolve_settings", "split_script_and_extras", "fresh_seed"]

_FLAG_NAME = re.compile(r"^[A-Za-z0-9_][A-Za-z0-9_-]*$")
SettingsError = OptionError  # bad input: one line naming the flag or file and the fix


@dataclass(frozen=True)
class Settings:
    output_dir: Path
    space: SearchSpace
    rounds: int
    search: SearchKey  # what a resumed run must match (seed None: draw one when the run starts)
    run: RunOptions  # this invocation's options: script, python, cwd, extras, timeout, retries, ...
    slots: list[Slot]  # local slots; empty when the trials run on a Dask cluster
    cluster: DaskCluster | None = None  # --dask-address / --dask-local
    trials_per_gpu: int = 1
    gpu_warning: str | None = None  # one line for the user at start (NVML failed: ids unchecked)


def split_script_and_extras(words: list[str]) -> tuple[str, list[str]]:
    """The CLI's free words: ``[SCRIPT] [KEY VALUE ...]``. The first word is the script when
    it looks like a path (has a '.' or '/', or names a file); SCRIPT defaults to train.py."""
    if words and ("." in words[0] or "/" in words[0] or os.path.isfile(words[0])):
        return words[0], words[1:]
    return "train.py", list(words)


RESERVED_FLAGS = ("saved_params_dir", "model_path")  # the CLI passes these to every trial


def _parse_extras(words: list[str], searched: tuple[str, ...] = (), param_file: str = "hparam.yaml"
                  ) -> list[list[str]]:
    if len(words) % 2:
        raise SettingsError(
            f"extra arguments must come in KEY VALUE pairs, got {len(words)} words {words!r}; "
            "add the missing value (they are forwarded to the script as --KEY=VALUE)")
    pairs = [[words[j], words[j + 1]] for j in range(0, len(words), 2)]
    for key, _ in pairs:
        if not _FLAG_NAME.match(key):
            raise SettingsError(f"extra argument key {key!r} cannot be a flag name: use letters, "
                                "digits, '_' or '-' without leading dashes (it becomes --KEY=VALUE)")
        if key in searched:
            raise SettingsError(f"extra argument {key!r} names a hyperparameter searched in {param_file}; "
                                f"forwarding it would override the searched value: drop '{key} ...' or "
                                "take it out of the search space")
        if key in RESERVED_FLAGS:
            raise SettingsError(f"extra argument {key!r} is set by autofinetune for every trial "
                                f"(--{key}=<dir>); drop it from the extra arguments")
    return pairs


def resolve_settings(values: dict | None = None, *, started: datetime | None = None,
                     **options) -> Settings:
    """Validate every option (``runtime.options``: a dict and/or keywords); raise SettingsError
    on the first bad one. Creates nothing on disk.

    Without ``output_dir`` the run dir is ``output_<YYYYmmddHHMMSS>`` of ``started`` (default
    now) under ``output_root`` (default the working directory), as the original named it.
    """
    o = check_all({**(values or {}), **options})
    cwd_path = Path(o["cwd"] or os.getcwd()).resolve()
    script_path = cwd_path / o["script"]
    if not script_path.is_file():
        raise SettingsError(f"{o['script']}: no such file (looked in {cwd_path}); pass the training "
                            "script as the first argument, e.g. `python -m flows.autofinetune train.py ...`")
    space = SearchSpace.from_yaml(cwd_path / o["param_file"])  # SearchSpaceError (a ValueError) names the field
    interpreter = o["python"] or sys.executable
    found = shutil.which(interpreter)
    if found is None:
        raise SettingsError(f"--python {interpreter!r}: not an executable file or a command on PATH")
    pairs = _parse_extras(o["extras"], tuple(space.names), o["param_file"])

    gpu = o["gpu"]
    cluster, gpu_warning = None, None
    if o["dask_address"] and o["dask_local"]:
        raise SettingsError("give either --dask-address (an existing cluster) or --dask-local N, not both")
    if o["dask_address"] or o["dask_local"]:
        if gpu is not None and str(gpu).strip() != "":
            raise SettingsError("--gpu picks this host's GPUs; with --dask-address/--dask-local each trial "
                                "uses its worker's CUDA_VISIBLE_DEVICES: drop --gpu")
        cluster = DaskCluster(address=o["dask_address"], local_workers=o["dask_local"])
        slots = []
    else:  # GpuSelectionError is a ValueError; see runtime.gpus for the rules
        choice = select_gpus(gpu, os.environ.get("CUDA_VISIBLE_DEVICES"))
        gpu_warning = choice.warning
        slots = make_slots(list(choice.gpus), uuids=list(choice.uuids), trials_per_gpu=o["trials_per_gpu"],
                           cpu_slots=o["cpu_slots"])

    if o["output_dir"] and o["output_root"]:
        raise SettingsError("give either --output-dir (one run) or output_root (a dated run dir "
                            "under it per run), not both")
    stamp = f"output_{(started or datetime.now()):%Y%m%d%H%M%S}"
    out = cwd_path / (o["output_dir"] or Path(o["output_root"] or ".") / stamp)
    if not o["output_dir"] and not o["output_root"]:  # a new run each time: never another's dir
        n = 2
        while out.exists():
            out, n = cwd_path / f"{stamp}-{n}", n + 1
    if out.exists() and not out.is_dir():
        raise SettingsError(f"--output-dir {out}: exists and is not a directory; choose another path")
    if out.is_dir() and any(p.name not in START_FILES for p in out.iterdir()) \
            and not (out / "state.json").is_file():
        raise SettingsError(f"--output-dir {out}: not empty and not an autofinetune run directory "
                            "(no state.json); choose a new or empty directory")
    search = SearchKey(strategy=o["tuning_strategy"], evaluator=o["evaluator"], popsize=o["popsize"],
                       seed=o["seed"], space=space.to_dict())
    run = RunOptions(script=str(script_path), python=found, cwd=str(cwd_path), extras=pairs,
                     trial_timeout=o["trial_timeout"], trial_retries=o["trial_retries"],
                     pbt_epochs=o["pbt_epochs"], keep_checkpoints=o["keep_checkpoints"],
                     early_stop=EarlyStopConfig(
                         rule=o["early_stop"], min_steps=o["early_stop_min_steps"],
                         reduction_factor=o["early_stop_reduction_factor"],
                         min_resource=o["early_stop_min_resource"], grace_s=o["early_stop_grace"]),
                     slots=[{"index": s.index, "gpu": s.gpu, "ordinal": s.ordinal, "uuid": s.uuid} for s in slots])
    return Settings(output_dir=out, space=space, rounds=o["rounds"], search=search, run=run, slots=slots,
                    cluster=cluster, trials_per_gpu=o["trials_per_gpu"], gpu_warning=gpu_warning)


def fresh_seed() -> int:
    return secrets.randbelow(SEED_LIMIT)
