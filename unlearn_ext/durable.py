"""Durable file writes: what survives a crash or power loss (docs/design.md §10).

A rename or a new file is durable only once its directory is fsync'd; file contents only once the
file is. Used by the ledger (atomic replace of its state) and the history file (creation).
"""
from __future__ import annotations

import os


def fsync_dir(path: str) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def atomic_write(path: str, write) -> None:
    """Writes a file through `write(f)` so that readers see the old or the new content, never a
    mix: write a temporary file, fsync it, rename it over `path`, fsync the directory."""
    tmp = path + ".tmp"
    with open(tmp, "wb") as f:
        write(f)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)
    fsync_dir(os.path.dirname(os.path.abspath(path)))
