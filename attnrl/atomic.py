"""Files that are whole or absent: a reader (or a resumed run) never sees half of one.

    write_text(path, text)     through PATH.tmp and a rename
    write_json(path, data)     the same for JSON (indent 1; non-JSON values as str)
    fsync_dir(path)            flush a directory's entries (after a rename into it)
"""

from __future__ import annotations

import json
import os
from pathlib import Path


def write_text(path, text: str) -> None:
    """Write `text` to PATH.tmp, then rename it over PATH (atomic on one file system)."""
    path = Path(path)
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(text)
    os.replace(tmp, path)


def write_json(path, data) -> None:
    write_text(path, json.dumps(data, indent=1, default=str))


def fsync_dir(path) -> None:
    """fsync a directory, so the names renamed into it survive a crash of the machine."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)
