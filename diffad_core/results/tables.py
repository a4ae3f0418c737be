"""The run's metrics tables on disk, with their schemas, atomic writers and checked readers.

``metrics.parquet``: one row per category plus a "mean" row. ``defect_metrics.parquet``: one row
per category and defect kind."""

from __future__ import annotations

import math
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq

from diffad_core._atomic import atomic_write
from diffad_core.results.storage import ResultsSchemaError
from diffad_core.config import ABLATIONS

_METRIC_BASE: list[tuple[str, pa.DataType]] = [
    ("category", pa.string()),
    ("pixel_auroc", pa.float64()),
    ("pro", pa.float64()),
    ("image_auroc", pa.float64()),
    ("n_test", pa.int64()),
    ("score_ms_per_image", pa.float64()),
    ("reconstruct_ms_per_image", pa.float64()),
    ("train_seconds", pa.float64()),
    ("model_version", pa.string()),
    ("preset", pa.string()),
    ("alpha", pa.float64()),
    ("alpha_source", pa.string()),
    ("status", pa.string()),
]
ABLATION_METRIC_COLUMNS: tuple[str, ...] = tuple(
    f"{metric}_{abl}" for abl in ABLATIONS for metric in ("pixel_auroc", "pro", "image_auroc"))
METRICS_SCHEMA = pa.schema([pa.field(n, t) for n, t in _METRIC_BASE]
                           + [pa.field(n, pa.float64()) for n in ABLATION_METRIC_COLUMNS])
METRICS_REQUIRED: tuple[str, ...] = tuple(n for n, _ in _METRIC_BASE)

DEFECT_METRICS_SCHEMA = pa.schema([
    pa.field("category", pa.string()),
    pa.field("defect_type", pa.string()),
    pa.field("n_images", pa.int64()),  # images of this defect kind
    pa.field("n_good", pa.int64()),  # normal images they are compared with (all of the category)
    pa.field("pixel_auroc", pa.float64()),
    pa.field("pro", pa.float64()),
    pa.field("image_auroc", pa.float64()),
    pa.field("status", pa.string()),
])


def metrics_path(run_dir: str | Path) -> Path:
    """``<run_dir>/metrics.parquet``."""
    return Path(run_dir) / "metrics.parquet"


def defect_metrics_path(run_dir: str | Path) -> Path:
    """``<run_dir>/defect_metrics.parquet``."""
    return Path(run_dir) / "defect_metrics.parquet"


def _clean(value: Any, t: pa.DataType) -> Any:
    if value is None or (isinstance(value, float) and math.isnan(value)) or value is pd.NA:
        return None
    if pa.types.is_floating(t):
        return float(value)
    if pa.types.is_integer(t):
        return int(value)
    return str(value)


def to_arrow(df: pd.DataFrame, schema: pa.Schema) -> pa.Table:
    """A frame as a table of ``schema`` (missing columns null; unknown ones are an error)."""
    if "category" not in df.columns:
        raise ResultsSchemaError("metrics table lacks column(s) ['category']")
    extra = [c for c in df.columns if c not in schema.names]
    if extra:
        raise ResultsSchemaError(f"metrics table has unknown column(s) {extra}")
    data = {f.name: ([_clean(v, f.type) for v in df[f.name].tolist()] if f.name in df.columns
                     else [None] * len(df)) for f in schema}
    return pa.Table.from_pydict(data, schema=schema)


def _write(path: Path, table: pa.Table) -> Path:
    atomic_write(path, lambda tmp: pq.write_table(table, tmp, compression="zstd"))
    return path


def _read(path: Path, schema: pa.Schema, required: Sequence[str]) -> pd.DataFrame:
    if not path.is_file():
        raise FileNotFoundError(f"{path} does not exist (run evaluation first)")
    try:
        got = pq.read_schema(path)
    except (pa.ArrowInvalid, OSError) as exc:
        raise ResultsSchemaError(f"{path}: not a readable parquet file ({exc})") from exc
    for name in required:
        idx = got.get_field_index(name)
        if idx < 0:
            raise ResultsSchemaError(f"{path}: column {name!r} is missing")
        want, have = schema.field(name).type, got.field(idx).type
        if not (have == want or (pa.types.is_large_string(have) and pa.types.is_string(want))):
            raise ResultsSchemaError(f"{path}: column {name!r} has type {have}, expected {want}")
    return pq.read_table(path).to_pandas()


def drop_empty_ablations(df: pd.DataFrame) -> pd.DataFrame:
    """Without the ablation columns that are all null (scorers that were not run)."""
    return df.drop(columns=[c for c in ABLATION_METRIC_COLUMNS
                            if c in df.columns and df[c].isna().all()])


def write_metrics(run_dir: str | Path, df: pd.DataFrame) -> Path:
    """Write ``metrics.parquet`` atomically (columns: METRICS_SCHEMA; missing optional ones null)."""
    return _write(metrics_path(run_dir), to_arrow(df, METRICS_SCHEMA))


def read_metrics(run_dir: str | Path) -> pd.DataFrame:
    """Read ``metrics.parquet`` (schema checked; ablation columns that are all null are dropped)."""
    return drop_empty_ablations(_read(metrics_path(run_dir), METRICS_SCHEMA, METRICS_REQUIRED))


def write_defect_metrics(run_dir: str | Path, df: pd.DataFrame) -> Path:
    """Write ``defect_metrics.parquet`` atomically (columns: DEFECT_METRICS_SCHEMA)."""
    return _write(defect_metrics_path(run_dir), to_arrow(df, DEFECT_METRICS_SCHEMA))


def read_defect_metrics(run_dir: str | Path) -> pd.DataFrame:
    """Read ``defect_metrics.parquet`` (schema checked)."""
    return _read(defect_metrics_path(run_dir), DEFECT_METRICS_SCHEMA, DEFECT_METRICS_SCHEMA.names)
