"""Tests for diffad_core.metrics against scikit-learn and an independent PRO reference."""

from __future__ import annotations

import bisect

import numpy as np
import pytest
import torch
from scipy import ndimage
from sklearn.metrics import roc_auc_score

from diffad_core.metrics import image_auroc, pixel_auroc, pro_score


# --------------------------------------------------------------------------------------------
# Independent reference for PRO, written to mirror the official MVTec AD evaluation semantics
# step by step (slow: one pass over all pixels per distinct threshold).
# --------------------------------------------------------------------------------------------
def _reference_pro(maps: np.ndarray, masks: np.ndarray, fpr_limit: float) -> float:
    structure = np.ones((3, 3), dtype=int)  # 8-connectivity
    regions: list[np.ndarray] = []  # the scores inside each GT region, pooled over images
    ok_scores: list[np.ndarray] = []
    for amap, gt in zip(maps, masks):
        labeled, n = ndimage.label(gt > 0, structure)
        ok_scores.append(amap[labeled == 0])
        for k in range(1, n + 1):
            regions.append(amap[labeled == k])
    ok = np.concatenate(ok_scores)

    fprs, pros = [0.0], [0.0]
    for t in sorted(set(maps.ravel().tolist()), reverse=True):  # every distinct score
        fprs.append(min(float(np.sum(ok >= t)) / ok.size, 1.0))
        pros.append(min(float(np.mean([np.mean(r >= t) for r in regions])), 1.0))
    fprs.append(1.0)
    pros.append(1.0)

    # Trapezoid rule up to the limit; linear interpolation when the limit is not a curve point.
    correction = 0.0
    if fpr_limit not in fprs:
        ins = bisect.bisect_right(fprs, fpr_limit)
        x0, x1, y0, y1 = fprs[ins - 1], fprs[ins], pros[ins - 1], pros[ins]
        y_at_limit = y0 + (y1 - y0) * (fpr_limit - x0) / (x1 - x0)
        correction = 0.5 * (y_at_limit + y0) * (fpr_limit - x0)
    xs = [x for x in fprs if x <= fpr_limit]
    ys = pros[: len(xs)]
    area = sum(0.5 * (ys[i] + ys[i + 1]) * (xs[i + 1] - xs[i]) for i in range(len(xs) - 1))
    return (area + correction) / fpr_limit


def _random_masks(rng: np.random.Generator, n: int, h: int, w: int) -> np.ndarray:
    """Masks mixing blobs, single pixels, diagonal chains, all-normal and huge regions."""
    masks = np.zeros((n, h, w), dtype=np.uint8)
    for i in range(n):
        kind = rng.integers(0, 6)
        if kind == 0:
            continue  # all-normal image
        if kind == 1:  # huge region: most of the image
            masks[i, 1:, : w - 1] = 1
            continue
        for _ in range(rng.integers(1, 4)):
            shape = rng.integers(0, 3)
            y, x = int(rng.integers(0, h)), int(rng.integers(0, w))
            if shape == 0:  # one pixel
                masks[i, y, x] = 1
            elif shape == 1:  # rectangle
                masks[i, y : y + int(rng.integers(1, 5)), x : x + int(rng.integers(1, 5))] = 255
            else:  # diagonal chain: one region only under 8-connectivity
                for d in range(int(rng.integers(2, 5))):
                    if y + d < h and x + d < w:
                        masks[i, y + d, x + d] = 1
    if not masks.any():
        masks[0, 0, 0] = 1
    return masks


def _random_maps(rng: np.random.Generator, masks: np.ndarray, quantise: bool) -> np.ndarray:
    maps = rng.normal(size=masks.shape) + rng.uniform(0.0, 2.0) * (masks > 0)
    if quantise:  # many ties, also between normal and anomalous pixels
        maps = np.round(maps * rng.integers(1, 4)) / 3.0
    return maps.astype(np.float64)


