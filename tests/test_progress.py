"""Progress bars: redrawn on a terminal, one line a minute in a log file (issue #12's console)."""

from __future__ import annotations

import io
import time

import pytest

from diffad_core import progress


def test_a_bar_in_a_log_file_writes_few_lines(monkeypatch: pytest.MonkeyPatch) -> None:
    log = io.StringIO()  # not a terminal
    monkeypatch.setattr(progress.sys, "stderr", log)
    with progress.progress_bar(total=30, desc="train weave", unit="it") as bar:
        for _ in range(30):  # 1.5 s of updates: a terminal bar would redraw about 15 times
            time.sleep(0.05)
            bar.update(1)
            bar.set_postfix(loss=f"{time.time():.3f}")  # as training does at every step
    redraws = [part for part in log.getvalue().replace("\n", "\r").split("\r") if part.strip()]
    assert 1 <= len(redraws) <= 3, redraws  # the first draw and the last, not one per update
    assert "30/30" in redraws[-1]


def test_a_disabled_bar_writes_nothing(monkeypatch: pytest.MonkeyPatch) -> None:
    log = io.StringIO()
    monkeypatch.setattr(progress.sys, "stderr", log)
    with progress.progress_bar(total=10, desc="score weave", enabled=False) as bar:
        bar.update(10)
    assert log.getvalue() == ""


def test_the_no_progress_switch_turns_every_bar_off(monkeypatch: pytest.MonkeyPatch) -> None:
    # What ``diffad benchmark --no-progress`` sets: the bars the flow's tasks open write nothing.
    log = io.StringIO()
    monkeypatch.setattr(progress.sys, "stderr", log)
    monkeypatch.setenv(progress.NO_PROGRESS_ENV, "1")
    with progress.progress_bar(total=10, desc="train weave") as bar:
        bar.update(10)
    assert log.getvalue() == ""
