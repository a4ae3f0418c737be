"""Metrics computed from the score partitions only: per category and ablation scorer, per defect
kind, and per image (to find a category's weakest images)."""

from __future__ import annotations

import math
import warnings
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import pyarrow as pa

from diffad_core import metrics
from diffad_core.results.reading import CategoryScores, read_category, read_score_metadata
from diffad_core.results.storage import (
    ABLATION_MAP_COLUMN, MEAN_ROW, ResultsSchemaError, list_categories_in_run, scores_dir,
)
from diffad_core.results.tables import (
    DEFECT_METRICS_SCHEMA, METRICS_SCHEMA, drop_empty_ablations, metrics_path, read_metrics,
    to_arrow, write_defect_metrics, write_metrics,
)
from diffad_core.config import ABLATIONS

_TIMING_KEYS = ("score_ms_per_image", "reconstruct_ms_per_image", "train_seconds")
_OVERRIDE_KEYS = _TIMING_KEYS + ("alpha", "alpha_source", "model_version", "preset")
NO_GROUND_TRUTH = "no ground truth masks"


# ----------------------------------------------------------------------------- helpers
def _metric(fn: Callable[..., float], *args: Any, **kwargs: Any) -> float:
    """A metric value, or NaN (with a warning) when it is undefined, e.g. a single class."""
    try:
        return float(fn(*args, **kwargs))
    except ValueError as exc:
        warnings.warn(f"metric {fn.__name__} undefined: {exc}", stacklevel=3)
        return math.nan


def _pixel_pair(maps: np.ndarray, masks: np.ndarray, fpr_limit: float) -> tuple[float, float]:
    return (_metric(metrics.pixel_auroc, maps, masks),
            _metric(metrics.pro_score, maps, masks, fpr_limit=fpr_limit))


# ----------------------------------------------------------------------------- per category
def _category_row(data: CategoryScores, fpr_limit: float) -> dict[str, Any]:
    n = len(data.labels)
    out: dict[str, Any] = {"category": data.category, "n_test": n,
                           "model_version": ",".join(data.model_versions) or None}
    if n == 0:
        out["status"] = "empty partition"
        return out
    out["status"] = "ok" if data.mask is not None else NO_GROUND_TRUTH
    if data.mask is not None:
        out["pixel_auroc"], out["pro"] = _pixel_pair(data.maps["anomaly_map"], data.mask, fpr_limit)
    out["image_auroc"] = _metric(metrics.image_auroc, data.image_scores, data.labels)
    for abl in ABLATIONS:
        amap = data.maps.get(ABLATION_MAP_COLUMN[abl])
        if amap is not None and data.mask is not None:
            out[f"pixel_auroc_{abl}"], out[f"pro_{abl}"] = _pixel_pair(amap, data.mask, fpr_limit)
        if abl in data.ablation_scores:
            out[f"image_auroc_{abl}"] = _metric(metrics.image_auroc, data.ablation_scores[abl],
                                                data.labels)
    return out


# ----------------------------------------------------------------------------- per defect kind
def _defect_rows(data: CategoryScores, fpr_limit: float) -> list[dict[str, Any]]:
    """For each defect kind: its images together with every normal image of the category."""
    kinds = np.asarray(data.defect_types, dtype=object)
    good = data.labels == 0
    rows = []
    for kind in sorted({k for k, lab in zip(data.defect_types, data.labels) if lab == 1}):
        this = (kinds == kind) & (data.labels == 1)
        sel = this | good
        row: dict[str, Any] = {"category": data.category, "defect_type": kind,
                               "n_images": int(this.sum()), "n_good": int(good.sum())}
        if data.mask is not None:
            row["pixel_auroc"], row["pro"] = _pixel_pair(data.maps["anomaly_map"][sel],
                                                         data.mask[sel], fpr_limit)
        row["image_auroc"] = _metric(metrics.image_auroc, data.image_scores[sel],
                                     data.labels[sel])
        row["status"] = ("ok" if data.mask is not None else NO_GROUND_TRUTH) if good.any() \
            else "no normal images"
        rows.append(row)
    return rows


def _defect_frame(rows: list[dict[str, Any]]) -> pd.DataFrame:
    df = pd.DataFrame(rows, columns=DEFECT_METRICS_SCHEMA.names)
    return to_arrow(df, DEFECT_METRICS_SCHEMA).to_pandas()


