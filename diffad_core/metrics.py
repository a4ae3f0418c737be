"""Evaluation metrics with MVTec AD's official definitions (METHOD.md §5).

- :func:`pixel_auroc`: ROC AUC over every pixel of every test image.
- :func:`pro_score`: normalised area under the per-region-overlap curve up to an FPR limit.
- :func:`image_auroc`: ROC AUC of the image scores.

Inputs may be numpy arrays or torch tensors (moved to CPU, any float dtype incl. float16 and
bfloat16). Masks are binary or 0/255: anything > 0 is anomalous. torch is never imported here.
"""

from __future__ import annotations

from typing import Any

import numpy as np
from scipy import ndimage

__all__ = ["pixel_auroc", "pro_score", "image_auroc"]

# 8-connectivity inside each image, no connectivity across images of the (N, H, W) stack.
_STRUCTURE_8_PER_IMAGE = np.zeros((3, 3, 3), dtype=bool)
_STRUCTURE_8_PER_IMAGE[1] = True


def _to_numpy(x: Any, name: str) -> np.ndarray:
    """Convert a numpy array, torch tensor or nested sequence to a numpy array."""
    if hasattr(x, "detach") and hasattr(x, "cpu") and hasattr(x, "numpy"):
        x = x.detach().cpu()
        if str(x.dtype) == "torch.bfloat16":  # numpy has no bfloat16; float32 holds it exactly
            x = x.float()
        return x.numpy()
    try:
        return np.asarray(x)
    except (ValueError, TypeError) as exc:
        raise ValueError(f"{name}: cannot convert to an array ({exc})") from exc


def _as_scores(x: Any, name: str, ndim: int) -> np.ndarray:
    """Validate real-valued scores: `ndim` dimensions, non-empty, finite.

    float16 is widened to float32 and bool to uint8 (both exact), so ties and order are kept.
    """
    a = _to_numpy(x, name)
    if a.ndim != ndim:
        want = "(N, H, W)" if ndim == 3 else "(N,)"
        raise ValueError(f"{name}: expected a {ndim}-D array {want}, got shape {a.shape}")
    if a.size == 0:
        raise ValueError(f"{name}: empty input (shape {a.shape})")
    kind = a.dtype.kind
    if kind == "b":
        a = a.astype(np.uint8)
    elif kind == "f":
        if a.dtype.itemsize < 4:
            a = a.astype(np.float32)
        bad = ~np.isfinite(a)
        if bad.any():
            n_nan = int(np.isnan(a).sum())
            raise ValueError(
                f"{name}: {n_nan} NaN and {int(bad.sum()) - n_nan} infinite values "
                f"(shape {a.shape}); scores must be finite"
            )
    elif kind not in "iu":
        raise ValueError(f"{name}: scores must be real numbers, got dtype {a.dtype}")
    return a


def _as_masks(x: Any, name: str, like: np.ndarray, like_name: str) -> np.ndarray:
    """Validate ground-truth masks of the same shape as `like`; returns a bool array (> 0)."""
    m = _to_numpy(x, name)
    if m.shape != like.shape:
        raise ValueError(f"shape mismatch: {like_name} has shape {like.shape}, {name} has shape {m.shape}")
    if m.dtype.kind not in "biuf":
        raise ValueError(f"{name}: masks must be numeric or bool, got dtype {m.dtype}")
    if m.dtype.kind == "f" and not np.isfinite(m).all():
        raise ValueError(f"{name}: contains NaN or infinite values (shape {m.shape})")
    return m > 0


def _check_both_classes(n_pos: int, n_neg: int, what: str, shape: tuple[int, ...]) -> None:
    if n_pos == 0:
        raise ValueError(f"no anomalous {what} (all {n_neg} are normal, shape {shape}): metric undefined")
    if n_neg == 0:
        raise ValueError(f"no normal {what} (all {n_pos} are anomalous, shape {shape}): metric undefined")


