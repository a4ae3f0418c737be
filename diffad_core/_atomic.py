"""Atomic file writes: a temporary file in the target folder, then ``os.replace``; and atomic
folder replacement (a staged folder swapped in by renames).

A crash leaves either the old file or folder or the new one, never half of one; what a killed
writer leaves behind (``.<name>.<random>.tmp``) is removed by ``remove_stale_temporaries``
once the folder's owner holds its lock (``diffad_core.locks``).
"""

from __future__ import annotations

import contextlib
import os
import secrets
import shutil
import tempfile
from collections.abc import Callable
from pathlib import Path


_TMP_SUFFIX = ".tmp"


def atomic_write(path: Path, write: Callable[[Path], None]) -> None:
    """Call ``write(tmp)`` on a temporary path beside ``path``, then rename it onto ``path``."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=_TMP_SUFFIX, dir=path.parent)
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


def staging_dir(parent: Path, prefix: str) -> Path:
    """A new, uniquely named folder in ``parent`` to build a folder in before ``replace_dir``.
    Unlike ``tempfile.mkdtemp`` (always 0700) it gets the umask's permissions, so the finished
    folder is as readable as any other in a shared ``DIFFAD_HOME``."""
    parent = Path(parent)
    parent.mkdir(parents=True, exist_ok=True)
    while True:
        path = parent / f"{prefix}{secrets.token_hex(4)}"
        try:
            path.mkdir(mode=0o777)
        except FileExistsError:
            continue
        return path


def remove_stale_temporaries(folder: Path) -> list[Path]:
    """Delete what writers killed mid-write leave directly in ``folder``: ``atomic_write``'s
    ``.<name>.<random>.tmp`` files and the hidden ``.tmp-*`` staging / ``.old-*`` folders of a
    folder swap (``replace_dir``); returns them. Call it only while holding the folder's lock:
    a live writer's temporaries would go too."""
    folder = Path(folder)
    if not folder.is_dir():
        return []
    removed = []
    for path in sorted(folder.glob(".*")):
        if path.is_symlink():
            continue
        if path.is_file() and path.name.endswith(_TMP_SUFFIX):
            with contextlib.suppress(FileNotFoundError):
                path.unlink()
                removed.append(path)
        elif path.is_dir() and path.name.startswith((".tmp-", ".old-")):
            shutil.rmtree(path, ignore_errors=True)
            removed.append(path)
    return removed