def evaluate_defect_kinds(run_dir: str | Path, categories: Sequence[str] | None = None, *,
                          fpr_limit: float = 0.3, write: bool = False) -> pd.DataFrame:
    """Pixel AUROC, PRO and image AUROC per category and defect kind, each over that kind's
    images plus all normal images of the category (columns: DEFECT_METRICS_SCHEMA).
    ``categories=None``: every category with a partition. Writes ``defect_metrics.parquet`` when
    ``write``. (:func:`evaluate_run` computes and writes the same table.)"""
    run_dir = Path(run_dir)
    cats = list_categories_in_run(run_dir) if categories is None else list(categories)
    rows = [r for cat in cats for r in _defect_rows(read_category(run_dir, cat), fpr_limit)]
    df = _defect_frame(rows)
    if write:
        write_defect_metrics(run_dir, df)
    return df


# ----------------------------------------------------------------------------- per image
def _per_image(data: CategoryScores) -> pd.DataFrame:
    labels, scores = data.labels, data.image_scores
    bad, good = scores[labels == 1], scores[labels == 0]
    overlap = np.full(len(labels), np.nan)
    if good.size:  # share of normal images that score at least as high as this anomalous one
        overlap[labels == 1] = (good[None, :] >= bad[:, None]).mean(axis=1)
    if bad.size:  # share of anomalous images that score at most as high as this normal one
        overlap[labels == 0] = (bad[None, :] <= good[:, None]).mean(axis=1)
    local = np.full(len(labels), np.nan)
    if data.mask is not None:
        amap = data.maps["anomaly_map"]
        for i in np.flatnonzero((labels == 1) & data.mask.any(axis=(1, 2))):
            if not data.mask[i].all():
                local[i] = metrics.pixel_auroc(amap[i][None], data.mask[i][None])
    return pd.DataFrame({
        "category": data.category, "rel_path": data.rel_paths, "defect_type": data.defect_types,
        "label": labels, "image_score": scores, "pixel_auroc": local, "score_overlap": overlap,
    })


def per_image_metrics(run_dir: str | Path, category: str) -> pd.DataFrame:
    """One row per image of the category, in partition order: category, rel_path, defect_type,
    label, image_score, ``pixel_auroc`` (of the image's own pixels; anomalous images with a mask,
    else NaN) and ``score_overlap`` (anomalous: share of normal images scoring at least as high;
    normal: share of anomalous images scoring at most as high; higher is worse; NaN without the
    other class)."""
    return _per_image(read_category(run_dir, category, maps=("anomaly_map",)))


WEAK_REASONS = {"localization": "worst localization", "detection": "hardest to detect",
                "false_alarm": "highest normal score"}


def weakest_images(run_dir: str | Path, category: str, *, n_anomalous: int = 2,
                   n_good: int = 1) -> pd.DataFrame:
    """The category's weakest images, weakest first: the :func:`per_image_metrics` rows plus a
    ``reason``. Anomalous picks alternate between the lowest per-image pixel AUROC ("worst
    localization") and the highest score overlap with normal images ("hardest to detect"); then
    the highest-scoring normal images ("highest normal score")."""
    per = per_image_metrics(run_dir, category)
    anomalous = per[per["label"] == 1]
    by_reason = {
        "localization": anomalous[anomalous["pixel_auroc"].notna()].sort_values(
            ["pixel_auroc", "image_score"]),
        "detection": anomalous.sort_values(["score_overlap", "image_score"],
                                           ascending=[False, True], na_position="last"),
    }
    picked: list[tuple[int, str]] = []
    taken: set[int] = set()
    cursors = {k: iter(v.index.tolist()) for k, v in by_reason.items()}
    while len(picked) < min(n_anomalous, len(anomalous)):
        for reason, cursor in cursors.items():
            idx = next((i for i in cursor if i not in taken), None)
            if idx is not None and len(picked) < n_anomalous:
                picked.append((idx, WEAK_REASONS[reason]))
                taken.add(idx)
    normal = per[per["label"] == 0].sort_values("image_score", ascending=False)
    picked += [(i, WEAK_REASONS["false_alarm"]) for i in normal.index[:max(0, n_good)]]
    out = per.loc[[i for i, _ in picked]].copy()
    out["reason"] = [r for _, r in picked]
    return out.reset_index(drop=True)


