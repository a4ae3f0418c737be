"""Atomic file writes: a temporary file in the target folder, then ``os.replace``; and atomic
folder replacement (a staged folder swapped in by renames).

A crash leaves either the old file or folder or the new one, never half of one.
"""

from __future__ import annotations

import contextlib
import os
import secrets
import shutil
import tempfile
from collections.abc import Callable
from pathlib import Path


def atomic_write(path: Path, write: Callable[[Path], None]) -> None:
    """Call ``write(tmp)`` on a temporary path beside ``path``, then rename it onto ``path``."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    os.close(fd)
    try:
        write(Path(tmp))
        os.chmod(tmp, 0o644)  # mkstemp creates 0600
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
        raise


def atomic_write_text(path: Path, text: str) -> None:
    atomic_write(path, lambda p: p.write_text(text))


def replace_dir(staging: Path, final: Path) -> None:
    """Put the finished folder ``staging`` at ``final`` (same parent) by two renames: an existing
    ``final`` first moves aside to the hidden ``.old-<name>-<hex>``, is put back if the second
    rename fails, and is deleted only once the new folder is in place. Readers see the old folder
    or the new one, never a mix."""
    old = final.parent / f".old-{final.name}-{secrets.token_hex(4)}"
    if final.exists():
        os.replace(final, old)
    try:
        os.replace(staging, final)
    except BaseException:
        if old.exists() and not final.exists():
            os.replace(old, final)
        raise
    shutil.rmtree(old, ignore_errors=True)
