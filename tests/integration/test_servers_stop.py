"""The ``servers`` fixture's teardown (tests/integration/servers.py): every process it started is
told to stop before any is waited for, and their grace periods run together, so processes that
ignore SIGTERM cost one grace period, not one each."""

from __future__ import annotations

import sys
import time
from pathlib import Path

import pytest

from tests.integration import servers as servers_module
from tests.integration.servers import Servers

pytestmark = pytest.mark.integration

# On SIGTERM: write its marker file; exit cleanly once the other process's marker exists (so it
# can only exit before the kill timeout if the other process was told to stop too).
_WAITS_FOR_OTHER = """
import pathlib, signal, sys, time
mine, other = pathlib.Path(sys.argv[1]), pathlib.Path(sys.argv[2])
def on_term(*_):
    mine.write_text("term")
    while not other.exists():
        time.sleep(0.05)
    sys.exit(0)
signal.signal(signal.SIGTERM, on_term)
print("ready", flush=True)
while True:
    time.sleep(0.1)
"""


def test_every_process_gets_sigterm_before_any_is_waited_for(tmp_path: Path) -> None:
    servers = Servers(tmp_path)
    first, second = tmp_path / "first.term", tmp_path / "second.term"
    procs = [servers.process([sys.executable, "-c", _WAITS_FOR_OTHER, str(a), str(b)], {}, f"{name}.log")
             for name, a, b in (("first", first, second), ("second", second, first))]
    for name in ("first", "second"):
        log = tmp_path / f"{name}.log"
        while "ready" not in (log.read_text() if log.exists() else ""):
            assert all(p.poll() is None for p in procs), log.read_text()
            time.sleep(0.05)
    servers.stop_all()
    # Both exited by themselves (0), not by SIGKILL after the timeout (-9).
    assert [p.returncode for p in procs] == [0, 0]
    assert first.exists() and second.exists()


def test_processes_that_ignore_sigterm_share_one_grace_period(tmp_path: Path,
                                                              monkeypatch: pytest.MonkeyPatch) -> None:
    """Three processes that never exit on SIGTERM (as Prefect workers sometimes do after running
    flows) are killed after one grace period in all (about 2 s here), not one each (6 s)."""
    monkeypatch.setattr(servers_module, "_STOP_SECONDS", 2)
    servers = Servers(tmp_path)
    ignore = "import signal, time; signal.signal(signal.SIGTERM, signal.SIG_IGN); print('ready', flush=True); time.sleep(600)"
    procs = [servers.process([sys.executable, "-c", ignore], {}, f"p{i}.log") for i in range(3)]
    for i in range(3):
        while "ready" not in (tmp_path / f"p{i}.log").read_text():
            time.sleep(0.05)
    start = time.monotonic()
    servers.stop_all()
    elapsed = time.monotonic() - start
    assert [p.returncode for p in procs] == [-9, -9, -9]  # killed: they ignored SIGTERM
    assert 1.5 < elapsed < 4.5, elapsed
