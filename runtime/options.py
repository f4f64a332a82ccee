"""Every option of a search, declared once: name, CLI spellings, type, default, help, check.

The CLI's argparse parser (``flows.cli``), settings resolution (``runtime.settings``) and the
``autofinetune`` flow's parameters are derived from ``OPTIONS``; a unit test holds the flow's
signature (which Prefect reads from the source for deployments) to this list.

A check takes the value as given (from argparse, a flow parameter or a deployment's
parameters) and returns it normalized, or raises ``OptionError`` with one line naming the
flag and the fix.
"""

from __future__ import annotations

import argparse
import re
from dataclasses import dataclass
from typing import Any, Callable

from runtime.early_stopping import EARLY_STOP_RULES
from tuners import TUNER_NAMES

__all__ = ["Option", "OptionError", "OPTIONS", "OPTION_NAMES", "SEED_LIMIT", "EVALUATORS",
           "KEEP_CHECKPOINTS", "defaults", "add_arguments", "check_all"]

SEED_LIMIT = 2**32  # seeds are integers in [0, SEED_LIMIT): what --seed accepts and what a fresh seed is drawn from
EVALUATORS = ("fulltrail", "populationbased")
KEEP_CHECKPOINTS = ("all", "needed")


class OptionError(ValueError):
    """A bad option value: the message is one line naming the flag and the fix."""


@dataclass(frozen=True)
class Option:
    name: str  # the flow parameter and settings key
    flags: tuple[str, ...]  # CLI spellings, ours first, then the original's; () = not a flag
    default: Any
    help: str
    type: Callable[[str], Any] = str  # how argparse converts the word
    metavar: str | None = None
    check: Callable[[Any, str], Any] | None = None  # (value, flag) -> normalized value

    @property
    def flag(self) -> str:
        """How errors name it: the CLI flag, or the flow parameter's name."""
        return self.flags[0] if self.flags else self.name


def _int_at_least(low: int) -> Callable[[Any, str], int]:
    def check(value: Any, flag: str) -> int:
        if isinstance(value, bool) or not isinstance(value, int) or value < low:
            raise OptionError(f"{flag} must be an integer >= {low}, got {value!r}")
        return value
    return check


def _one_of(valid: tuple[str, ...]) -> Callable[[Any, str], str]:
    def check(value: Any, flag: str) -> str:
        lowered = str(value).lower()
        if lowered not in valid:
            raise OptionError(f"{flag} {value!r} is not one of {', '.join(valid)}")
        return lowered
    return check


def _seed(value: Any, flag: str) -> int | None:
    if value is not None and (isinstance(value, bool) or not isinstance(value, int)
                              or not 0 <= value < SEED_LIMIT):
        raise OptionError(f"{flag} must be an integer in [0, 2**32), got {value!r}")
    return value


def _timeout(value: Any, flag: str) -> float | None:
    if value is not None and (isinstance(value, bool) or not isinstance(value, (int, float)) or not value > 0
                              or value == float("inf")):
        raise OptionError(f"{flag} must be a positive number of seconds, got {value!r}")
    return value


def _seconds(value: Any, flag: str) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not 0 <= value < float("inf"):
        raise OptionError(f"{flag} must be a number of seconds >= 0, got {value!r}")
    return value


def _optional_text(value: Any, flag: str) -> str | None:
    if value is not None and not isinstance(value, str):
        raise OptionError(f"{flag} must be text, got {value!r}")
    return value if value else None


def _dask_address(value: Any, flag: str) -> str | None:
    if value is None or value == "":
        return None
    if not isinstance(value, str) or not re.match(r"^(tcp|tls|ucx)://[^\s/]+:\d+$", value):
        raise OptionError(f"{flag} {value!r} is not a Dask scheduler address; give it as "
                          "tcp://HOST:PORT (or tls://...), as `dask scheduler` prints it")
    return value


def _optional_int_at_least(low: int) -> Callable[[Any, str], int | None]:
    check = _int_at_least(low)
    return lambda value, flag: None if value is None else check(value, flag)


def _extras(value: Any, flag: str) -> list[str]:
    if value is None:
        return []
    if not isinstance(value, (list, tuple)) or not all(isinstance(w, str) for w in value):
        raise OptionError(f"{flag} must be a list of words KEY VALUE ..., got {value!r}")
    return list(value)


