"""Atomic writes: a kill at any instant leaves either the old file or the new one.

Write a temporary file beside the target, fsync it, rename it over the target, fsync the
folder. Every file that another step reads back (``state.json``, ``trial-<i>.json``,
``log_file.txt``) is written this way.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

__all__ = ["write_json_atomic", "write_text_atomic", "read_json", "fsync_dir"]


def write_text_atomic(path: Path, text: str) -> None:
    path = Path(path)
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    try:
        with open(tmp, "w", encoding="utf-8") as f:
            f.write(text)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException as exc:  # e.g. a full disk: the old file stays, and no half-written temporary
        tmp.unlink(missing_ok=True)
        if isinstance(exc, OSError) and exc.filename is None:
            exc.filename = str(path)  # a failed write() names no file; the user needs to know which
        raise
    fsync_dir(path.parent)


def write_json_atomic(path: Path, obj: Any) -> None:
    """Write ``obj`` as JSON (NaN refused) to ``path`` atomically."""
    write_text_atomic(path, json.dumps(obj, indent=1, allow_nan=False) + "\n")


def fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def read_json(path: Path) -> Any | None:
    """The parsed JSON in ``path``, or None when the file does not exist."""
    try:
        with open(path, encoding="utf-8") as f:
            return json.load(f)
    except FileNotFoundError:
        return None