# --------------------------------------------------------------------------------------------
# PRO
# --------------------------------------------------------------------------------------------
@pytest.mark.parametrize("seed", range(60))
def test_pro_matches_reference_on_random_inputs(seed: int) -> None:
    rng = np.random.default_rng(seed)
    n, h, w = int(rng.integers(1, 5)), int(rng.integers(4, 11)), int(rng.integers(4, 11))
    masks = _random_masks(rng, n, h, w)
    if (masks == 0).sum() == 0:
        masks[0, 0, 0] = 0
    maps = _random_maps(rng, masks, quantise=seed % 2 == 0)
    for limit in (0.3, 0.05, 1.0, float(rng.uniform(0.01, 0.99))):
        assert pro_score(maps, masks, limit) == pytest.approx(_reference_pro(maps, masks, limit), abs=1e-6)


def test_pro_hand_computed_with_diagonal_region() -> None:
    # (0,0), (1,1), (1,2) form ONE region of 3 pixels under 8-connectivity (two under 4).
    maps = np.array([[[0.9, 0.1, 0.2, 0.3], [0.4, 0.5, 0.6, 0.7]]])
    masks = np.array([[[1, 0, 0, 0], [0, 1, 1, 0]]], dtype=np.uint8)
    # Curve: (0,0) (0,1/3) (0.2,1/3) (0.2,2/3) (0.2,1) (0.4,1) ... ; area to 0.3 = 0.2/3 + 0.1.
    assert pro_score(maps, masks, 0.3) == pytest.approx((0.2 / 3 + 0.1) / 0.3, abs=1e-12)
    # Limit exactly on the vertical segment at FPR 0.2.
    assert pro_score(maps, masks, 0.2) == pytest.approx(1 / 3, abs=1e-12)
    assert pro_score(maps, masks, 0.2) == pytest.approx(_reference_pro(maps, masks, 0.2), abs=1e-12)


def test_pro_limit_exactly_on_curve_point() -> None:
    # 10 normal pixels: FPR steps of 0.1, so 0.3 is a curve point.
    maps = np.arange(12, dtype=np.float64).reshape(1, 3, 4)
    masks = np.zeros((1, 3, 4), dtype=np.uint8)
    masks[0, 2, 2:] = 1  # the region holds scores 10 and 11 (the top two)
    assert pro_score(maps, masks, 0.3) == pytest.approx(1.0, abs=1e-12)
    masks = np.zeros((1, 3, 4), dtype=np.uint8)
    masks[0, 0, 0] = masks[0, 2, 3] = 1  # regions {0} and {11}: PRO 0.5 until FPR 1
    assert pro_score(maps, masks, 0.3) == pytest.approx(0.5, abs=1e-12)
    assert pro_score(maps, masks, 0.3) == pytest.approx(_reference_pro(maps, masks, 0.3), abs=1e-12)


def test_pro_limit_on_curve_point_where_float_floor_is_low() -> None:
    # 22 normal pixels and limit 15/22: floor(limit * 22) is 14 in floating point.
    rng = np.random.default_rng(21)
    maps = rng.permutation(24).astype(np.float64).reshape(1, 4, 6)
    masks = np.zeros((1, 4, 6), dtype=np.uint8)
    masks[0, 1, 1] = masks[0, 3, 5] = 1
    limit = 15 / 22
    assert int(np.floor(limit * 22)) == 14
    assert pro_score(maps, masks, limit) == pytest.approx(_reference_pro(maps, masks, limit), abs=1e-12)


@pytest.mark.parametrize("limit", [0.3, 0.1, 1.0])
def test_pro_constant_map_is_half_the_limit_area(limit: float) -> None:
    masks = _random_masks(np.random.default_rng(3), 4, 16, 16)
    maps = np.full(masks.shape, 0.25, dtype=np.float32)
    assert pro_score(maps, masks, limit) == pytest.approx(limit / 2, abs=1e-12)
    assert pro_score(maps, masks) == pytest.approx(0.15, abs=1e-12)


