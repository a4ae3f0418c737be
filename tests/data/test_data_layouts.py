"""Readers for the MVTec-AD, BTAD and generic folder layouts; image and mask decoding."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from data_builders import build_btad, build_mvtec, write_image, write_mask
from PIL import Image

from diffad_core.data import (
    DatasetLayoutError,
    ImageReadError,
    MaskSizeError,
    list_categories,
    list_samples,
    load_image,
    load_mask,
)


def test_mvtec_layout(mvtec_root: Path) -> None:
    (mvtec_root / "not_a_category").mkdir()  # no train/: ignored, like readme.txt
    assert list_categories(mvtec_root, "mvtec") == ["bottle", "grid"]
    samples = list_samples(mvtec_root, "mvtec", "bottle")
    assert [s.rel_path for s in samples] == [
        "bottle/train/good/000.png", "bottle/train/good/001.png", "bottle/train/good/002.png",
        "bottle/test/broken/000.png", "bottle/test/crack/000.png", "bottle/test/good/000.png",
    ]
    test = list_samples(mvtec_root, "mvtec", "bottle", "test")
    assert [(s.defect_type, s.label) for s in test] == [("broken", 1), ("crack", 1), ("good", 0)]
    assert test[0].mask_path == mvtec_root / "bottle/ground_truth/broken/000_mask.png"
    assert test[2].mask_path is None
    assert all(s.split == "train" and s.label == 0 and s.mask_path is None
               for s in list_samples(mvtec_root, "mvtec", "bottle", "train"))


def test_folder_and_synthetic_read_as_mvtec(mvtec_root: Path) -> None:
    ref = list_samples(mvtec_root, "mvtec", "grid")
    assert list_samples(mvtec_root, "folder", "grid") == ref
    assert list_samples(mvtec_root, "synthetic", "grid") == ref
    assert list_categories(mvtec_root, "folder") == ["bottle", "grid"]


def test_btad_layout(tmp_path: Path) -> None:
    root = build_btad(tmp_path / "btad")
    assert list_categories(root, "btad") == ["01", "03"]
    samples = list_samples(root, "btad", "03")
    got = [(s.split, s.defect_type, s.label, s.rel_path, s.mask_path and s.mask_path.name)
           for s in samples]
    assert got == [
        ("train", "good", 0, "03/train/ok/0000.bmp", None),
        ("train", "good", 0, "03/train/ok/0001.png", None),
        ("test", "ko", 1, "03/test/ko/0000.bmp", "0000.png"),
        ("test", "ko", 1, "03/test/ko/0001.png", "0001.bmp"),
        ("test", "good", 0, "03/test/ok/0000.bmp", None),
    ]
    assert load_image(samples[0].image_path).shape == (8, 8, 3)
    assert load_mask(samples[3].mask_path, None).sum() == 9


def test_layout_errors(mvtec_root: Path, tmp_path: Path) -> None:
    with pytest.raises(DatasetLayoutError, match="unknown category 'cable'.*bottle, grid"):
        list_samples(mvtec_root, "mvtec", "cable")
    with pytest.raises(DatasetLayoutError, match="unknown dataset kind"):
        list_categories(mvtec_root, "kitti")
    with pytest.raises(DatasetLayoutError, match="does not exist"):
        list_categories(tmp_path / "nowhere", "mvtec")


def test_grayscale_rgba_palette_become_rgb(tmp_path: Path) -> None:
    gray = load_image(write_image(tmp_path / "g.png", 51, mode="L"))
    assert gray.shape == (8, 8, 3) and gray.dtype == np.float32
    assert np.allclose(gray[1, 1], 51 / 255) and np.array_equal(gray[..., 0], gray[..., 2])
    rgba = load_image(write_image(tmp_path / "a.png", (10, 20, 30, 0), mode="RGBA"))
    assert rgba.shape == (8, 8, 3) and np.allclose(rgba[1, 1] * 255, [10, 20, 30])
    Image.new("P", (4, 4), 0).save(tmp_path / "p.png")
    assert load_image(tmp_path / "p.png").shape == (4, 4, 3)


def test_16bit_scaled_by_65535(tmp_path: Path) -> None:
    arr = np.full((6, 6), 32768, dtype=np.uint16)
    arr[0, 0] = 65535
    Image.fromarray(arr).save(tmp_path / "d.png")
    img = load_image(tmp_path / "d.png")
    assert img[0, 0, 0] == pytest.approx(1.0)
    assert img[3, 3, 1] == pytest.approx(32768 / 65535)
    resized = load_image(tmp_path / "d.png", 12)
    assert resized.shape == (12, 12, 3) and 0.0 <= resized.min() and resized.max() <= 1.0
    assert resized[8, 8, 0] == pytest.approx(32768 / 65535, abs=1e-4)


def test_resize_and_masks(tmp_path: Path) -> None:
    img = load_image(write_image(tmp_path / "i.png", 128, size=16), 8)
    assert img.shape == (8, 8, 3) and np.allclose(img[4, 4], 128 / 255)
    m = np.zeros((16, 16), np.uint8)
    m[4:12, 8:16] = 1  # value 1 counts as anomalous (> 0)
    Image.fromarray(m).save(tmp_path / "m.png")
    mask = load_mask(tmp_path / "m.png", 8)
    expected = np.zeros((8, 8), np.uint8)
    expected[2:6, 4:8] = 1
    assert mask.dtype == np.uint8 and np.array_equal(mask, expected)
    rgb = np.zeros((8, 8, 3), np.uint8)
    rgb[1, 1, 2] = 200
    Image.fromarray(rgb).save(tmp_path / "rgb_mask.png")
    assert load_mask(tmp_path / "rgb_mask.png", None).sum() == 1
    assert load_mask(None, 5).shape == (5, 5) and load_mask(None, 5).sum() == 0
    assert load_mask(None, None, like_image=tmp_path / "i.png").shape == (16, 16)


def test_truncated_and_mismatched(tmp_path: Path) -> None:
    good = write_image(tmp_path / "ok.png", 10, size=32)
    data = good.read_bytes()
    (tmp_path / "cut.png").write_bytes(data[: len(data) // 2])
    with pytest.raises(ImageReadError, match="cut.png"):
        load_image(tmp_path / "cut.png")
    (tmp_path / "junk.png").write_text("not an image")
    with pytest.raises(ImageReadError, match="junk.png: not a readable image"):
        load_image(tmp_path / "junk.png")
    with pytest.raises(ImageReadError, match="does not exist"):
        load_image(tmp_path / "missing.png")
    mask = write_mask(tmp_path / "m.png", size=16)
    with pytest.raises(MaskSizeError, match="m.png: mask is 16x16 but its image .*ok.png is 32x32"):
        load_mask(mask, None, like_image=good)


def test_mvtec_builder_sizes_are_consistent(tmp_path: Path) -> None:
    root = build_mvtec(tmp_path / "m", categories=("a",), size=12)
    for s in list_samples(root, "mvtec", "a", "test"):
        if s.mask_path is not None:
            assert load_mask(s.mask_path, None, like_image=s.image_path).shape == (12, 12)
