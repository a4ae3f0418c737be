"""Runs written in the results format before version 2 (maps as bytes), and their conversion.

That format had ``image_path`` and ``category`` columns, maps as float16 C-order bytes with
``map_height`` / ``map_width``, the mask as ``numpy.packbits`` of the flattened {0, 1} mask (null:
no ground truth file), ``reconstruction`` and ``input_png`` as PNG bytes. :func:`migrate_run`
rewrites such partitions in the current format, each with the usual atomic swap.
"""

from __future__ import annotations

import io
import json
import warnings
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow.parquet as pq
from PIL import Image

from diffad_core.results.storage import (
    MAP_COLUMNS, SCORE_COLUMNS, SCORE_METADATA_KEY, _write_partition, list_categories_in_run,
    part_files,
)

_LEGACY_ROWS_PER_PART = 64


def is_legacy_partition(run_dir: str | Path, category: str) -> bool:
    """Whether a category's partition is in the format before version 2."""
    parts = part_files(run_dir, category)
    return bool(parts) and "image_path" in pq.read_schema(parts[0]).names


def migrate_run(run_dir: str | Path) -> list[str]:
    """Rewrite every partition of the run that is in the old format; returns those categories.

    Maps keep their float16 values. A map column that some rows lacked, or a mask missing for an
    anomalous image, is dropped for that partition (the old evaluation gave no metrics from it
    either); normal images without a mask get an all-zero mask. Partitions already in the current
    format are left alone, so running it twice is harmless.
    """
    run_dir = Path(run_dir)
    done = []
    for category in list_categories_in_run(run_dir):
        if not is_legacy_partition(run_dir, category):
            continue
        parts = part_files(run_dir, category)
        raw = (pq.read_schema(parts[0]).metadata or {}).get(SCORE_METADATA_KEY)
        meta = json.loads(raw) if raw else {}
        rows = [_decode_row(r) for p in parts for r in pq.read_table(p).to_pylist()]
        _drop_incomplete_columns(rows, category)
        versions = sorted({r.pop("_model_version") for r in rows}) or [meta.get("model_version", "")]
        meta = {"run_id": meta.get("run_id", run_dir.resolve().name), "category": category,
                "model_version": ",".join(versions), "alpha": meta.get("alpha"),
                "alpha_source": meta.get("alpha_source"), "preset": meta.get("preset"),
                "migrated_from_format": 1}
        _write_partition(run_dir, category, iter(rows), ",".join(versions), meta,
                         _LEGACY_ROWS_PER_PART)
        done.append(category)
    return done


def _decode_row(old: dict[str, Any]) -> dict[str, Any]:
    h, w = int(old["map_height"]), int(old["map_width"])
    row: dict[str, Any] = {
        "rel_path": old["image_path"], "defect_type": old["defect_type"], "label": int(old["label"]),
        "image_score": float(old["image_score"]), "map_height": h, "map_width": w,
        "_model_version": old["model_version"],
    }
    for col in MAP_COLUMNS:
        blob = old.get(col)
        row[col] = None if blob is None else np.frombuffer(blob, np.float16).reshape(h, w)
    blob = old.get("mask")
    row["mask"] = None if blob is None else \
        np.unpackbits(np.frombuffer(blob, np.uint8))[: h * w].reshape(h, w)
    row["reconstruction"] = _png(old.get("reconstruction"), h, w)
    row["input_image"] = _png(old.get("input_png"), h, w)
    for col in SCORE_COLUMNS:
        row[col] = old.get(col)
    return row


def _png(blob: bytes | None, h: int, w: int) -> np.ndarray | None:
    if blob is None:
        return None
    with Image.open(io.BytesIO(blob)) as im:
        rgb = im.convert("RGB")
        if rgb.size != (w, h):
            rgb = rgb.resize((w, h), Image.BILINEAR)
        return np.asarray(rgb)


def _drop_incomplete_columns(rows: list[dict[str, Any]], category: str) -> None:
    """The current format stores a map column for every row or not at all."""
    for row in rows:
        if row["mask"] is None and row["label"] == 0:
            row["mask"] = np.zeros((row["map_height"], row["map_width"]), np.uint8)
    for col in (*MAP_COLUMNS[1:], "mask"):
        missing = sum(r[col] is None for r in rows)
        if missing and missing < len(rows):
            warnings.warn(f"migrating {category!r}: {col} is missing for {missing} of {len(rows)} "
                          "images; the column is dropped", stacklevel=3)
        if missing:
            for row in rows:
                row.pop(col)
    if any(r["anomaly_map"] is None for r in rows):
        raise ValueError(f"migrating {category!r}: a row has no anomaly_map")