def test_pro_perfect_and_inverted_maps() -> None:
    masks = _random_masks(np.random.default_rng(5), 3, 12, 12)
    assert pro_score(masks.astype(np.float64), masks) == pytest.approx(1.0, abs=1e-12)
    assert pro_score(-(masks > 0).astype(np.float64), masks) == pytest.approx(0.0, abs=1e-12)


def test_pro_one_pixel_and_huge_regions_weigh_equally() -> None:
    maps = np.zeros((2, 8, 8))
    masks = np.zeros((2, 8, 8), dtype=np.uint8)
    masks[0, 3, 3] = 1  # one pixel, detected
    maps[0, 3, 3] = 5.0
    masks[1, :, :6] = 1  # 48 pixels, missed (score 0 like the 16 + 63 normal pixels)
    # Curve (0,0) (0,0.5) (1,1): the big region and all normal pixels join at the last
    # threshold, so PRO rises linearly from 0.5 to 1; its mean over [0, 0.3] is 0.575.
    assert pro_score(maps, masks) == pytest.approx(0.575, abs=1e-12)
    assert pro_score(maps, masks) == pytest.approx(_reference_pro(maps, masks, 0.3), abs=1e-12)


def test_pro_invariant_to_monotone_transform_and_mask_scale() -> None:
    rng = np.random.default_rng(11)
    masks = _random_masks(rng, 5, 20, 20)
    maps = _random_maps(rng, masks, quantise=False)
    base = pro_score(maps, masks)
    assert pro_score(np.exp(maps), (masks > 0) * 255) == pytest.approx(base, abs=1e-12)
    assert pro_score(maps, masks.astype(bool)) == pytest.approx(base, abs=1e-12)


def test_pro_larger_input_matches_reference() -> None:
    # Big enough that the FPR-limit truncation drops most normal pixels.
    rng = np.random.default_rng(42)
    masks = _random_masks(rng, 6, 24, 24)
    maps = _random_maps(rng, masks, quantise=False).astype(np.float32)
    assert pro_score(maps, masks) == pytest.approx(_reference_pro(maps, masks, 0.3), abs=1e-6)


# --------------------------------------------------------------------------------------------
# AUROC
# --------------------------------------------------------------------------------------------
@pytest.mark.parametrize("seed", range(20))
def test_pixel_auroc_matches_sklearn(seed: int) -> None:
    rng = np.random.default_rng(seed)
    masks = _random_masks(rng, int(rng.integers(1, 6)), 16, 16)
    if (masks == 0).sum() == 0:
        masks[0, 0, 0] = 0
    maps = _random_maps(rng, masks, quantise=seed % 2 == 0)
    expected = roc_auc_score((masks > 0).ravel(), maps.ravel())
    assert abs(pixel_auroc(maps, masks) - expected) < 1e-9


def test_pixel_auroc_more_positives_than_negatives_and_ties() -> None:
    rng = np.random.default_rng(7)
    masks = (rng.random((3, 10, 10)) < 0.8).astype(np.uint8) * 255
    maps = rng.integers(0, 4, size=masks.shape).astype(np.float32)
    expected = roc_auc_score((masks > 0).ravel(), maps.ravel())
    assert abs(pixel_auroc(maps, masks) - expected) < 1e-9


def test_pixel_auroc_torch_inputs_any_dtype() -> None:
    rng = np.random.default_rng(8)
    masks = _random_masks(rng, 3, 12, 12)
    maps = rng.normal(size=masks.shape).astype(np.float16)
    expected = roc_auc_score((masks > 0).ravel(), maps.astype(np.float32).ravel())
    assert abs(pixel_auroc(torch.from_numpy(maps), torch.from_numpy(masks)) - expected) < 1e-9
    t16 = torch.from_numpy(maps.astype(np.float32)).to(torch.bfloat16)
    expected_bf = roc_auc_score((masks > 0).ravel(), t16.float().numpy().ravel())
    assert abs(pixel_auroc(t16, torch.from_numpy(masks).bool()) - expected_bf) < 1e-9
    assert pro_score(torch.from_numpy(maps), torch.from_numpy(masks)) == pytest.approx(
        pro_score(maps.astype(np.float32), masks), abs=1e-12
    )


