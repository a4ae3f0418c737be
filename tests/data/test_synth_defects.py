"""Tests for synthetic defects on arbitrary images (diffad_core/data/synth/defects.py)."""

from __future__ import annotations

import numpy as np
import pytest
from scipy import ndimage

from diffad_core.data.synth import scenes
from diffad_core.data.synth.defects import (
    ANY_IMAGE_DEFECTS,
    PAINTERS,
    min_defect_area,
    paint_defects,
)


def _batch(n: int, size: int, category: str = "weave", seed: int = 0) -> np.ndarray:
    """(n, C, size, size) float32 in [-1, 1]: normal synthetic scenes, as prepare_split gives."""
    rngs = [np.random.default_rng([seed, i]) for i in range(n)]
    images = np.stack([scenes.CATEGORIES[category].render(rng, size).image for rng in rngs])
    return (images.transpose(0, 3, 1, 2) * 2.0 - 1.0).astype(np.float32)


def _check(images: np.ndarray, out: np.ndarray, masks: np.ndarray) -> None:
    n, _, h, w = images.shape
    assert out.shape == images.shape and out.dtype == np.float32
    assert masks.shape == (n, h, w) and masks.dtype == np.uint8
    assert set(np.unique(masks).tolist()) <= {0, 1}
    changed = (out != images).any(axis=1)
    np.testing.assert_array_equal(changed, masks.astype(bool))
    assert (masks.reshape(n, -1).sum(axis=1) >= min_defect_area(min(h, w))).all()
    assert out.min() >= -1.0 and out.max() <= 1.0


def test_default_kinds_masks_are_exactly_the_changed_pixels() -> None:
    images = _batch(10, 64)
    before = images.copy()
    out, masks = paint_defects(images, seed=3)
    np.testing.assert_array_equal(images, before)  # the input is not modified
    assert not np.shares_memory(out, images)
    _check(images, out, masks)
    # A pixel counts only if it moved by at least one grey level (2/255 in [-1, 1]).
    moved = np.abs(out - images).max(axis=1)
    assert (moved[masks > 0] >= 2.0 / 255.0 - 1e-6).all()


def test_same_seed_same_result_other_seed_differs() -> None:
    images = _batch(5, 32, "gravel")
    out, masks = paint_defects(images, seed=11)
    again, masks_again = paint_defects(images, seed=11)
    np.testing.assert_array_equal(out, again)
    np.testing.assert_array_equal(masks, masks_again)
    other, other_masks = paint_defects(images, seed=12)
    assert not np.array_equal(other_masks, masks) and not np.array_equal(other, out)


@pytest.mark.parametrize("kind", sorted(PAINTERS))
@pytest.mark.parametrize("shape", [(16, 16), (48, 48), (24, 40)])
def test_every_kind_on_any_size(kind: str, shape: tuple[int, int]) -> None:
    textured = np.ascontiguousarray(_batch(3, max(shape))[:, :, :shape[0], :shape[1]])
    _check(textured, *paint_defects(textured, seed=5, kinds=(kind,)))
    flat = np.full((2, 3) + shape, 0.2, np.float32)
    if kind in ("bend", "blur"):  # nothing to deform or smooth on a uniform image
        with pytest.raises(RuntimeError, match=f"could not paint a '{kind}' defect"):
            paint_defects(flat, seed=5, kinds=(kind,))
    else:  # every other kind changes even a uniform image
        _check(flat, *paint_defects(flat, seed=5, kinds=(kind,)))


def test_kinds_are_used_in_turn() -> None:
    images = _batch(4, 32)
    mixed, mixed_masks = paint_defects(images, seed=2, kinds=("scratch", "hole"))
    for i, kind in enumerate(["scratch", "hole", "scratch", "hole"]):
        alone, alone_masks = paint_defects(images, seed=2, kinds=(kind,))
        np.testing.assert_array_equal(mixed[i], alone[i])
        np.testing.assert_array_equal(mixed_masks[i], alone_masks[i])
    assert set(ANY_IMAGE_DEFECTS) <= set(PAINTERS)


def test_grayscale_and_single_image_batches() -> None:
    gray = _batch(3, 32, "bolt")
    assert gray.shape[1] == 1
    _check(gray, *paint_defects(gray, seed=0))
    one = _batch(1, 32)
    _check(one, *paint_defects(one, seed=0, kinds=("patch",)))


def test_bad_arguments_are_rejected() -> None:
    images = _batch(2, 16)
    with pytest.raises(ValueError, match="must be"):
        paint_defects(images[0], seed=0)
    with pytest.raises(ValueError, match="must be"):
        paint_defects(np.zeros((2, 2, 16, 16), np.float32), seed=0)
    with pytest.raises(ValueError, match="kinds"):
        paint_defects(images, seed=0, kinds=("dent",))
    with pytest.raises(ValueError, match="kinds"):
        paint_defects(images, seed=0, kinds=())
    with pytest.raises(ValueError, match="seed"):
        paint_defects(images, seed=-1)


def test_blur_smooths_the_texture_it_covers() -> None:
    # The smoothing painter (bench/tune_cpu_twosided_rule.md): inside its masks the fine detail
    # is gone (neighbouring pixels differ far less than before).
    images = _batch(6, 64, "gravel")
    out, masks = paint_defects(images, seed=4, kinds=("blur",))
    _check(images, out, masks)
    pairs = masks[..., 1:].astype(bool) & masks[..., :-1].astype(bool)  # horizontal neighbours inside
    detail_before, detail_after = (np.abs(np.diff(x, axis=-1)).max(axis=1)[pairs].mean() for x in (images, out))
    assert pairs.sum() >= 50 and detail_after < 0.7 * detail_before
