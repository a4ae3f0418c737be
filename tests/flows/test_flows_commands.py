"""The pipeline commands (``diffad_core.cli.pipeline``) and ``models:/`` checkpoint specs: argument
handling, the resolved config handed to the flows (faked here), and the closing summary."""

from __future__ import annotations

import os
import signal
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from diffad_core.cli import main, resolve_checkpoint
from diffad_core.cli import pipeline as pipeline_commands


@pytest.fixture()
def home(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    monkeypatch.setenv("DIFFAD_HOME", str(tmp_path / "home"))
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    monkeypatch.chdir(tmp_path)
    return tmp_path / "home"


@pytest.fixture()
def flow_env(monkeypatch: pytest.MonkeyPatch) -> Iterator[None]:
    """The handlers set Prefect's environment defaults and a SIGTERM handler: undo both. The
    flows are faked here, so no temporary Prefect server is started for them."""
    import contextlib

    import flows.guard

    monkeypatch.setattr(flows.guard, "temporary_prefect_server", contextlib.nullcontext)
    env, handler = dict(os.environ), signal.getsignal(signal.SIGTERM)
    yield
    os.environ.clear()
    os.environ.update(env)
    signal.signal(signal.SIGTERM, handler)


class _State:
    def __init__(self, completed: bool) -> None:
        self.name = "Completed" if completed else "Failed"
        self.message = None if completed else "1 of 2 categories failed"
        self._completed = completed

    def is_completed(self) -> bool:
        return self._completed


def _fake_flow(monkeypatch: pytest.MonkeyPatch, name: str, completed: bool = True) -> list[dict[str, Any]]:
    import flows.benchmark

    calls: list[dict[str, Any]] = []

    def fake(**kwargs: Any) -> _State:
        calls.append(kwargs)
        return _State(completed)

    monkeypatch.setattr(flows.benchmark, name, fake)
    return calls


def _write_run(run_id: str, categories: dict[str, tuple[str, str | None]], **fields: Any) -> None:
    from tasks.records import CategoryOutcome
    from tasks.runs import RunRecord, category_status_path, write_run_record

    write_run_record(RunRecord(run_id=run_id, categories=sorted(categories), **fields))
    for cat, (status, error) in categories.items():
        path = category_status_path(run_id, cat)
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(CategoryOutcome(category=cat, status=status, error=error).model_dump_json())


# ----------------------------------------------------------------------------- benchmark
def test_benchmark_hands_the_flow_one_resolved_config(home: Path, tmp_path: Path, flow_env: None,
                                                      monkeypatch: pytest.MonkeyPatch) -> None:
    calls = _fake_flow(monkeypatch, "full_benchmark")
    yaml = tmp_path / "c.yaml"
    yaml.write_text("train:\n  iterations: 3\n  lr: 0.001\nscore:\n  ablations: [kl, rgb]\nseed: 7\n")
    code = main(["benchmark", "--preset", "smoke", "--config", str(yaml), "--set", "seed=9",
                 "--dataset", "synthetic", "--root", str(tmp_path / "data"),
                 "--category", "weave", "--category", "bolt", "--executor", "deployments",
                 "--no-register", "--no-promote", "--run-id", "r0", "--date", "2026-01-02"])
    assert code == 0
    (call,) = calls
    cfg = call.pop("config")
    assert call == {"run_id": "r0", "date": "2026-01-02", "return_state": True}
    assert (cfg.preset, cfg.train.iterations, cfg.train.lr, cfg.score.ablations) == ("smoke", 3, 0.001, ["kl", "rgb"])
    assert cfg.seed == 9  # --set wins over the YAML file
    assert (cfg.data.dataset, cfg.data.root, cfg.data.categories) == ("synthetic", str(tmp_path / "data"), ["weave", "bolt"])
    assert cfg.runtime.executor == "deployments"
    assert (cfg.registry.register_models, cfg.registry.promote) == (False, False)


def test_benchmark_defaults_come_from_the_preset(home: Path, flow_env: None,
                                                 monkeypatch: pytest.MonkeyPatch) -> None:
    calls = _fake_flow(monkeypatch, "full_benchmark", completed=False)
    assert main(["benchmark", "--preset", "smoke", "--run-id", "r1"]) == 1  # the flow failed
    cfg = calls[0]["config"]
    assert cfg.registry.register_models is True and cfg.registry.promote is True
    assert cfg.runtime.executor == "local" and calls[0]["date"] is None


def test_benchmark_rejects_a_bad_override_before_running(home: Path, monkeypatch: pytest.MonkeyPatch,
                                                         capsys: pytest.CaptureFixture) -> None:
    calls = _fake_flow(monkeypatch, "full_benchmark")
    assert main(["benchmark", "--preset", "smoke", "--set", "train.nope=1"]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "unknown key 'train.nope'" in err
    assert err.startswith("diffad benchmark: error: ")
    assert calls == []


# ----------------------------------------------------------------------------- rerun
def test_rerun_needs_an_existing_run(home: Path, capsys: pytest.CaptureFixture) -> None:
    assert main(["rerun", "--run-id", "nothing", "--failed"]) == 2
    assert capsys.readouterr().err.startswith("diffad rerun: error: no run 'nothing' under ")
    assert main(["rerun", "--run-id", "nothing"]) == 2
    assert capsys.readouterr().err == "diffad rerun: error: give --failed or --category C (repeatable)\n"


def test_rerun_calls_the_flow_with_the_categories(home: Path, flow_env: None,
                                                  monkeypatch: pytest.MonkeyPatch) -> None:
    _write_run("r2", {"weave": ("done", None), "bolt": ("failed", "boom")}, status="failed")
    calls = _fake_flow(monkeypatch, "rerun_categories")
    assert main(["rerun", "--run-id", "r2", "--category", "bolt", "--category", "weave"]) == 0
    assert main(["rerun", "--run-id", "r2", "--failed"]) == 0
    assert calls == [
        {"run_id": "r2", "categories": ["bolt", "weave"], "failed": False, "return_state": True},
        {"run_id": "r2", "categories": None, "failed": True, "return_state": True}]


# ----------------------------------------------------------------------------- registry
def test_registry_compare_on_an_empty_store(home: Path, capsys: pytest.CaptureFixture) -> None:
    assert main(["registry", "compare", "--dataset", "synthetic", "--category", "weave"]) == 1
    out = capsys.readouterr().out
    assert "no registered models diffad-synthetic-*" in out
    assert not (Path.cwd() / "mlruns").exists()


def test_models_uri_goes_to_tasks_registry(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    import tasks.registry

    ck = tmp_path / "ck"
    ck.mkdir()
    (ck / "model.safetensors").write_bytes(b"x")
    (ck / "config.json").write_text("{}")
    seen: list[str] = []

    def fake(uri: str) -> Path:
        seen.append(uri)
        return ck

    monkeypatch.setattr(tasks.registry, "resolve_models_uri", fake)
    monkeypatch.setenv("MLFLOW_TRACKING_URI", "http://127.0.0.1:9")  # never contacted: faked
    assert resolve_checkpoint("models:/diffad-synthetic-weave@champion") == ck
    assert resolve_checkpoint("models:/diffad-synthetic-weave/3") == ck
    assert seen == ["models:/diffad-synthetic-weave@champion", "models:/diffad-synthetic-weave/3"]


def test_models_uri_not_in_the_registry_is_a_user_error(home: Path, tmp_path: Path,
                                                        capsys: pytest.CaptureFixture) -> None:
    image = tmp_path / "x.png"
    image.write_bytes(b"not read: the checkpoint fails first")
    # A fresh home: no store to look in, and none is created (issue #10 item 9).
    assert main(["predict", str(image), "--checkpoint", "models:/diffad-synthetic-weave@champion"]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and f"no MLflow store at {home.resolve() / 'mlflow.db'}" in err
    assert not (home / "mlflow.db").exists()
    from tasks import tracking

    tracking.get_client().search_experiments()  # an existing, empty store
    with pytest.raises(FileNotFoundError, match="not in the registry"):
        resolve_checkpoint("models:/diffad-synthetic-weave@champion")
    capsys.readouterr()  # MLflow's own log lines from creating the store
    assert main(["predict", str(image), "--checkpoint", "models:/diffad-synthetic-weave@champion"]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1
    assert err.startswith("diffad predict: error: models:/diffad-synthetic-weave@champion: not in the registry")


# ----------------------------------------------------------------------------- helpers
def test_prefect_environment_keeps_user_settings(monkeypatch: pytest.MonkeyPatch) -> None:
    for key in ("PREFECT_SERVER_EPHEMERAL_ENABLED", "PREFECT_SERVER_ANALYTICS_ENABLED",
                "DO_NOT_TRACK", "PREFECT_LOGGING_LEVEL", "PREFECT_SERVER_LOGGING_LEVEL",
                "PREFECT_LOGGING_LOG_PRINTS"):
        monkeypatch.delenv(key, raising=False)  # restored after the test
    monkeypatch.setenv("PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS", "999")
    pipeline_commands.prefect_environment()
    assert os.environ["PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS"] == "999"
    assert os.environ["DO_NOT_TRACK"] == "1"
    assert os.environ["PREFECT_SERVER_ANALYTICS_ENABLED"] == "false"


def test_finish_prints_outcomes_and_where_things_are(home: Path,
                                                     capsys: pytest.CaptureFixture) -> None:
    _write_run("r1", {"weave": ("done", None), "gravel": ("failed", "ImageReadError: gravel/test/x.png")},
               status="failed", report={"markdown": "/r/report.md", "html": "/r/report.html"},
               registry={"diffad-synthetic-weave": "version 1 promoted to champion"})
    assert pipeline_commands._finish("r1", _State(completed=False)) == 1
    captured = capsys.readouterr()
    assert "run r1: failed" in captured.out
    assert "gravel         failed  ImageReadError: gravel/test/x.png" in captured.out
    assert "weave          done" in captured.out
    assert "mlflow ui --backend-store-uri sqlite:///" in captured.out
    assert "/r/report.md" in captured.out and "promoted to champion" in captured.out
    assert "did not complete" in captured.err
    assert pipeline_commands._finish("r1", _State(completed=True)) == 0
    assert pipeline_commands._finish("never-written", _State(completed=True)) == 0
    assert "run never-written: Completed" in capsys.readouterr().out