@pytest.mark.parametrize("seed", range(10))
def test_image_auroc_matches_sklearn(seed: int) -> None:
    rng = np.random.default_rng(100 + seed)
    n = int(rng.integers(2, 40))
    labels = rng.integers(0, 2, size=n)
    labels[0], labels[1] = 0, 1
    scores = rng.normal(size=n) + labels
    if seed % 2:
        scores = np.round(scores)
    expected = roc_auc_score(labels, scores)
    assert abs(image_auroc(scores, labels) - expected) < 1e-9
    assert abs(image_auroc(torch.tensor(scores), torch.tensor(labels).bool()) - expected) < 1e-9


def test_auroc_golden_values() -> None:
    assert image_auroc([0.1, 0.4, 0.35, 0.8], [0, 0, 1, 1]) == pytest.approx(0.75)
    assert image_auroc([1.0, 1.0, 1.0], [0, 1, 1]) == pytest.approx(0.5)
    assert pixel_auroc(np.array([[[0.0, 1.0]]]), np.array([[[0, 255]]])) == pytest.approx(1.0)
    assert pixel_auroc(np.array([[[1.0, 0.0]]]), np.array([[[0, 1]]])) == pytest.approx(0.0)


# --------------------------------------------------------------------------------------------
# Errors
# --------------------------------------------------------------------------------------------
@pytest.mark.parametrize("metric", [pixel_auroc, pro_score])
def test_map_metric_errors(metric) -> None:
    maps = np.zeros((2, 4, 4))
    masks = np.zeros((2, 4, 4), dtype=np.uint8)
    masks[0, 0, 0] = 1
    with pytest.raises(ValueError, match=r"shape mismatch.*\(2, 4, 4\).*\(2, 4, 5\)"):
        metric(maps, np.zeros((2, 4, 5)))
    with pytest.raises(ValueError, match=r"3-D.*\(4, 4\)"):
        metric(maps[0], masks[0])
    with pytest.raises(ValueError, match="empty"):
        metric(np.zeros((0, 4, 4)), np.zeros((0, 4, 4)))
    bad = maps.copy()
    bad[1, 2, 2] = np.nan
    with pytest.raises(ValueError, match="1 NaN"):
        metric(bad, masks)
    bad[1, 2, 2] = np.inf
    with pytest.raises(ValueError, match="1 infinite"):
        metric(bad, masks)
    with pytest.raises(ValueError, match="no anomalous pixel"):
        metric(maps, np.zeros_like(masks))
    with pytest.raises(ValueError, match="no normal pixel"):
        metric(maps, np.ones_like(masks))


def test_pro_limit_errors() -> None:
    maps, masks = np.zeros((1, 2, 2)), np.array([[[1, 0], [0, 0]]])
    for limit in (0.0, -0.1, 1.5, float("nan"), "0.3"):
        with pytest.raises(ValueError, match="fpr_limit"):
            pro_score(maps, masks, limit)  # type: ignore[arg-type]


def test_image_auroc_errors() -> None:
    with pytest.raises(ValueError, match="only one class"):
        image_auroc([0.1, 0.2], [1, 1])
    with pytest.raises(ValueError, match="only one class"):
        image_auroc([0.1, 0.2], [0, 0])
    with pytest.raises(ValueError, match="shape mismatch"):
        image_auroc([0.1, 0.2, 0.3], [0, 1])
    with pytest.raises(ValueError, match=r"labels.*0 \(normal\) or 1"):
        image_auroc([0.1, 0.2, 0.3], [0, 1, 2])
    with pytest.raises(ValueError, match="NaN"):
        image_auroc([0.1, float("nan")], [0, 1])
    with pytest.raises(ValueError, match="1-D"):
        image_auroc([[0.1, 0.2]], [[0, 1]])
    with pytest.raises(ValueError, match="empty"):
        image_auroc([], [])
