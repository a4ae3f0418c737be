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

    The curve's points are all distinct thresholds. Walking thresholds downwards, the FPR only
    moves at the distinct scores t of normal pixels; between them the curve is vertical (only
    PRO rises), which adds no area. So the polyline is made of the segments
    (FPR(> t), PRO(> t)) -> (FPR(>= t), PRO(>= t)), one per distinct normal score t, of width
    #(normal == t) / n_ok. Split over its pixels, every normal pixel p whose segment lies
    wholly below x_max adds (PRO(> s_p) + PRO(>= s_p)) / 2 / n_ok; the one segment crossing
    x_max is cut there with linear interpolation.
    """
    n_ok = ok_scores.size
    # Each anomalous pixel adds w = 1 / (its region's size) / n_regions to PRO(t) for t <= score.
    region_size = np.bincount(anom_regions, minlength=n_regions + 1)
    order = np.argsort(anom_scores)
    anom_sorted = anom_scores[order]
    weights = 1.0 / region_size[anom_regions[order]] / n_regions

    # c = the most normal pixels at or above a threshold with FPR c / n_ok still <= x_max.
    c = min(int(np.floor(x_max * n_ok)), n_ok)
    while c < n_ok and (c + 1) / n_ok <= x_max:
        c += 1
    while c > 0 and c / n_ok > x_max:
        c -= 1
    if c == n_ok:  # x_max = 1: every segment is whole
        full_sorted, t_cut = np.sort(ok_scores), None
    else:
        # t_cut, the (c+1)-th largest normal score, owns the segment crossing x_max: FPR(>= t_cut)
        # > x_max, while every normal score above it has FPR(>= s) <= c / n_ok <= x_max.
        t_cut = np.partition(ok_scores, n_ok - 1 - c)[n_ok - 1 - c]
        full_sorted = np.sort(ok_scores[ok_scores > t_cut])

    # sum_p PRO(>= s_p) = sum_a w_a * #{p : s_p <= a}; sum_p PRO(> s_p) = sum_a w_a * #{p : s_p < a}.
    n_le = np.searchsorted(full_sorted, anom_sorted, side="right")
    n_lt = np.searchsorted(full_sorted, anom_sorted, side="left")
    area = 0.5 * (float(weights @ n_le) + float(weights @ n_lt)) / n_ok
    if t_cut is not None:
        x0 = full_sorted.size / n_ok
        x1 = (full_sorted.size + int(np.count_nonzero(ok_scores == t_cut))) / n_ok
        y0 = min(float(weights[anom_sorted > t_cut].sum()), 1.0)  # PRO(> t_cut)
        y1 = min(float(weights[anom_sorted >= t_cut].sum()), 1.0)  # PRO(>= t_cut)
        if x0 < x_max:
            y_cut = y0 + (y1 - y0) * (x_max - x0) / (x1 - x0)
            area += 0.5 * (y0 + y_cut) * (x_max - x0)
    return area / x_max
