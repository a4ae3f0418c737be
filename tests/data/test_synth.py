"""Tests for the synthetic MVTec-format dataset generator (diffad_core/data/synth/)."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from diffad_core.config import SYNTH_CATEGORIES, SynthConfig
from diffad_core.data.synth import scenes, writer
from diffad_core.data.synth import CATEGORY_DEFECTS, MARKER_NAME, generate_dataset
from diffad_core.data.synth.defects import min_defect_area
from diffad_core.data.synth.photos import PHOTO_CATEGORIES

TINY = SynthConfig(size=32, seed=0, n_train=2, n_test_good=1, n_test_per_defect=2)


def _files(root: Path) -> dict[str, bytes]:
    return {p.relative_to(root).as_posix(): p.read_bytes()
            for p in sorted(root.rglob("*")) if p.is_file()}


@pytest.fixture(scope="module")
def tiny_root(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return generate_dataset(tmp_path_factory.mktemp("synth") / "data", TINY)


def test_default_categories_are_known() -> None:
    # The default four, plus the photo tuning family's four, generated only when named.
    assert set(SYNTH_CATEGORIES) | set(PHOTO_CATEGORIES) == set(CATEGORY_DEFECTS)
    assert not set(SYNTH_CATEGORIES) & set(PHOTO_CATEGORIES)
    assert SynthConfig().categories == list(SYNTH_CATEGORIES)
    for defects in CATEGORY_DEFECTS.values():
        assert len(defects) >= 3


def test_public_names_are_reachable_from_the_data_package() -> None:
    import diffad_core.data as data
    import diffad_core.data.synth as package
    from diffad_core.data.synth import defects

    assert data.generate_dataset is package.generate_dataset is writer.generate_dataset
    assert data.paint_defects is package.paint_defects is defects.paint_defects


def test_layout_is_exactly_mvtec(tiny_root: Path) -> None:
    assert (tiny_root / "readme.txt").read_text().startswith("diffad synthetic")
    expected: set[str] = {"readme.txt"}
    for cat in SYNTH_CATEGORIES:
        expected |= {f"{cat}/{MARKER_NAME}", f"{cat}/train/good/000.png",
                     f"{cat}/train/good/001.png", f"{cat}/test/good/000.png"}
        for defect in CATEGORY_DEFECTS[cat]:
            for i in ("000", "001"):
                expected |= {f"{cat}/test/{defect}/{i}.png",
                             f"{cat}/ground_truth/{defect}/{i}_mask.png"}
    assert set(_files(tiny_root)) == expected
    assert not [p for p in tiny_root.iterdir() if p.name.startswith(".")]  # no temp leftovers

    for path in tiny_root.rglob("*.png"):
        with Image.open(path) as im:
            assert im.size == (32, 32), path
            cat = path.relative_to(tiny_root).parts[0]
            if path.name.endswith("_mask.png"):
                assert im.mode == "L", path
                values = np.unique(np.asarray(im))
                assert set(values.tolist()) <= {0, 255}, path
                assert 255 in values, f"empty mask {path}"
            elif cat == "bolt":
                assert im.mode == "L", f"grayscale category must be 1-channel: {path}"
            else:
                assert im.mode == "RGB", path


def test_files_match_the_renderer(tiny_root: Path) -> None:
    for cat in SYNTH_CATEGORIES:
        defect = CATEGORY_DEFECTS[cat][0]
        _, image, mask = writer._render_sample(cat, 32, 0, "test", defect, 1)
        assert mask is not None
        disk = np.asarray(Image.open(tiny_root / cat / "test" / defect / "001.png"))
        np.testing.assert_array_equal(disk, image.squeeze(-1) if image.shape[2] == 1 else image)
        disk_mask = np.asarray(Image.open(tiny_root / cat / "ground_truth" / defect / "001_mask.png"))
        np.testing.assert_array_equal(disk_mask, mask)


def test_same_seed_is_byte_identical_and_other_seed_differs(tmp_path: Path,
                                                            tiny_root: Path) -> None:
    cfg = TINY.model_copy(update={"categories": ["weave", "bolt"]})
    again = _files(generate_dataset(tmp_path / "a", cfg))
    first = _files(tiny_root)
    for name, blob in again.items():
        assert first[name] == blob, name
    other = _files(generate_dataset(tmp_path / "b", cfg.model_copy(update={"seed": 1})))
    pngs = [n for n in again if n.endswith(".png") and not n.endswith("_mask.png")]
    assert pngs and all(other[n] != again[n] for n in pngs)


@pytest.mark.parametrize("category", list(CATEGORY_DEFECTS))
def test_masks_are_exactly_the_changed_pixels(category: str) -> None:
    size = 64
    min_area = min_defect_area(size)
    for defect in CATEGORY_DEFECTS[category]:
        for index in range(3):
            clean, image, mask = writer._render_sample(category, size, 7, "test", defect, index)
            assert mask is not None and set(np.unique(mask).tolist()) <= {0, 255}
            inside = mask > 0
            changed = (clean != image).any(axis=-1)
            where = f"{category}/{defect}/{index}"
            assert inside.sum() >= min_area, where
            assert not (changed & ~inside).any(), f"pixels changed outside the mask: {where}"
            assert changed[inside].mean() >= 0.7, f"mask much larger than the change: {where}"
            if category in ("washer", "bolt") and defect != "bend":
                scene = scenes.CATEGORIES[category].render(
                    writer._rng(7, category, "test", defect, index), size)
                assert scene.fg[inside].mean() >= 0.9, f"defect off the object: {where}"


def test_good_samples_have_no_mask_and_train_matches_test_statistics() -> None:
    # The default four only: a photo texture's 48 px crops differ more (dark and bright parts).
    for cat in SYNTH_CATEGORIES:
        clean, image, mask = writer._render_sample(cat, 48, 0, "test", "good", 0)
        assert mask is None and clean is image
        train = np.stack([writer._render_sample(cat, 48, 0, "train", "good", i)[1]
                          for i in range(6)]).astype(np.float32)
        test = np.stack([writer._render_sample(cat, 48, 0, "test", "good", i)[1]
                         for i in range(6)]).astype(np.float32)
        assert abs(train.mean() - test.mean()) < 8.0, cat
        assert abs(train.std() - test.std()) < 8.0, cat
        assert not np.array_equal(train[0], train[1]), f"{cat}: normal images do not vary"


def test_golden_values() -> None:
    # Fixed seed, tiny size: guards against accidental changes of the generator.
    _, weave, _ = writer._render_sample("weave", 32, 0, "train", "good", 0)
    _, bolt, _ = writer._render_sample("bolt", 32, 0, "train", "good", 0)
    assert weave.shape == (32, 32, 3) and bolt.shape == (32, 32, 1)
    assert weave.mean() == pytest.approx(GOLDEN_WEAVE_MEAN, abs=0.5)
    assert bolt.mean() == pytest.approx(GOLDEN_BOLT_MEAN, abs=0.5)


GOLDEN_WEAVE_MEAN = 114.861
GOLDEN_BOLT_MEAN = 177.922


def test_counts_are_configurable(tmp_path: Path) -> None:
    cfg = SynthConfig(categories=["gravel"], size=24, n_train=3, n_test_good=2, n_test_per_defect=1)
    root = generate_dataset(tmp_path, cfg)
    assert len(list((root / "gravel/train/good").glob("*.png"))) == 3
    assert len(list((root / "gravel/test/good").glob("*.png"))) == 2
    for defect in CATEGORY_DEFECTS["gravel"]:
        assert [p.name for p in (root / "gravel/test" / defect).iterdir()] == ["000.png"]
        assert [p.name for p in (root / "gravel/ground_truth" / defect).iterdir()] == ["000_mask.png"]
    marker = json.loads((root / "gravel" / MARKER_NAME).read_text())
    assert marker["n_train"] == 3 and marker["size"] == 24


def _crash_after(monkeypatch: pytest.MonkeyPatch, n_ok: int) -> None:
    real = writer._render_sample
    calls = {"n": 0}

    def flaky(*args: object, **kwargs: object) -> object:
        calls["n"] += 1
        if calls["n"] > n_ok:
            raise RuntimeError("simulated crash")
        return real(*args, **kwargs)

    monkeypatch.setattr(writer, "_render_sample", flaky)


def test_crash_leaves_no_partial_category(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    cfg = SynthConfig(categories=["weave", "washer"], size=24, n_train=2, n_test_good=1,
                      n_test_per_defect=1)
    _crash_after(monkeypatch, 12)  # weave has 2 + 1 + 5 = 8 images; washer crashes midway
    with pytest.raises(RuntimeError, match="simulated crash"):
        generate_dataset(tmp_path, cfg)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["readme.txt", "weave"]
    assert (tmp_path / "weave" / MARKER_NAME).exists()
    monkeypatch.undo()

    # A crash while regenerating with another config keeps the old complete category.
    before = _files(tmp_path / "weave")
    _crash_after(monkeypatch, 3)
    with pytest.raises(RuntimeError, match="simulated crash"):
        generate_dataset(tmp_path, cfg.model_copy(update={"seed": 5, "categories": ["weave"]}))
    assert _files(tmp_path / "weave") == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["readme.txt", "weave"]


def test_rerun_is_a_noop_and_changed_config_regenerates(tmp_path: Path,
                                                        monkeypatch: pytest.MonkeyPatch) -> None:
    cfg = SynthConfig(categories=["bolt"], size=24, n_train=2, n_test_good=1, n_test_per_defect=1)
    generate_dataset(tmp_path, cfg)
    stats = {p: p.stat().st_mtime_ns for p in tmp_path.rglob("*")}
    _crash_after(monkeypatch, 0)  # any rendering at all would raise
    assert generate_dataset(tmp_path, cfg, progress=True) == tmp_path
    assert {p: p.stat().st_mtime_ns for p in tmp_path.rglob("*")} == stats
    monkeypatch.undo()

    old = _files(tmp_path / "bolt")
    generate_dataset(tmp_path, cfg.model_copy(update={"seed": 3}))
    new = _files(tmp_path / "bolt")
    assert set(new) == set(old) and new["train/good/000.png"] != old["train/good/000.png"]
    assert json.loads(new[MARKER_NAME])["seed"] == 3
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")]

    # A category folder without a marker (e.g. hand-made or from an older run) is regenerated.
    (tmp_path / "bolt" / MARKER_NAME).unlink()
    generate_dataset(tmp_path, cfg.model_copy(update={"seed": 3}))
    assert _files(tmp_path / "bolt") == new


def test_bad_config_is_rejected(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="unknown synthetic category 'bottle'"):
        generate_dataset(tmp_path, SynthConfig(categories=["weave", "bottle"]))
    with pytest.raises(ValueError, match="seed must be non-negative"):
        generate_dataset(tmp_path, SynthConfig(seed=-1))
    with pytest.raises(ValueError, match="size must be at least 16"):
        generate_dataset(tmp_path, SynthConfig(size=8))
    assert not (tmp_path / "weave").exists()



@pytest.mark.parametrize("size", [16, 48])
def test_tiny_images_always_get_a_defect(size: int) -> None:
    # The smoke preset renders at 48 px; 16 px is the smallest size allowed. The photo family
    # (drawn at 256 px) is checked down to 24 px: at 16 px the moon is too smooth for a bend.
    for category, defects in CATEGORY_DEFECTS.items():
        if category in PHOTO_CATEGORIES:
            size = max(size, 24)
        for defect in defects:
            for index in range(4):
                clean, image, mask = writer._render_sample(category, size, 2, "test", defect, index)
                assert mask is not None and (mask > 0).sum() >= 4
                assert ((clean != image).any(axis=-1) <= (mask > 0)).all()


def test_fainter_defects_keep_the_normal_images_and_blend_the_defects(tmp_path: Path) -> None:
    # synth.defect_contrast (bench/tune_cpu_faint_rule.md): the same training and normal test
    # images, every defect at c of its change, masks still the changed pixels.
    cfg = SynthConfig(size=48, seed=1, n_train=3, n_test_good=2, n_test_per_defect=3)
    full = _files(generate_dataset(tmp_path / "full", cfg))
    faint = _files(generate_dataset(tmp_path / "faint", cfg.model_copy(update={"defect_contrast": 0.35})))
    assert set(full) == set(faint)
    normal = [n for n in full if "/good/" in n]
    defective = [n for n in full if n.endswith(".png") and "/good/" not in n and "ground_truth" not in n]
    assert len(normal) == 4 * 5 and all(full[n] == faint[n] for n in normal)
    assert defective and all(full[n] != faint[n] for n in defective)
    assert json.loads(faint[f"weave/{MARKER_NAME}"])["defect_contrast"] == 0.35
    assert "defect_contrast" not in json.loads(full[f"weave/{MARKER_NAME}"])


@pytest.mark.parametrize("category", list(CATEGORY_DEFECTS))
def test_a_faint_defect_is_the_painted_one_at_that_contrast(category: str) -> None:
    c = 0.35
    blended = 0
    for defect in CATEGORY_DEFECTS[category]:
        for index in range(3):
            clean, strong, strong_mask = writer._render_sample(category, 64, 7, "test", defect, index)
            _, weak, weak_mask = writer._render_sample(category, 64, 7, "test", defect, index, c)
            inside = weak_mask > 0
            assert inside.sum() >= 4 and not ((clean != weak).any(axis=-1) & ~inside).any()
            change = clean.astype(np.float32) - weak
            assert np.abs(change).max() <= c * np.abs(clean.astype(np.float32) - strong).max() + 1.0
            if np.array_equal(inside, strong_mask > 0):  # the same draw (no redraw for either)
                expected = clean + c * (strong.astype(np.float32) - clean)
                assert np.abs(weak - expected)[inside].max() <= 1.0, f"{category}/{defect}/{index}"
                blended += 1
    assert blended >= len(CATEGORY_DEFECTS[category]) * 2  # most draws are compared pixel for pixel


def test_defect_contrast_is_range_checked_and_never_retrains() -> None:
    from diffad_core.config import load_config

    for bad in (0.0, -0.1, 1.5):
        with pytest.raises(ValueError, match="defect_contrast"):
            SynthConfig(defect_contrast=bad)
    base = load_config(preset="cpu-demo")
    faint = base.with_changes({"data": {"synth": {"defect_contrast": 0.35}}})
    assert faint.data.synth.defect_contrast == 0.35
    assert faint.model_hash() == base.model_hash()
