"""Tests for the held-out benchmark family generator (diffad_core/data/heldout.py)."""

from __future__ import annotations

import ast
import hashlib
import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from diffad_core.data import heldout
from diffad_core.data.heldout import (
    CATEGORIES,
    CHANGE_THRESHOLD,
    DEFECTS,
    MARKER_NAME,
    _commit,
    _render_sample,
    _RENDERERS,
    _view,
    generate_heldout,
)
from diffad_core.data.verify import verify_dataset

TINY = {"seed": 3, "size": 64, "n_train": 3, "n_test_good": 2, "n_test_per_defect": 2}


def _hashes(root: Path) -> dict[str, str]:
    return {p.relative_to(root).as_posix(): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(root.rglob("*")) if p.is_file()}


def _read(path: Path) -> np.ndarray:
    array = np.asarray(Image.open(path))
    return array[..., None] if array.ndim == 2 else array


@pytest.fixture(scope="module")
def tiny_root(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return generate_heldout(tmp_path_factory.mktemp("heldout") / "data", **TINY)


def test_layout_is_exactly_mvtec(tiny_root: Path) -> None:
    expected: set[str] = set()
    for cat in CATEGORIES:
        expected.add(f"{cat}/{MARKER_NAME}")
        expected |= {f"{cat}/train/good/{i:03d}.png" for i in range(3)}
        expected |= {f"{cat}/test/good/{i:03d}.png" for i in range(2)}
        for defect in DEFECTS:
            expected |= {f"{cat}/test/{defect}/{i:03d}.png" for i in range(2)}
            expected |= {f"{cat}/ground_truth/{defect}/{i:03d}_mask.png" for i in range(2)}
    assert set(_hashes(tiny_root)) == expected
    assert not list(tiny_root.glob(".tmp-heldout-*"))
    marker = json.loads((tiny_root / "coins" / MARKER_NAME).read_text())
    assert marker["category"] == "coins" and marker["size"] == 64 and marker["seed"] == 3


def test_project_verify_passes(tiny_root: Path) -> None:
    report = verify_dataset(tiny_root, "folder")
    assert report.ok, report.problems
    assert report.categories == sorted(CATEGORIES)
    for counts in report.counts.values():
        assert counts.train_good == 3 and counts.test_good == 2
        assert counts.test_anomalous == {d: 2 for d in DEFECTS} and counts.masks == 10


def test_channels_and_sizes(tiny_root: Path) -> None:
    for cat, spec in CATEGORIES.items():
        image = Image.open(tiny_root / cat / "test" / "crack" / "000.png")
        assert image.size == (64, 64)
        assert image.mode == ("RGB" if spec.rgb else "L")
        mask = Image.open(tiny_root / cat / "ground_truth" / "crack" / "000_mask.png")
        assert mask.mode == "L" and mask.size == (64, 64)
    assert {s.rgb for s in CATEGORIES.values()} == {True, False}  # both kinds present


def test_masks_are_exactly_the_changed_pixels(tiny_root: Path) -> None:
    for cat in CATEGORIES:
        for defect in DEFECTS:
            for i in range(2):
                image = _read(tiny_root / cat / "test" / defect / f"{i:03d}.png")
                gt = tiny_root / cat / "ground_truth" / defect
                mask = _read(gt / f"{i:03d}_mask.png")[..., 0]
                clean, rendered, _ = _render_sample(cat, defect, i, seed=3, size=64)
                assert np.array_equal(image, rendered)  # the file is this clean image, defected
                assert set(np.unique(mask)) == {0, 255}, (cat, defect, i)  # never empty
                changed = (image != clean).any(axis=-1)
                assert np.array_equal(mask == 255, changed), (cat, defect, i)
                diff = np.abs(image.astype(int) - clean.astype(int)).max(axis=-1)
                assert diff[changed].min() > CHANGE_THRESHOLD


def test_renderers_directly_on_a_clean_array() -> None:
    for cat in ("brick", "coffee"):
        rng = np.random.default_rng(11)
        image, prior = _view(cat, rng, 96)
        clean = np.clip(np.rint(image * 255), 0, 255).astype(np.uint8)
        base = clean.astype(np.float32) / 255
        for name, renderer in _RENDERERS.items():
            rendered = renderer(base, rng, (48.0, 48.0), False, prior)
            assert rendered.shape == base.shape
            out, mask = _commit(clean, rendered)
            assert mask.sum() > 0, (cat, name)
            assert np.array_equal(mask, (out != clean).any(axis=-1))
            assert np.array_equal(out[~mask], clean[~mask])


def test_every_kind_mixes_small_and_medium_defects() -> None:
    for defect in DEFECTS:
        small = _render_sample("grass", defect, 0, seed=0, size=256)[2].mean()
        medium = _render_sample("grass", defect, 1, seed=0, size=256)[2].mean()
        assert 0 < small < 0.005, defect
        assert medium > small, defect


def test_same_seed_same_bytes_other_seed_other_bytes(tmp_path: Path, tiny_root: Path) -> None:
    again = generate_heldout(tmp_path / "again", **TINY)
    assert _hashes(again) == _hashes(tiny_root)
    # A subset of categories reproduces the same images (one random stream per image).
    subset = generate_heldout(tmp_path / "subset", categories=["grass"], **TINY)
    assert _hashes(subset / "grass") == _hashes(tiny_root / "grass")
    other = generate_heldout(tmp_path / "other", categories=["grass"], **{**TINY, "seed": 4})
    assert _hashes(other / "grass") != _hashes(tiny_root / "grass")


def test_rerun_is_a_noop_and_new_settings_replace(tmp_path: Path) -> None:
    settings = {**TINY, "n_test_per_defect": 1}
    root = generate_heldout(tmp_path / "data", categories=["coins"], **settings)
    before = {p: p.stat().st_mtime_ns for p in (root / "coins").rglob("*")}
    inode = (root / "coins").stat().st_ino
    generate_heldout(root, categories=["coins"], **settings)
    assert {p: p.stat().st_mtime_ns for p in (root / "coins").rglob("*")} == before
    assert (root / "coins").stat().st_ino == inode

    generate_heldout(root, categories=["coins"], **{**settings, "n_train": 2})
    assert len(list((root / "coins" / "train" / "good").glob("*.png"))) == 2
    assert json.loads((root / "coins" / MARKER_NAME).read_text())["n_train"] == 2
    assert [p.name for p in root.iterdir()] == ["coins"]  # no temporary folders left


def test_refuses_foreign_folders_and_bad_settings(tmp_path: Path) -> None:
    (tmp_path / "brick").mkdir()
    (tmp_path / "brick" / "keep.txt").write_text("not ours")
    with pytest.raises(FileExistsError):
        generate_heldout(tmp_path, categories=["brick"], **TINY)
    assert (tmp_path / "brick" / "keep.txt").exists()
    with pytest.raises(ValueError, match="unknown"):
        generate_heldout(tmp_path, categories=["gravel"], **TINY)
    with pytest.raises(ValueError):
        generate_heldout(tmp_path, categories=["grass"], **{**TINY, "size": 16})


def test_cli_heldout_then_verify(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    from diffad_core.cli import main as cli_main  # here: the other tests need no CLI

    root = tmp_path / "cli"
    argv = ["data", "heldout", "--root", str(root), "--seed", "1", "--size", "48",
            "--n-train", "2", "--n-test-good", "1", "--n-test-per-defect", "1",
            "--category", "brick", "--category", "coffee", "--no-progress"]
    assert cli_main(argv) == 0
    assert str(root) in capsys.readouterr().out
    assert sorted(p.name for p in root.iterdir()) == ["brick", "coffee"]
    assert cli_main(["data", "verify", "--dataset", "folder", "--root", str(root)]) == 0
    assert "problem" not in capsys.readouterr().err


def test_photographs_are_bundled_and_gravel_unused() -> None:
    import skimage.data

    bundled = {p.stem for p in Path(skimage.data.__file__).parent.iterdir()}
    photos = {s.photo for s in CATEGORIES.values()} | set(heldout._FOREIGN_PHOTOS)
    assert photos <= bundled  # loaded from the wheel, never fetched over the network
    assert "gravel" not in photos


def test_independent_of_synth(tmp_path: Path) -> None:
    tree = ast.parse(Path(heldout.__file__).read_text())
    imported = [n.module or "" for n in ast.walk(tree) if isinstance(n, ast.ImportFrom)]
    imported += [a.name for n in ast.walk(tree) if isinstance(n, ast.Import) for a in n.names]
    assert not [m for m in imported if "synth" in m]
    code = ("import sys\n"
            "from diffad_core.data.heldout import generate_heldout\n"
            "generate_heldout(sys.argv[1], size=32, n_train=1, n_test_good=1,\n"
            "                 n_test_per_defect=1, categories=['brick'])\n"
            "print([m for m in sys.modules if m.startswith('diffad_core.data.synth')])\n")
    result = subprocess.run([sys.executable, "-c", code, str(tmp_path)], capture_output=True,
                            text=True, check=True, timeout=120)
    assert result.stdout.strip() == "[]"
