"""The pipeline CLI commands: argument handling that needs no flow run."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from diffad_core._commands import resolve_checkpoint
from diffad_core.cli import main
from flows import _commands


@pytest.fixture()
def home(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    monkeypatch.setenv("DIFFAD_HOME", str(tmp_path / "home"))
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    monkeypatch.chdir(tmp_path)
    return tmp_path / "home"


def test_yaml_file_becomes_overrides(tmp_path: Path) -> None:
    path = tmp_path / "c.yaml"
    path.write_text("train:\n  iterations: 3\n  lr: 0.001\nscore:\n  ablations: [kl, rgb]\nseed: 7\n")
    assert _commands._file_overrides(str(path)) == [
        "train.iterations=3", "train.lr=0.001", 'score.ablations=["kl", "rgb"]', "seed=7"]
    from tasks.pipeline import make_config

    cfg = make_config("smoke", _commands._file_overrides(str(path)))
    assert (cfg.train.iterations, cfg.score.ablations, cfg.seed) == (3, ["kl", "rgb"], 7)


def test_benchmark_rejects_a_bad_override_before_running(home: Path, capsys: pytest.CaptureFixture) -> None:
    assert main(["benchmark", "--preset", "smoke", "--set", "train.nope=1"]) == 2
    assert "unknown key 'train.nope'" in capsys.readouterr().err


def test_rerun_needs_an_existing_run(home: Path, capsys: pytest.CaptureFixture) -> None:
    assert main(["rerun", "--run-id", "nothing", "--failed"]) == 2
    assert "no run 'nothing'" in capsys.readouterr().err
    assert main(["rerun", "--run-id", "nothing"]) == 2


def test_registry_compare_on_an_empty_store(home: Path, capsys: pytest.CaptureFixture) -> None:
    assert main(["registry", "compare", "--dataset", "synthetic"]) == 1
    out = capsys.readouterr().out
    assert "no registered models diffad-synthetic-*" in out
    assert not (Path.cwd() / "mlruns").exists()


def test_models_scheme_is_registered(home: Path) -> None:
    with pytest.raises(FileNotFoundError, match="not in the registry"):
        resolve_checkpoint("models:/diffad-synthetic-weave@champion")


def test_prefect_environment_keeps_user_settings(monkeypatch: pytest.MonkeyPatch) -> None:
    for key in ("PREFECT_SERVER_EPHEMERAL_ENABLED", "PREFECT_SERVER_ANALYTICS_ENABLED",
                "DO_NOT_TRACK", "PREFECT_LOGGING_LEVEL", "PREFECT_SERVER_LOGGING_LEVEL",
                "PREFECT_LOGGING_LOG_PRINTS"):
        monkeypatch.delenv(key, raising=False)  # restored after the test
    monkeypatch.setenv("PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS", "999")
    _commands.prefect_environment()
    assert os.environ["PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS"] == "999"
    assert os.environ["DO_NOT_TRACK"] == "1"
    assert os.environ["PREFECT_SERVER_ANALYTICS_ENABLED"] == "false"



class _State:
    def __init__(self, completed: bool) -> None:
        self.name = "Completed" if completed else "Failed"
        self.message = None if completed else "1 of 2 categories failed"
        self._completed = completed

    def is_completed(self) -> bool:
        return self._completed


def test_finish_prints_outcomes_and_where_things_are(home: Path,
                                                     capsys: pytest.CaptureFixture) -> None:
    import json

    from tasks.pipeline import run_record_path

    path = run_record_path("r1")
    path.parent.mkdir(parents=True)
    path.write_text(json.dumps({"status": "failed", "categories": {
        "weave": {"status": "done", "error": None},
        "gravel": {"status": "failed", "error": "ImageReadError: gravel/test/x.png"}},
        "report": {"markdown": "/r/report.md", "html": "/r/report.html"},
        "registry": {"diffad-synthetic-weave": "version 1 promoted to champion"}}))
    assert _commands._finish("r1", _State(completed=False)) == 1
    captured = capsys.readouterr()
    assert "gravel         failed  ImageReadError: gravel/test/x.png" in captured.out
    assert "mlflow ui --backend-store-uri sqlite:///" in captured.out
    assert "/r/report.md" in captured.out and "promoted to champion" in captured.out
    assert "did not complete" in captured.err
    assert _commands._finish("r1", _State(completed=True)) == 0
