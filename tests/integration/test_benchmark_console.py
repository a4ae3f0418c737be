"""What ``diffad benchmark`` prints (issue 12, "a console a person reads").

By default: the progress bars, the outcome per category and the final table; Prefect's flow and
task INFO lines go to ``results/<run_id>/prefect.log`` (and the Prefect UI) instead. With
``--verbose`` they are on the console too; with ``--no-progress`` the bars are not. Runs the
real command in a subprocess (its own temporary Prefect server) on one tiny smoke category.
"""

from __future__ import annotations

import re
import subprocess
from pathlib import Path

import pytest

from tests.integration.servers import BIN, REPO, SMOKE_OVERRIDES, client_env

pytestmark = [pytest.mark.integration, pytest.mark.slow]

CATEGORY = "weave"
TASK_LINE = "Task run 'train-weave' - Finished in state Completed()"


def _benchmark(tmp_path: Path, run_id: str, *flags: str) -> list[str]:
    env = client_env(tmp_path, f"sqlite:///{tmp_path / 'mlflow.db'}")
    sets = [arg for o in SMOKE_OVERRIDES for arg in ("--set", o)]
    out = subprocess.run([str(BIN / "diffad"), "benchmark", "--preset", "smoke", "--category",
                          CATEGORY, "--run-id", run_id, *sets, *flags],
                         env=env, cwd=REPO, capture_output=True, timeout=600)
    # Bytes, decoded here: text mode would turn each \r of a progress bar's redraw into a line.
    console = (out.stdout + out.stderr).decode(errors="replace")
    assert out.returncode == 0, console[-4000:]
    return console.split("\n")  # not splitlines(): a bar's redraws (\r) stay on its line


def test_console_shows_bars_and_table_logs_go_to_file(tmp_path: Path) -> None:
    lines = _benchmark(tmp_path, "quiet")
    text = "\n".join(lines)
    assert "Task run" not in text and "| INFO " not in text, text
    assert "Downloading artifacts" not in text, text  # MLflow's bars while registering the model
    for stage in ("train", "reconstruct", "score"):  # one bar per category stage
        assert sum(line.lstrip("\r").startswith(f"{stage} {CATEGORY}") for line in lines) == 1, text
    assert "run quiet: completed" in text and f"| {CATEGORY} |" in text
    assert f"registry: diffad-synthetic-{CATEGORY}: version 1 promoted to champion" in text
    assert len(lines) <= 25, f"{len(lines)} console lines:\n{text}"
    log = (tmp_path / "home" / "results" / "quiet" / "prefect.log").read_text()
    assert TASK_LINE in log and "Beginning flow run" in log

    # (its training comes from the first run's cache: another task line than train's)
    verbose = "\n".join(_benchmark(tmp_path, "verbose", "--verbose"))
    assert re.search(rf"Task run '[a-z-]+-{CATEGORY}' - Finished in state", verbose), verbose
    assert "Beginning flow run" in verbose

    # --no-progress: the same outcome and table, no bar (the scoring and reconstruction run again).
    bare = _benchmark(tmp_path, "bare", "--no-progress")
    text = "\n".join(bare)
    assert not any(line.lstrip("\r").startswith((f"score {CATEGORY}", f"reconstruct {CATEGORY}"))
                   for line in bare), text
    assert "run bare: completed" in text and f"| {CATEGORY} |" in text