OPTIONS: tuple[Option, ...] = (
    Option("script", (), "train.py", "the training script, relative to cwd (CLI: the first word)"),
    Option("param_file", ("--param-file", "--param_file"), "hparam.yaml",
           "the search space YAML (default hparam.yaml)"),
    Option("gpu", ("--gpu",), None,
           "comma-separated GPU ids: indices (0,1) or GPU-/MIG- UUIDs (default: the entries of "
           "CUDA_VISIBLE_DEVICES, else every GPU NVML sees; CPU slots when there is none)"),
    Option("popsize", ("--popsize",), 5, "candidates per round (default 5)", int, "N", _int_at_least(1)),
    Option("rounds", ("--round",), 10, "rounds (default 10)", int, "N", _int_at_least(1)),
    Option("output_dir", ("--output-dir", "--output_dir"), None,
           "run directory (default output_<YYYYmmddHHMMSS>); an existing one is resumed",
           check=_optional_text),
    Option("evaluator", ("--evaluator",), "populationbased",
           f"{' | '.join(EVALUATORS)} (default populationbased)", check=_one_of(EVALUATORS)),
    Option("tuning_strategy", ("--tuning-strategy", "--tuning_strategy"), "hazero",
           f"{' | '.join(TUNER_NAMES)} (default hazero)", check=_one_of(TUNER_NAMES)),
    Option("seed", ("--seed",), None, "random seed of the tuner (default: a fresh one, recorded in state.json)",
           int, "N", _seed),
    Option("trial_timeout", ("--trial-timeout",), None,
           "kill a trial's whole process group after S seconds (default: no limit)", float, "S", _timeout),
    Option("trials_per_gpu", ("--trials-per-gpu",), 1, "trials that share one GPU (default 1)", int, "K",
           _int_at_least(1)),
    Option("cpu_slots", ("--cpu-slots",), 1, "parallel trials when there is no GPU (default 1)", int, "N",
           _int_at_least(1)),
    Option("python", ("--python",), None,
           "interpreter that runs the script (default: the one running this CLI)", check=_optional_text),
    Option("trial_retries", ("--trial-retries",), 0,
           "re-run a trial whose process failed to start or was killed by a signal (default 0)", int, "N",
           _int_at_least(0)),
    Option("pbt_epochs", ("--pbt-epochs",), 1,
           "populationbased: --epochs=N for trials that continue from a parent (default 1, as the "
           "original; 0 passes nothing; a forwarded epochs extra wins)", int, "N", _int_at_least(0)),
    Option("keep_checkpoints", ("--keep-checkpoints",), "all",
           f"{' | '.join(KEEP_CHECKPOINTS)}: 'needed' deletes model dirs that are neither a live parent "
           "nor best_model (default all, as the original)", check=_one_of(KEEP_CHECKPOINTS)),
    Option("early_stop", ("--early-stop",), "off",
           f"{' | '.join(EARLY_STOP_RULES)}: stop hopeless trials early from the scores they report with "
           "report_intermediate (default off, as the original)", check=_one_of(EARLY_STOP_RULES)),
    Option("early_stop_min_steps", ("--early-stop-min-steps",), 1,
           "no trial is stopped at a reported step below N (default 1)", int, "N", _int_at_least(0)),
    Option("early_stop_reduction_factor", ("--early-stop-reduction-factor",), 3,
           "asha: the top 1/N of the values at a rung go on to the next (default 3)", int, "N",
           _int_at_least(2)),
    Option("early_stop_min_resource", ("--early-stop-min-resource",), 1,
           "asha: the first rung's step; rungs at N*factor^j (default 1)", int, "N", _int_at_least(1)),
    Option("early_stop_grace", ("--early-stop-grace",), 30.0,
           "seconds a stopped trial has to exit after should_stop() turns true, before its process group "
           "gets SIGTERM (default 30)", float, "S", _seconds),
    Option("dask_address", ("--dask-address",), None,
           "run the trials on the Dask cluster whose scheduler is at tcp://HOST:PORT, one trial per "
           "worker GPU (or per 'slot' resource, or per worker thread)", metavar="ADDR", check=_dask_address),
    Option("dask_local", ("--dask-local",), None,
           "run the trials on a local Dask cluster of N single-thread worker processes (127.0.0.1)",
           int, "N", _optional_int_at_least(1)),
    Option("extras", (), None, "KEY VALUE words forwarded to every trial as --KEY=VALUE "
           "(CLI: the words after SCRIPT)", check=_extras),
    Option("cwd", (), None, "directory the script, param file and output dir are relative to "
           "(default: the current one)", check=_optional_text),
    Option("output_root", (), None, "scheduled runs: each run writes output_<YYYYmmddHHMMSS> under it, "
           "dated by its schedule slot (instead of output_dir)", check=_optional_text),
)
OPTION_NAMES = tuple(o.name for o in OPTIONS)


def defaults() -> dict[str, Any]:
    return {o.name: o.default for o in OPTIONS}


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """One argparse argument per option (values are checked later, by ``check_all``)."""
    for o in OPTIONS:
        if not o.flags:
            continue
        parser.add_argument(*o.flags, dest=o.name, default=o.default, type=o.type, metavar=o.metavar,
                            help=o.help)


def check_all(values: dict[str, Any]) -> dict[str, Any]:
    """Every option's value checked and normalized (missing ones take their defaults)."""
    unknown = sorted(set(values) - set(OPTION_NAMES))
    if unknown:
        raise OptionError(f"unknown option(s) {', '.join(unknown)}; known: {', '.join(OPTION_NAMES)}")
    out = defaults()
    out.update(values)
    for o in OPTIONS:
        if o.check is not None:
            out[o.name] = o.check(out[o.name], o.flag)
    return out
