"""What the pipeline holds and checks around a benchmark (issue #10; README "When things go
wrong"): the preflight (seconds, one line naming the path or URI), the run lock, and a
temporary Prefect server tied to this process's life.

The run lock (``results/.<run_id>.lock``, ``diffad_core.locks``) makes a second benchmark with
the same run id refuse at once, naming the process that holds it; its holder then clears what
killed writers left in the run folder. Prefect's temporary server is a child process that
Prefect stops only at a normal exit (``atexit``): ``temporary_prefect_server`` starts that same
server itself (Prefect's flows reuse it) and adds a guard process that stops it as soon as
this process is gone, kill -9 included.
"""

from __future__ import annotations

import contextlib
import os
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

from diffad_core._atomic import remove_stale_temporaries
from diffad_core.config import ConfigError, require_home
from diffad_core.locks import LockBusy, file_lock
from tasks import tracking
from tasks.runs import run_dir


def preflight(timeout: float = 5.0) -> None:
    """Check, before any work, that DIFFAD_HOME is a writable folder, that the MLflow store
    answers and is writable, and (when ``PREFECT_API_URL`` is set) that Prefect's API answers;
    a :class:`ConfigError` naming the path or URL otherwise."""
    require_home()
    tracking.check_store(timeout)
    api = os.environ.get("PREFECT_API_URL")
    problem = tracking.health_problem(api, timeout) if api else None
    if problem is not None:
        raise ConfigError(f"Prefect API {api} {problem}; check PREFECT_API_URL or unset it to use "
                          "a temporary server")


def run_lock_path(run_id: str) -> Path:
    return run_dir(run_id).parent / f".{run_id}.lock"


@contextlib.contextmanager
def run_lock(run_id: str) -> Iterator[None]:
    """Hold run ``run_id`` for the block; refuse at once when another process holds it. Once
    held, the temporaries a killed run left in its folder are removed."""
    try:
        with file_lock(run_lock_path(run_id), f"run {run_id}", wait=False):
            folder = run_dir(run_id)
            for sub in (folder, folder / "status", folder / "scores"):
                remove_stale_temporaries(sub)
            yield
    except LockBusy as exc:
        raise LockBusy(f"{exc}; wait for it to end or use another --run-id") from None


# The guard: waits for EOF on stdin (this process gone, however it ended), then stops the
# server (TERM, then KILL after 5 s), checking first that the pid is still that server.
_GUARD = """
import os, signal, sys, time
pid = int(sys.argv[1])
sys.stdin.buffer.read()
try:
    with open(f"/proc/{pid}/cmdline", "rb") as fh:
        if b"uvicorn" not in fh.read():
            sys.exit(0)
    os.kill(pid, signal.SIGTERM)
    for _ in range(50):
        time.sleep(0.1)
        os.kill(pid, 0)
    os.kill(pid, signal.SIGKILL)
except (OSError, ProcessLookupError):
    pass
"""


# Guards live as long as this process: their stdin pipes must close only when it ends (a
# collected Popen would close its pipe, and the guard would stop the server too early).
_GUARDS: list[subprocess.Popen[bytes]] = []


@contextlib.contextmanager
def temporary_prefect_server() -> Iterator[str | None]:
    """Prefect's temporary server, stopped by Prefect at exit and, through a guard process,
    when this process dies without exiting (yields its API URL). Nothing when
    ``PREFECT_API_URL`` names a server."""
    if os.environ.get("PREFECT_API_URL"):
        yield None
        return
    from prefect.server.api.server import SubprocessASGIServer

    # The instance Prefect's clients use when no API URL is set (prefect.client.orchestration).
    server = SubprocessASGIServer()
    server.start()
    process = server.server_process
    if process is not None and sys.platform.startswith("linux"):
        _GUARDS.append(subprocess.Popen([sys.executable, "-c", _GUARD, str(process.pid)],
                                        stdin=subprocess.PIPE, start_new_session=True))
    # Prefect stops the server at exit (atexit, after its logs are flushed); the guard's pipe
    # closes with this process, however it ends, and the guard then stops what is left.
    yield server.api_url


__all__ = ["preflight", "run_lock", "run_lock_path", "temporary_prefect_server"]