def _auroc(scores: np.ndarray, positive: np.ndarray) -> float:
    """Exact ROC AUC with ties counted one half (Mann-Whitney U / (P * N)).

    U = sum over positives p of (#negatives < p + 0.5 * #negatives == p). Only the larger class
    is sorted; the smaller one is sorted too and looked up with two binary searches. Equals the
    trapezoidal area under the ROC curve over all distinct thresholds.
    """
    pos = scores[positive]
    neg = scores[~positive]
    n_pos, n_neg = pos.size, neg.size
    if n_pos <= n_neg:
        ref, query = np.sort(neg), np.sort(pos)
    else:
        ref, query = np.sort(pos), np.sort(neg)
    below = np.searchsorted(ref, query, side="left").sum(dtype=np.int64)
    below_or_equal = np.searchsorted(ref, query, side="right").sum(dtype=np.int64)
    twice_u = int(below) + int(below_or_equal)  # 2 * (#ref < q + 0.5 #ref == q), summed
    if n_pos > n_neg:  # the sum counted positives below negatives: U = P*N - that
        twice_u = 2 * n_pos * n_neg - twice_u
    return twice_u / (2.0 * n_pos * n_neg)


def pixel_auroc(maps: Any, masks: Any) -> float:
    """Pixel-level ROC AUC over all pixels of all images.

    maps: (N, H, W) anomaly scores; masks: (N, H, W) ground truth (> 0 anomalous).
    Raises ValueError on bad shapes, non-finite scores, or when one class is absent.
    """
    a = _as_scores(maps, "maps", 3)
    m = _as_masks(masks, "masks", a, "maps")
    flat_m = m.reshape(-1)
    n_pos = int(np.count_nonzero(flat_m))
    _check_both_classes(n_pos, flat_m.size - n_pos, "pixel in masks", m.shape)
    return _auroc(a.reshape(-1), flat_m)


def image_auroc(scores: Any, labels: Any) -> float:
    """Image-level ROC AUC. scores: (N,) real; labels: (N,) in {0, 1} (1 = anomalous)."""
    s = _as_scores(scores, "scores", 1)
    lab = _to_numpy(labels, "labels")
    if lab.shape != s.shape:
        raise ValueError(f"shape mismatch: scores has shape {s.shape}, labels has shape {lab.shape}")
    if lab.dtype.kind not in "biuf" or not np.isin(lab, (0, 1)).all():
        bad = np.unique(lab[~np.isin(lab, (0, 1))]) if lab.dtype.kind in "biuf" else lab.dtype
        raise ValueError(f"labels: must be 0 (normal) or 1 (anomalous), found {bad}")
    pos = lab.astype(bool)
    n_pos = int(pos.sum())
    _check_both_classes(n_pos, pos.size - n_pos, "image in labels (only one class)", lab.shape)
    return _auroc(s, pos)


def pro_score(maps: Any, masks: Any, fpr_limit: float = 0.3) -> float:
    """Normalised area under the PRO curve for FPR in [0, fpr_limit] (MVTec AD official).

    GT regions: connected components of each mask with 8-connectivity, pooled over images.
    Each distinct score t is a threshold (score >= t is anomalous); FPR is over all anomaly-free
    pixels of all images; PRO(t) is the mean over regions of the fraction of the region at or
    above t. The curve gets (0, 0) prepended and (1, 1) appended, is integrated with the
    trapezoid rule up to fpr_limit (interpolated linearly there) and divided by fpr_limit.
    A constant map scores fpr_limit / 2. (The official code accumulates FPR in float32; we use
    float64 throughout.)
    """
    if isinstance(fpr_limit, bool) or not isinstance(fpr_limit, (int, float, np.floating)):
        raise ValueError(f"fpr_limit must be a number in (0, 1], got {fpr_limit!r}")
    fpr_limit = float(fpr_limit)
    if not 0.0 < fpr_limit <= 1.0:
        raise ValueError(f"fpr_limit must be in (0, 1], got {fpr_limit!r}")
    a = _as_scores(maps, "maps", 3)
    m = _as_masks(masks, "masks", a, "maps")
    n_anom = int(np.count_nonzero(m))
    n_ok = m.size - n_anom
    _check_both_classes(n_anom, n_ok, "pixel in masks", m.shape)
    regions, n_regions = ndimage.label(m, structure=_STRUCTURE_8_PER_IMAGE)
    flat_m = m.reshape(-1)
    flat_scores = a.reshape(-1)
    flat_regions = regions.reshape(-1)
    return _pro_area(flat_scores[~flat_m], flat_scores[flat_m], flat_regions[flat_m], n_regions, fpr_limit)


