"""Issue #10 items 1, 8 and 9: what ``data verify`` reports, the same checks before scoring
(``require_verified``, cached per manifest), staging-folder permissions and stale temporaries."""

from __future__ import annotations

import os
import stat
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

import diffad_core.data.verify as verify_mod
from diffad_core._atomic import atomic_write_text, remove_stale_temporaries, staging_dir
from diffad_core.cli import main
from diffad_core.data import DatasetProblems, require_verified, verify_dataset

pytestmark = pytest.mark.reliability


def _truncate(path: Path) -> None:
    path.write_bytes(path.read_bytes()[:40])


def test_verify_reports_a_link_out_of_the_root_and_an_empty_category_folder(
        data: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    outside = tmp_path / "elsewhere.png"
    image = data / "weave/train/good/000.png"
    outside.write_bytes(image.read_bytes())
    image.unlink()
    image.symlink_to(outside)
    (data / "cable").mkdir()
    assert main(["data", "verify", "--root", str(data), "--dataset", "folder"]) == 1
    err = capsys.readouterr().err
    assert f"outside the root: {image} is a link to {outside}" in err
    assert f"not a category: {data / 'cable'} has no train/ folder" in err


def test_require_verified_names_every_bad_file(data: Path) -> None:
    (data / "weave/ground_truth/hole/000_mask.png").unlink()                      # missing mask
    Image.fromarray(np.zeros((30, 40), np.uint8)).save(data / "weave/ground_truth/bend/000_mask.png")
    _truncate(data / "weave/train/good/001.png")                                  # two unreadable
    _truncate(data / "weave/test/good/000.png")
    with pytest.raises(DatasetProblems) as info:
        require_verified(data, "folder", ["weave"])
    problems = info.value.problems
    assert len(problems) == 4, problems
    joined = "\n".join(problems)
    for name in ("test/hole/000.png has no mask", "bend/000_mask.png is 40x30",
                 "train/good/001.png", "test/good/000.png"):
        assert name in joined


def test_require_verified_checks_once_per_manifest(data: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    require_verified(data, "folder", ["weave"])
    calls = []
    monkeypatch.setattr(verify_mod, "verify_dataset", lambda *a, **k: calls.append(a) or
                        verify_dataset(*a, **k))
    require_verified(data, "folder", ["weave"])
    assert calls == []  # same files: only stat'ed
    _truncate(data / "weave/test/good/001.png")  # a changed file is checked again
    with pytest.raises(DatasetProblems):
        require_verified(data, "folder", ["weave"])
    assert len(calls) == 1


def test_synthetic_folders_follow_the_umask(data: Path) -> None:
    for folder in (data / "weave", data / "weave/train"):
        assert stat.S_IMODE(folder.stat().st_mode) & 0o055 == 0o055  # group/other can read
    made = staging_dir(data, ".stage-")
    assert stat.S_IMODE(made.stat().st_mode) == 0o777 & ~_umask()


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def test_stale_temporaries_are_removed(tmp_path: Path) -> None:
    atomic_write_text(tmp_path / "state.json", "{}")
    stale = tmp_path / ".train_state.pt.k2j3h4.tmp"
    stale.write_bytes(b"")
    assert remove_stale_temporaries(tmp_path) == [stale]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["state.json"]
