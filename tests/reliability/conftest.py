"""Fixtures of the reliability suite (issue #10): a private DIFFAD_HOME and a tiny synthetic
dataset in the MVTec layout, as ``diffad data synth --root DATA --category weave --size 64``
writes it (fewer images, so each case takes seconds)."""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest

from diffad_core.config import SynthConfig
from diffad_core.data.synth import generate_dataset

TINY = SynthConfig(categories=["weave"], size=64, n_train=6, n_test_good=2, n_test_per_defect=1)


@pytest.fixture(scope="session")
def _pristine_data(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return generate_dataset(tmp_path_factory.mktemp("pristine") / "DATA", TINY)


@pytest.fixture
def data(tmp_path: Path, _pristine_data: Path) -> Path:
    """A fresh copy of the tiny dataset: ``<data>/weave/{train,test,ground_truth}``."""
    return Path(shutil.copytree(_pristine_data, tmp_path / "DATA", symlinks=True))


@pytest.fixture(autouse=True)
def home(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """Each test gets its own DIFFAD_HOME and the default (sqlite) MLflow store."""
    monkeypatch.setenv("DIFFAD_HOME", str(tmp_path / "home"))
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    monkeypatch.delenv("PREFECT_API_URL", raising=False)
    return tmp_path / "home"