def _pro_area(
    ok_scores: np.ndarray, anom_scores: np.ndarray, anom_regions: np.ndarray, n_regions: int, x_max: float
) -> float:
    """Area under the official PRO curve on [0, x_max], divided by x_max.

    The curve's points are all distinct thresholds. Walking thresholds downwards, FPR only moves
    at the distinct scores t of normal pixels; between them the curve is vertical (only the PRO
    rises), which adds no area. So the polyline is the union of the segments
    (FPR(> t), PRO(> t)) -> (FPR(>= t), PRO(>= t)) over distinct normal scores t, each a
    trapezoid; the segment crossing x_max is cut there with linear interpolation.
    """
    n_ok = ok_scores.size
    # Only normal scores down to the first threshold whose FPR exceeds x_max matter. With
    # k = floor(x_max * n_ok) + 1, the (k+1)-th largest normal score v has FPR(v) >= (k+1)/n_ok
    # > x_max; keeping every normal score >= v keeps every segment up to and across x_max.
    k = int(np.floor(x_max * n_ok)) + 1
    if k < n_ok:
        v = np.partition(ok_scores, n_ok - 1 - k)[n_ok - 1 - k]
        ok_scores = ok_scores[ok_scores >= v]
    ok_sorted = np.sort(ok_scores)[::-1]  # descending
    # Distinct normal scores (descending) and the count of normal pixels > t and >= t.
    last_of_group = np.flatnonzero(np.append(ok_sorted[1:] != ok_sorted[:-1], True))
    thresholds = ok_sorted[last_of_group]
    count_ge = last_of_group + 1
    count_gt = np.concatenate(([0], count_ge[:-1]))
    x_gt = count_gt / n_ok
    x_ge = count_ge / n_ok

    # PRO(>= t) and PRO(> t) at every kept threshold: each anomalous pixel adds
    # 1 / (its region's size) / n_regions to every threshold at or below its score.
    region_size = np.bincount(anom_regions, minlength=n_regions + 1)
    weights = 1.0 / region_size[anom_regions] / n_regions
    ascending = thresholds[::-1]
    n_t = ascending.size
    # Pixel a counts for ascending[i] with i < (#thresholds <= a) in PRO(>=), < (#< a) in PRO(>).
    y_ge = _suffix_sums(np.searchsorted(ascending, anom_scores, side="right"), weights, n_t)[::-1]
    y_gt = _suffix_sums(np.searchsorted(ascending, anom_scores, side="left"), weights, n_t)[::-1]
    np.minimum(y_ge, 1.0, out=y_ge)
    np.minimum(y_gt, 1.0, out=y_gt)

    full = int(np.searchsorted(x_ge, x_max, side="right"))  # segments ending at or before x_max
    area = float(np.sum(0.5 * (y_gt[:full] + y_ge[:full]) * (x_ge[:full] - x_gt[:full])))
    if full < x_ge.size and x_gt[full] < x_max:  # the segment that crosses x_max
        x0, x1, y0, y1 = x_gt[full], x_ge[full], y_gt[full], y_ge[full]
        y_cut = y0 + (y1 - y0) * (x_max - x0) / (x1 - x0)
        area += 0.5 * (y0 + y_cut) * (x_max - x0)
    return area / x_max


def _suffix_sums(counts_below: np.ndarray, weights: np.ndarray, n: int) -> np.ndarray:
    """out[i] = sum of weights[j] over j with counts_below[j] > i, for i in range(n)."""
    per_bin = np.bincount(counts_below, weights=weights, minlength=n + 1)
    return np.cumsum(per_bin[::-1])[::-1][1:]
