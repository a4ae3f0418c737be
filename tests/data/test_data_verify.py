"""`diffad data verify`, verify_dataset and the dataset manifest."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest
from data_builders import build_mvtec, write_image, write_mask

import diffad_core.data.manifest as manifest_mod
from diffad_core.cli import main
from diffad_core.data import dataset_manifest, verify_dataset


def test_clean_dataset_passes(mvtec_root: Path, tmp_path: Path,
                              capsys: pytest.CaptureFixture[str]) -> None:
    out_file = tmp_path / "manifest.json"
    code = main(["data", "verify", "--root", str(mvtec_root), "--manifest-out", str(out_file)])
    out = capsys.readouterr().out
    assert code == 0
    assert "bottle    3           1          2 (broken=1, crack=1)  2" in out
    written = json.loads(out_file.read_text())
    assert written["categories"] == ["bottle", "grid"]
    assert len(written["files"]) == 2 * (3 + 1 + 2 + 2)
    assert written["files"][0] == {"path": "bottle/ground_truth/broken/000_mask.png",
                                   "size": (mvtec_root / "bottle/ground_truth/broken/000_mask.png")
                                   .stat().st_size,
                                   "sha256": manifest_mod.sha256_file(
                                       mvtec_root / "bottle/ground_truth/broken/000_mask.png")}
    assert written["hash"] in out
    assert written["hash"] == dataset_manifest(mvtec_root, "mvtec", ["bottle", "grid"])["hash"]
    report = verify_dataset(mvtec_root, "mvtec", ["grid"])
    assert report.ok and report.counts["grid"].to_dict() == {
        "train_good": 3, "test_good": 1, "test_anomalous": {"broken": 1, "crack": 1}, "masks": 2}


def test_every_problem_is_one_line_naming_the_file(tmp_path: Path,
                                                   capsys: pytest.CaptureFixture[str]) -> None:
    root = build_mvtec(tmp_path / "bad", categories=("bottle", "grid", "pill"))
    good = root / "bottle/train/good/001.png"
    data = write_image(good, 7, size=32).read_bytes()
    good.write_bytes(data[: len(data) // 2])  # truncated PNG
    (root / "bottle/ground_truth/crack/000_mask.png").unlink()  # missing mask
    write_mask(root / "grid/ground_truth/broken/000_mask.png", size=10)  # size mismatch
    for p in sorted((root / "pill/train/good").iterdir()):
        p.unlink()  # empty category
    code = main(["data", "verify", "--root", str(root), "--category", "bottle",
                 "--category", "grid", "--category", "pill", "--category", "cable"])
    err = capsys.readouterr().err.splitlines()
    assert code == 1
    problems = [line for line in err if not line.endswith("problem(s) found")]
    assert len(problems) == 5, err
    joined = "\n".join(problems)
    assert f"unknown category: 'cable' is not under {root}" in joined
    assert f"empty category: 'pill' has no training images in {root / 'pill/train/good'}" in joined
    assert f"unreadable image: {good}: unreadable or truncated image" in joined
    assert (f"missing mask: {root / 'bottle/test/crack/000.png'} has no mask (expected "
            f"{root / 'bottle/ground_truth/crack/000_mask.png'})") in joined
    assert (f"size mismatch: mask {root / 'grid/ground_truth/broken/000_mask.png'} is 10x10 but "
            f"image {root / 'grid/test/broken/000.png'} is 8x8") in joined


def test_missing_root_and_empty_root(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["data", "verify", "--root", str(tmp_path / "none")]) == 1
    assert "does not exist" in capsys.readouterr().err
    (tmp_path / "empty").mkdir()
    assert main(["data", "verify", "--root", str(tmp_path / "empty"), "--dataset", "folder"]) == 1
    assert "empty dataset" in capsys.readouterr().err


def test_manifest_hash_stable_and_content_sensitive(mvtec_root: Path, tmp_path: Path,
                                                    monkeypatch: pytest.MonkeyPatch) -> None:
    first = dataset_manifest(mvtec_root, "mvtec", ["bottle"])
    # A copy of the same files elsewhere hashes the same (paths are relative to the root).
    copy = build_mvtec(tmp_path / "copy", categories=("bottle",))
    assert dataset_manifest(copy, "mvtec", ["bottle"])["hash"] == first["hash"]
    # Repeat runs hit the (path, size, mtime) cache: no file is read again.
    monkeypatch.setattr(manifest_mod, "sha256_file",
                        lambda p: pytest.fail(f"re-hashed {p} despite the cache"))
    assert dataset_manifest(mvtec_root, "mvtec", ["bottle"]) == first
    monkeypatch.undo()
    # One changed pixel changes the hash (new mtime: the cache re-hashes that file only).
    target = mvtec_root / "bottle/train/good/002.png"
    st = target.stat()
    write_image(target, 21, size=8)
    os.utime(target, ns=(st.st_atime_ns, st.st_mtime_ns + 1_000_000))
    changed = dataset_manifest(mvtec_root, "mvtec", ["bottle"])
    assert changed["hash"] != first["hash"]
    assert [f["path"] for f in changed["files"]] == [f["path"] for f in first["files"]]
    # A renamed file changes it too.
    target.rename(target.with_name("009.png"))
    assert dataset_manifest(mvtec_root, "mvtec", ["bottle"])["hash"] not in (
        first["hash"], changed["hash"])
