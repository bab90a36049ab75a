"""Crash-safe file publication: write under a temporary name, fsync, rename, fsync the folder.

A reader sees either the old file or the complete new one; a process killed at any moment leaves
at most a stray temporary file, which writers clean up and validate reports.
"""

from __future__ import annotations

import os
import uuid
from pathlib import Path

TMP_MARK = ".tmp-"


def temp_path_for(final: Path) -> Path:
    return final.with_name(f"{TMP_MARK}{uuid.uuid4().hex[:8]}-{final.name}")


def fsync_path(path: Path) -> None:
    """fsync a file's data, or a folder's entries (a rename is durable only once its folder is)."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def publish(tmp: Path, final: Path) -> None:
    """fsync a finished temporary file and atomically give it its final name."""
    fsync_path(tmp)
    os.replace(tmp, final)
    fsync_path(final.parent)


def atomic_write_bytes(final: Path, data: bytes) -> None:
    final = Path(final)
    tmp = temp_path_for(final)
    with open(tmp, "wb") as fh:
        fh.write(data)
    publish(tmp, final)


def is_temp(path: Path) -> bool:
    return path.name.startswith(TMP_MARK)
