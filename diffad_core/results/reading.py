"""Reading score partitions back: as a DataFrame, row by row with decoded maps, or as stacked
arrays for evaluation; every part file's schema is checked first."""

from __future__ import annotations

import json
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq

from diffad_core.results.storage import (
    ALL_COLUMNS, IMAGE_COLUMNS, MAP_COLUMNS, SCORE_COLUMNS, SCORE_METADATA_KEY,
    list_categories_in_run, part_files, scores_dir, validate_score_file,
)
from diffad_core.config import ABLATIONS


@dataclass
class CategoryScores:
    """One category's partition as arrays (what evaluation reads)."""

    category: str
    rel_paths: list[str]
    defect_types: list[str]
    labels: np.ndarray  # int64 (N,)
    image_scores: np.ndarray  # float64 (N,)
    ablation_scores: dict[str, np.ndarray]  # scorer -> float64 (N,), only where every row has one
    maps: dict[str, np.ndarray]  # map column -> float32 (N, H, W), only the stored columns
    mask: np.ndarray | None  # uint8 (N, H, W), None when the partition has no ground truth
    model_versions: list[str]


def read_score_metadata(run_dir: str | Path, category: str) -> dict[str, Any]:
    """The metadata ``write_scores`` stored with a partition (alpha, alpha_source, preset, ...)."""
    parts = _require_parts(Path(run_dir), category)
    raw = (pq.read_schema(parts[0]).metadata or {}).get(SCORE_METADATA_KEY)
    return json.loads(raw) if raw else {}


def _require_parts(run_dir: Path, category: str) -> list[Path]:
    parts = part_files(run_dir, category)
    if not parts:
        raise FileNotFoundError(f"no score partition for category {category!r} in "
                                f"{scores_dir(run_dir)}")
    return parts


def _check_columns(columns: Iterable[str]) -> list[str]:
    cols = list(columns)
    unknown = [c for c in cols if c not in ALL_COLUMNS and c != "category"]
    if unknown:
        raise ValueError(f"unknown score column(s) {unknown}; known: {('category',) + ALL_COLUMNS}")
    return cols


def _decode_column(table: pa.Table, name: str) -> list[Any]:
    """A column as Python values; tensors as float32 (H, W) maps / uint8 masks, images (H, W, 3)."""
    col = table.column(name)
    if isinstance(col.type, pa.FixedShapeTensorType):
        if table.num_rows == 0:
            return []
        arr = col.combine_chunks().to_numpy_ndarray()
        arr = arr if col.type.value_type == pa.uint8() else arr.astype(np.float32)
        return list(arr)
    if name in IMAGE_COLUMNS:
        hw = zip(table.column("map_height").to_pylist(), table.column("map_width").to_pylist())
        return [v.values.to_numpy(zero_copy_only=False).reshape(h, w, 3) if v.is_valid else None
                for v, (h, w) in zip(col, hw)]
    return col.to_pylist()


def _iter_part_tables(run_dir: Path, category: str, columns: Sequence[str]) -> Iterator[pa.Table]:
    """Each part of a partition as a table with the wanted columns that it stores (checked)."""
    for path in _require_parts(run_dir, category):
        schema = validate_score_file(path)
        wanted = [c for c in dict.fromkeys(columns) if c in schema.names]
        yield pq.read_table(path, columns=wanted)


def read_scores(run_dir: str | Path, categories: Sequence[str] | None = None,
                columns: Sequence[str] | None = None) -> pd.DataFrame:
    """Score rows of a run as a DataFrame, with a ``category`` column and maps decoded to numpy
    (``None`` in a map column the partition does not store).

    ``categories=None``: every category with a partition; a requested category without one raises
    ``FileNotFoundError``. Every file's schema is checked.
    """
    run_dir = Path(run_dir)
    cats = list_categories_in_run(run_dir) if categories is None else list(categories)
    cols = _check_columns(["category", *ALL_COLUMNS] if columns is None else columns)
    frames: list[pd.DataFrame] = []
    for cat in cats:
        for table in _iter_part_tables(run_dir, cat, [*cols, "map_height", "map_width"]):
            data = {c: ([cat] * table.num_rows if c == "category"
                        else _decode_column(table, c) if c in table.column_names
                        else [None] * table.num_rows) for c in cols}
            frames.append(pd.DataFrame(data, columns=cols))
    if not frames:
        return pd.DataFrame({c: pd.Series(dtype=_pandas_dtype(c)) for c in cols})
    frames = [f for f in frames if len(f)] or frames[:1]
    return pd.concat(frames, ignore_index=True)


def _pandas_dtype(column: str) -> str:
    if column in ("image_score", *SCORE_COLUMNS):
        return "float64"
    if column in ("label", "map_height", "map_width"):
        return "int64"
    return "object"


_ROW_META = ("rel_path", "defect_type", "label", "image_score", "model_version", "map_height",
             "map_width", *SCORE_COLUMNS)


def iter_maps(
    run_dir: str | Path,
    categories: Sequence[str] | None = None,
    maps: Sequence[str] = ("anomaly_map", "mask"),
) -> Iterator[dict[str, Any]]:
    """Rows with their maps decoded to numpy, one part file at a time (memory stays bounded).

    Each dict has category, rel_path, defect_type, label, image_score, model_version, map_height,
    map_width, score_<scorer>, and for each name in ``maps`` (map columns, ``mask``,
    ``reconstruction``, ``input_image``) a float32 (H, W) map, uint8 (H, W) mask, uint8 (H, W, 3)
    image, or ``None`` (not stored for that image).
    """
    run_dir = Path(run_dir)
    bad = [m for m in maps if m not in (*MAP_COLUMNS, "mask", *IMAGE_COLUMNS)]
    if bad:
        raise ValueError(f"unknown map column(s) {bad}")
    cats = list_categories_in_run(run_dir) if categories is None else list(categories)
    for cat in cats:
        for table in _iter_part_tables(run_dir, cat, [*_ROW_META, *maps]):
            data = {c: _decode_column(table, c) if c in table.column_names
                    else [None] * table.num_rows for c in (*_ROW_META, *maps)}
            for i in range(table.num_rows):
                yield {"category": cat} | {c: v[i] for c, v in data.items()}


def read_category(run_dir: str | Path, category: str,
                  maps: Sequence[str] = MAP_COLUMNS) -> CategoryScores:
    """A partition as arrays: the stored ones of ``maps`` stacked to (N, H, W), plus the mask."""
    tables = list(_iter_part_tables(Path(run_dir), category,
                                    [*_ROW_META, *maps, "mask"]))
    table = pa.concat_tables(tables) if len(tables) > 1 else tables[0]
    n = table.num_rows

    def stack(col: str) -> np.ndarray | None:
        if col not in table.column_names:
            return None
        if n == 0:
            return np.zeros((0, 1, 1), np.float32)
        return np.stack(_decode_column(table, col))

    scores = {a: table.column(c).to_numpy(zero_copy_only=False).astype(np.float64)
              for a in ABLATIONS if (c := f"score_{a}") in table.column_names
              and table.column(c).null_count == 0}
    return CategoryScores(
        category=category,
        rel_paths=table.column("rel_path").to_pylist(),
        defect_types=table.column("defect_type").to_pylist(),
        labels=table.column("label").to_numpy().astype(np.int64),
        image_scores=table.column("image_score").to_numpy().astype(np.float64),
        ablation_scores=scores,
        maps={c: m for c in maps if (m := stack(c)) is not None},
        mask=stack("mask"),
        model_versions=sorted(set(table.column("model_version").to_pylist())),
    )
