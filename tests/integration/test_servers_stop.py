"""The ``servers`` fixture's teardown (tests/integration/servers.py): every process it started is
told to stop before any is waited for, so one slow shutdown does not hold up the others."""

from __future__ import annotations

import sys
import time
from pathlib import Path

import pytest

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