# ----------------------------------------------------------------------------- the run
def evaluate_run(
    run_dir: str | Path,
    timings: Mapping[str, Mapping[str, Any]] | None = None,
    *,
    categories: Sequence[str] | None = None,
    fpr_limit: float = 0.3,
    preset: str | None = None,
    write: bool = True,
) -> pd.DataFrame:
    """Per-category metrics computed only from the score parquet files, plus a ``mean`` row.

    ``timings``: ``{category: {"train_seconds", "score_ms_per_image", "reconstruct_ms_per_image",
    and optionally "alpha", "alpha_source", "model_version", "preset"}}``; values there override the
    partition metadata. ``categories``: the expected categories (default: those with a partition,
    plus any named in ``timings`` or in an earlier ``metrics.parquet`` of the run, whose timings are
    kept when ``timings`` does not give them); one without a partition gets a row with status
    ``"missing partition"`` and NaN metrics. The mean row averages the rows with status ``ok``.
    Unless ``write=False``, writes ``metrics.parquet`` and ``defect_metrics.parquet`` (the
    per-defect-kind table of :func:`evaluate_defect_kinds`).
    """
    run_dir = Path(run_dir)
    timings = dict(timings or {})
    previous = _previous_timings(run_dir)
    present = list_categories_in_run(run_dir)
    expected = list(categories) if categories is not None \
        else sorted(set(present) | {c for c in timings if c != MEAN_ROW} | set(previous))
    rows: list[dict[str, Any]] = []
    defect_rows: list[dict[str, Any]] = []
    for cat in expected:
        if cat not in present:
            warnings.warn(f"category {cat!r} has no score partition in {scores_dir(run_dir)}",
                          stacklevel=2)
            row: dict[str, Any] = {"category": cat, "n_test": 0, "status": "missing partition"}
        else:
            data = read_category(run_dir, cat)
            row = _category_row(data, fpr_limit)
            if write:
                defect_rows += _defect_rows(data, fpr_limit)
            meta = read_score_metadata(run_dir, cat)
            row.update({k: meta[k] for k in ("alpha", "alpha_source", "preset")
                        if meta.get(k) is not None})
        for key, value in previous.get(cat, {}).items():
            row.setdefault(key, value)
        row.update({k: v for k, v in timings.get(cat, {}).items() if k in _OVERRIDE_KEYS})
        if preset is not None and row.get("preset") is None:
            row["preset"] = preset
        rows.append(row)
    df = pd.DataFrame(rows, columns=METRICS_SCHEMA.names)
    df = pd.concat([df, _mean_row(df, preset).to_frame().T], ignore_index=True)
    if write:
        write_metrics(run_dir, df)
        write_defect_metrics(run_dir, _defect_frame(defect_rows))
    # the same frame read_metrics() gives back for the written file
    return drop_empty_ablations(to_arrow(df, METRICS_SCHEMA).to_pandas())


def _previous_timings(run_dir: Path) -> dict[str, dict[str, Any]]:
    """Timings of an earlier ``metrics.parquet`` of this run, so re-evaluating from the parquet
    files alone (without the timings) keeps them."""
    if not metrics_path(run_dir).is_file():
        return {}
    try:
        df = read_metrics(run_dir)
    except ResultsSchemaError as exc:
        warnings.warn(f"ignoring the earlier {metrics_path(run_dir)}: {exc}", stacklevel=3)
        return {}
    return {rec["category"]: {k: rec[k] for k in _TIMING_KEYS if k in rec and not pd.isna(rec[k])}
            for rec in df.to_dict("records") if rec["category"] != MEAN_ROW}


def _mean_row(df: pd.DataFrame, preset: str | None) -> pd.Series:
    ok = df[df["status"] == "ok"]
    row = pd.Series({c: None for c in df.columns}, dtype=object)
    row["category"] = MEAN_ROW
    for field in METRICS_SCHEMA:
        if pa.types.is_floating(field.type) and field.name in df.columns:
            vals = pd.to_numeric(ok[field.name], errors="coerce")
            row[field.name] = float(vals.mean()) if vals.notna().any() else None
    row["n_test"] = int(pd.to_numeric(df["n_test"], errors="coerce").fillna(0).sum())
    row["status"] = f"mean of {len(ok)} of {len(df)} categories"
    presets = set(df["preset"].dropna()) or ({preset} if preset else set())
    row["preset"] = ",".join(sorted(presets)) or None
    versions = set(df["model_version"].dropna())
    row["model_version"] = ",".join(sorted(versions)) or None
    row["alpha_source"] = ",".join(sorted(set(df["alpha_source"].dropna()))) or None
    return row
