"""The photo tuning family: four synthetic-generator categories cut from other photographs
(diffad_core/data/synth/photos.py, bench/tune_cpu_photo_rule.md)."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from diffad_core.config import SynthConfig
from diffad_core.data import verify_dataset
from diffad_core.data.heldout import CATEGORIES as HELDOUT_CATEGORIES
from diffad_core.data.synth import (ANY_IMAGE_DEFECTS, CATEGORY_CHANNELS, CATEGORY_DEFECTS,
                                    generate_dataset, writer)
from diffad_core.data.synth.photos import PHOTO_CATEGORIES, _photo

PHOTOS = {"moon": "moon", "tissue": "immunohistochemistry", "cameraman": "camera", "retina": "retina"}


def _normal(category: str, index: int, size: int = 64) -> np.ndarray:
    return writer._render_sample(category, size, 0, "train", "good", index)[1].astype(np.float32)


def test_other_photographs_than_the_held_out_family_loaded_offline() -> None:
    assert set(PHOTO_CATEGORIES) == set(PHOTOS)
    assert not set(PHOTOS.values()) & {spec.photo for spec in HELDOUT_CATEGORIES.values()}
    for name in PHOTOS.values():
        photo = _photo(name)  # from the scikit-image wheel: no network on this machine
        assert photo.shape[:2] == (512, 512) and photo.dtype == np.float32
        assert 0.0 <= photo.min() and photo.max() <= 1.0
    assert {c: CATEGORY_CHANNELS[c] for c in PHOTOS} == {"moon": 1, "tissue": 3, "cameraman": 1, "retina": 3}
    assert all(set(CATEGORY_DEFECTS[c]) == set(ANY_IMAGE_DEFECTS) for c in PHOTOS)


def test_written_family_verifies_with_one_and_three_channel_images(tmp_path: Path) -> None:
    cfg = SynthConfig(categories=list(PHOTOS), size=48, seed=1, n_train=3, n_test_good=2,
                      n_test_per_defect=1)
    root = generate_dataset(tmp_path / "photo", cfg)
    report = verify_dataset(root, "folder")
    assert report.ok, report.problems
    assert report.categories == sorted(PHOTOS)
    for category, counts in report.counts.items():
        assert counts.train_good == 3 and counts.test_good == 2 and counts.masks == len(ANY_IMAGE_DEFECTS)
        with Image.open(root / category / "train" / "good" / "000.png") as im:
            assert im.mode == ("L" if CATEGORY_CHANNELS[category] == 1 else "RGB"), category


def test_objects_keep_their_framing_and_textures_do_not() -> None:
    def correlation(a: np.ndarray, b: np.ndarray) -> float:
        return float(np.corrcoef(a.ravel(), b.ravel())[0, 1])

    for category in ("cameraman", "retina"):  # the same framing, shifted a few %, turned 2 deg
        views = [_normal(category, i) for i in range(4)]
        assert min(correlation(views[0], v) for v in views[1:]) > 0.8, category
    for category in ("moon", "tissue"):  # crops from anywhere in the photo
        views = [_normal(category, i) for i in range(4)]
        assert max(correlation(views[0], v) for v in views[1:]) < 0.6, category


@pytest.mark.parametrize("category", list(PHOTOS))
def test_normal_images_vary_in_brightness_within_bounds(category: str) -> None:
    means = [_normal(category, i).mean() for i in range(8)]
    assert np.ptp(means) > 0.5  # grey levels: jittered, not copies
    for i in range(2):
        image = _normal(category, i)
        assert 0 <= image.min() and image.max() <= 255 and image.std() > 5, category


def test_golden_values() -> None:
    # Fixed seed, tiny size: guards the photo family against accidental changes.
    got = {c: round(float(_normal(c, 0, 32).mean()), 3) for c in PHOTOS}
    assert got == pytest.approx(GOLDEN_MEANS, abs=0.5), got


GOLDEN_MEANS = {"moon": 102.418, "tissue": 149.75, "cameraman": 125.499, "retina": 105.594}
