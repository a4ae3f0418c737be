"""Issue #10 item 4: the run lock refuses, the checkpoint lock waits; both name the holder."""

from __future__ import annotations

import subprocess
import sys
import time
from pathlib import Path

import pytest

from diffad_core.locks import LockBusy, file_lock
from flows.guard import run_lock, run_lock_path

pytestmark = pytest.mark.reliability

_HOLD = ("import sys, time\nfrom pathlib import Path\nfrom diffad_core.locks import file_lock\n"
         "with file_lock(Path(sys.argv[1]), 'x', wait=False):\n"
         "    print('held', flush=True)\n    time.sleep(float(sys.argv[2]))\n")


def _holder(path: Path, seconds: float) -> subprocess.Popen:
    proc = subprocess.Popen([sys.executable, "-c", _HOLD, str(path), str(seconds)],
                            stdout=subprocess.PIPE, text=True)
    assert proc.stdout.readline().strip() == "held"
    return proc


def test_run_lock_refuses_naming_the_holder(home: Path) -> None:
    holder = _holder(run_lock_path("r9"), 30)
    try:
        with pytest.raises(LockBusy, match=rf"run r9 is in use by pid {holder.pid} .*use another --run-id"):
            with run_lock("r9"):
                pass
    finally:
        holder.kill()
        holder.wait()
    with run_lock("r9"):  # released by kill -9: never stale
        with run_lock("r9"):  # re-entrant in the holding process (the CLI around its flow)
            pass


def test_checkpoint_lock_waits_for_the_holder(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    path = tmp_path / ".ck.lock"
    holder = _holder(path, 2)
    start = time.monotonic()
    with file_lock(path, "checkpoint folder ck", wait=True):
        waited = time.monotonic() - start
    holder.wait()
    assert waited > 1.0
    assert f"checkpoint folder ck: in use by pid {holder.pid}" in caplog.text

