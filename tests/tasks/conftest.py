"""Fixtures for the pipeline task tests: an isolated DIFFAD_HOME and MLflow store per test."""

from __future__ import annotations

import json
from pathlib import Path

import pytest


@pytest.fixture()
def home(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """DIFFAD_HOME in tmp, the default MLflow store under it, and the cwd in tmp (so a stray
    ./mlruns would be seen)."""
    root = tmp_path / "home"
    monkeypatch.setenv("DIFFAD_HOME", str(root))
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    work = tmp_path / "cwd"
    work.mkdir()
    monkeypatch.chdir(work)
    return root


def make_checkpoint(path: Path, payload: bytes = b"weights") -> Path:
    """A checkpoint folder with the files the registry logs (contents are not loaded here)."""
    path.mkdir(parents=True, exist_ok=True)
    (path / "model.safetensors").write_bytes(payload)
    (path / "padim.safetensors").write_bytes(b"padim")
    (path / "config.json").write_text(json.dumps({"preset": "smoke"}))
    (path / "meta.json").write_text(json.dumps({"categories": ["weave"]}))
    return path
