"""Files written and checked safely: atomic writes and content hashes.

An atomic write leaves a reader the old file or the whole new one, never half of it.
The text goes to a temporary file in the same directory, is flushed and fsynced, then renamed
over the target (`os.replace`, atomic on POSIX); an error or interruption removes the temporary
file and leaves the previous one intact. deepspec's run files and data_tools' outputs both write
through here, and both hash files with `file_sha256` (cache shards, drafter weights).
"""

from __future__ import annotations

import hashlib
import os
import tempfile
from collections.abc import Callable
from pathlib import Path
from typing import TextIO


def atomic_write_via(path: str | os.PathLike, write: Callable[[TextIO], None]) -> None:
    """Create `path` (and its parent folders) from what `write(file)` writes, atomically."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "w", encoding="utf-8", newline="\n") as f:
            write(f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        try:
            os.unlink(tmp)
        except FileNotFoundError:
            pass
        raise


def atomic_write_text(path: str | os.PathLike, text: str) -> None:
    """Write `text` (UTF-8) to `path` atomically, creating parent folders."""
    atomic_write_via(path, lambda f: f.write(text))


def file_sha256(path: str | os.PathLike) -> str:
    """sha256 of a file's bytes (hex), read in 4 MiB chunks."""
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 22), b""):
            h.update(chunk)
    return h.hexdigest()
