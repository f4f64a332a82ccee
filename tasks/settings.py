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

from tasks.gpus import detect_gpus, parse_gpu_list
from tasks.slots import Slot, make_slots
from tuners import SearchSpace, TUNER_NAMES

__all__ = ["SettingsError", "Settings", "resolve_settings", "EVALUATORS", "KEEP_CHECKPOINTS",
           "split_script_and_extras", "fresh_seed"]

EVALUATORS = ("fulltrail", "populationbased")
KEEP_CHECKPOINTS = ("all", "needed")
_FLAG_NAME = re.compile(r"^[A-Za-z0-9_][A-Za-z0-9_-]*$")


class SettingsError(ValueError):
    """Bad input to a search: the message is one line naming the flag or file and the fix."""


@dataclass(frozen=True)
class Settings:
    output_dir: Path
    space: SearchSpace
    rounds: int
    search: dict  # what a resumed run must match: strategy, evaluator, popsize, seed, space
    run: dict  # this invocation's options: script, python, cwd, extras, timeout, retries, ...
    slots: list[Slot]


def split_script_and_extras(words: list[str]) -> tuple[str, list[str]]:
    """The CLI's free words: ``[SCRIPT] [KEY VALUE ...]``. The first word is the script when
    it looks like a path (has a '.' or '/', or names a file); SCRIPT defaults to train.py."""
    if words and ("." in words[0] or "/" in words[0] or os.path.isfile(words[0])):
        return words[0], words[1:]
    return "train.py", list(words)


def _parse_extras(words: list[str]) -> list[list[str]]:
    if len(words) % 2:
        raise SettingsError(
            f"extra arguments must come in KEY VALUE pairs, got {len(words)} words {words!r}; "
            "add the missing value (they are forwarded to the script as --KEY=VALUE)")
    pairs = [[words[j], words[j + 1]] for j in range(0, len(words), 2)]
    for key, _ in pairs:
        if not _FLAG_NAME.match(key):
            raise SettingsError(f"extra argument key {key!r} cannot be a flag name: use letters, "
                                "digits, '_' or '-' without leading dashes (it becomes --KEY=VALUE)")
    return pairs


def _choice(value: str, valid: tuple[str, ...], flag: str) -> str:
    lowered = str(value).lower()
    if lowered not in valid:
        raise SettingsError(f"{flag} {value!r} is not one of {', '.join(valid)}")
    return lowered


def _at_least(value, low: int, flag: str) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < low:
        raise SettingsError(f"{flag} must be an integer >= {low}, got {value!r}")
    return value


def resolve_settings(*, script: str = "train.py", param_file: str = "hparam.yaml",
                     gpu: str | None = None, popsize: int = 5, rounds: int = 10,
                     output_dir: str | None = None, evaluator: str = "populationbased",
                     tuning_strategy: str = "pshe2", seed: int | None = None,
                     trial_timeout: float | None = None, trials_per_gpu: int = 1,
                     cpu_slots: int = 1, python: str | None = None,
                     extras: list[str] | None = None, trial_retries: int = 0,
                     pbt_epochs: int = 1, keep_checkpoints: str = "all",
                     cwd: str | None = None, output_root: str | None = None,
                     started: datetime | None = None) -> Settings:
    """Validate every input; raise SettingsError on the first bad one. Creates nothing.

    Without ``output_dir`` the run dir is ``output_<YYYYmmddHHMMSS>`` of ``started`` (default
    now) under ``output_root`` (default the working directory), as the original named it.
    """
    cwd_path = Path(cwd or os.getcwd()).resolve()
    script_path = cwd_path / script
    if not script_path.is_file():
        raise SettingsError(f"{script}: no such file (looked in {cwd_path}); pass the training "
                            "script as the first argument, e.g. `python -m flows.autofinetune train.py ...`")
    param_path = cwd_path / param_file
    space = SearchSpace.from_yaml(param_path)  # raises SearchSpaceError (a ValueError) naming the field
    popsize = _at_least(popsize, 1, "--popsize")
    rounds = _at_least(rounds, 1, "--round")
    trials_per_gpu = _at_least(trials_per_gpu, 1, "--trials-per-gpu")
    cpu_slots = _at_least(cpu_slots, 1, "--cpu-slots")
    trial_retries = _at_least(trial_retries, 0, "--trial-retries")
    pbt_epochs = _at_least(pbt_epochs, 0, "--pbt-epochs")
    evaluator = _choice(evaluator, EVALUATORS, "--evaluator")
    strategy = _choice(tuning_strategy, tuple(TUNER_NAMES), "--tuning-strategy")
    keep_checkpoints = _choice(keep_checkpoints, KEEP_CHECKPOINTS, "--keep-checkpoints")
    if trial_timeout is not None and not (trial_timeout > 0):
        raise SettingsError(f"--trial-timeout must be a positive number of seconds, got {trial_timeout!r}")
    if seed is not None and (isinstance(seed, bool) or not isinstance(seed, int) or not 0 <= seed < 2**32):
        raise SettingsError(f"--seed must be an integer in [0, 2**32), got {seed!r}")
    interpreter = python or sys.executable
    found = shutil.which(interpreter)
    if found is None:
        raise SettingsError(f"--python {interpreter!r}: not an executable file or a command on PATH")
    pairs = _parse_extras(list(extras or []))

    if gpu is not None and str(gpu).strip() != "":
        gpus = parse_gpu_list(str(gpu), detect_gpus())  # GpuSelectionError is a ValueError
    else:
        detected = detect_gpus()
        gpus = [str(g.index) for g in detected] if detected else None
    slots = make_slots(gpus, trials_per_gpu=trials_per_gpu, cpu_slots=cpu_slots)

    if output_dir and output_root:
        raise SettingsError("give either --output-dir (one run) or output_root (a dated run dir "
                            "under it per run), not both")
    stamp = f"output_{(started or datetime.now()):%Y%m%d%H%M%S}"
    out = cwd_path / (output_dir or Path(output_root or ".") / stamp)
    if out.exists() and not out.is_dir():
        raise SettingsError(f"--output-dir {out}: exists and is not a directory; choose another path")
    if out.is_dir() and any(out.iterdir()) and not (out / "state.json").is_file():
        raise SettingsError(f"--output-dir {out}: not empty and not an autofinetune run directory "
                            "(no state.json); choose a new or empty directory")
    search = {"strategy": strategy, "evaluator": evaluator, "popsize": popsize, "seed": seed,
              "space": space.to_dict()}
    run = {"script": str(script_path), "python": found, "cwd": str(cwd_path), "extras": pairs,
           "trial_timeout": trial_timeout, "trial_retries": trial_retries,
           "pbt_epochs": pbt_epochs, "keep_checkpoints": keep_checkpoints,
           "slots": [{"index": s.index, "gpu": s.gpu, "ordinal": s.ordinal} for s in slots]}
    return Settings(output_dir=out, space=space, rounds=rounds, search=search, run=run, slots=slots)


def fresh_seed() -> int:
    return secrets.randbelow(2**31)
