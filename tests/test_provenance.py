"""Provenance: git SHA/dirty flag, library versions, run_provenance; paper numbers as data."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

from diffad_core import paper_numbers as P
from diffad_core import provenance as V
from diffad_core.config import load_config


def _git(repo: Path, *args: str) -> str:
    return subprocess.run(["git", "-C", str(repo), *args], check=True, capture_output=True,
                          text=True).stdout.strip()


@pytest.fixture()
def repo(tmp_path: Path) -> Path:
    _git(tmp_path, "init", "-q")
    (tmp_path / "a.txt").write_text("one\n")
    _git(tmp_path, "add", "a.txt")
    _git(tmp_path, "-c", "user.email=t@t", "-c", "user.name=t", "commit", "-q", "-m", "init")
    return tmp_path


def test_git_sha_and_dirty(repo: Path, tmp_path_factory: pytest.TempPathFactory) -> None:
    sha = V.git_sha(repo)
    assert sha == _git(repo, "rev-parse", "HEAD") and len(sha) == 40
    assert V.git_dirty(repo) is False
    (repo / "untracked.txt").write_text("x")
    assert V.git_dirty(repo) is False  # untracked files do not count
    (repo / "a.txt").write_text("two\n")
    assert V.git_dirty(repo) is True
    outside = tmp_path_factory.mktemp("nogit")
    assert V.git_sha(outside) is None and V.git_dirty(outside) is None


def test_library_versions_without_importing_trackers() -> None:
    code = ("import sys; from diffad_core.provenance import library_versions; v = library_versions(); "
            "assert 'mlflow' not in sys.modules and 'prefect' not in sys.modules; "
            "print(v['python'], v['numpy'], v['pyarrow'])")
    out = subprocess.run([sys.executable, "-c", code], check=True, capture_output=True, text=True)
    py, np_version, _ = out.stdout.split()
    import numpy

    assert py.startswith("3.") and np_version == numpy.__version__


def test_run_provenance(repo: Path) -> None:
    cfg = load_config("smoke", overrides=["seed=7"])
    prov = V.run_provenance(cfg, "abc123", repo_path=repo)
    assert prov["seed"] == 7 and prov["preset"] == "smoke"
    assert prov["config_hash"] == cfg.config_hash() and prov["config"] == cfg.to_dict()
    assert prov["manifest_hash"] == "abc123" and prov["git_sha"] == V.git_sha(repo)
    assert prov["timestamp_utc"].endswith("+00:00")
    assert "torch" in prov["versions"] and "cuda_available" in prov["device"]
    assert V.run_provenance(cfg.to_dict(), None, repo_path=repo)["config_hash"] == cfg.config_hash()
    tags = V.provenance_tags(prov)
    assert tags["seed"] == "7" and tags["version.python"] == prov["versions"]["python"]
    assert all(isinstance(v, str) for v in tags.values())
    with pytest.raises(TypeError, match="DiffadConfig or dict"):
        V.run_provenance(42, None)


def test_paper_numbers() -> None:
    assert set(P.PER_CLASS) == set(load_config("paper").categories())
    assert P.PER_CLASS["bottle"]["Ours"] == (97.7, 95.0)
    assert P.PER_CLASS["hazelnut"]["Ours*"] == (97.3, 91.1)
    assert P.PER_CLASS["cable"]["DRAEM"] == (94.7, 76.0)
    assert P.MEAN["Ours*"] == (96.7, 94.1) and P.UNIFIED["Ours"] == (96.0, 93.0)
    assert P.OTHER_REFERENCES["PatchCore"] == (99.6, 98.2, 93.5)
    for method in ("Ours", "Ours*", "PaDiM", "CFlow"):
        for k in (0, 1):
            mean = sum(P.PER_CLASS[c][method][k] for c in P.PER_CLASS) / len(P.PER_CLASS)
            assert mean == pytest.approx(P.MEAN[method][k], abs=0.1), (method, k)
    assert P.paper_row("mean", "Ours") == (96.7, 93.7) and P.paper_row("weave") is None
