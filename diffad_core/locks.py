"""Advisory file locks (``fcntl.flock``) on a run id and on a checkpoint folder.

A lock is held by an open file: the kernel drops it when its process ends, however it ends
(kill -9 included), so a lock is never stale. The lock file holds one line saying who holds it
(pid, host, command, since when), which the second process quotes. The file itself stays
after release (deleting lock files races with a process that has just opened one).
"""

from __future__ import annotations

import contextlib
import datetime as dt
import fcntl
import logging
import os
import socket
import sys
from collections.abc import Iterator
from pathlib import Path

_log = logging.getLogger(__name__)
_HELD: set[Path] = set()  # lock files this process holds


class LockBusy(RuntimeError):
    """Another live process holds the lock (the message names it and the lock file)."""


def _holder_line() -> str:
    since = dt.datetime.now(dt.timezone.utc).strftime("%Y-%m-%d %H:%M:%S UTC")
    command = " ".join([Path(sys.argv[0]).name, *sys.argv[1:]])[:200] if sys.argv else "python"
    return f"pid {os.getpid()} on {socket.gethostname()} ({command}) since {since}"


def _read_holder(fd: int) -> str:
    try:
        text = os.pread(fd, 1024, 0).decode(errors="replace").strip()
    except OSError:
        text = ""
    return text or "another process"


@contextlib.contextmanager
def file_lock(path: Path, what: str, *, wait: bool) -> Iterator[None]:
    """Hold an exclusive lock on the file ``path`` (created if needed) for the ``with`` block.

    Held elsewhere: ``wait=False`` raises :class:`LockBusy` at once; ``wait=True`` logs one line
    naming the holder and blocks until it is released. ``what`` names the locked thing in both.
    Re-entrant within a process (flock would otherwise block on its own second open).
    """
    path = Path(path).absolute()
    if path in _HELD:  # this process holds it already (the CLI around its own flow): re-enter
        yield
        return
    path.parent.mkdir(parents=True, exist_ok=True)
    fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o666)
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = _read_holder(fd)
            if not wait:
                raise LockBusy(f"{what} is in use by {holder} (lock file {path})") from None
            _log.warning("waiting for %s: in use by %s (lock file %s)", what, holder, path)
            fcntl.flock(fd, fcntl.LOCK_EX)
        os.ftruncate(fd, 0)
        os.pwrite(fd, (_holder_line() + "\n").encode(), 0)
        _HELD.add(path)
        try:
            yield
        finally:
            _HELD.discard(path)
    finally:
        os.close(fd)  # releases the lock


__all__ = ["LockBusy", "file_lock"]
