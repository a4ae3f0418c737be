"""Fixtures for the data-layer tests: an isolated DIFFAD_HOME and tiny dataset builders."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest
from data_builders import build_mvtec


@pytest.fixture(autouse=True)
def _isolated_home(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    home = tmp_path / "home"
    monkeypatch.setenv("DIFFAD_HOME", str(home))
    torch = sys.modules.get("torch")  # only when a test module already imported it
    if torch is not None:
        torch.set_num_threads(1)
    return home


@pytest.fixture
def mvtec_root(tmp_path: Path) -> Path:
    return build_mvtec(tmp_path / "mvtec")

