"""The parquet results of a run: score partitions and the metrics table (DESIGN.md "Results").

Layout under a run directory ``results/<run_id>/``::

    scores/category=<c>/part-00000.parquet   one row per test image (schema: SCORE_SCHEMA)
    metrics.parquet                          one row per category + a "mean" row

Encodings (all C-order, row-major):

- maps (``anomaly_map``, ``kl_map``, ``feature_map``, ``rgb_map``, ``padim_map``): float16 bytes of
  shape ``(map_height, map_width)``; ``None`` where the map was not kept.
- ``mask``: the ground truth at the map's size, ``numpy.packbits`` of the flattened {0, 1} mask
  (``ceil(H * W / 8)`` bytes, big bit order); ``None`` = no ground truth file (a normal image, or a
  dataset without masks). Evaluation treats a missing mask of a normal image as all zeros.
- ``reconstruction`` and ``input_png``: PNG bytes of an RGB uint8 image; ``None`` where not made.

Everything downstream (evaluation, report, registry) reads only these files, so it can be re-run
without the models. Writers are atomic: each part is written to a temporary file and renamed, and a
category's partition is built in a hidden temporary directory and swapped in with renames, so a rerun
replaces the partition and readers never see two generations or half a partition.
"""

from __future__ import annotations

import io
import json
import math
import os
import re
import shutil
import uuid
import warnings
from collections.abc import Iterable, Iterator, Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq

ABLATIONS: tuple[str, ...] = ("kl", "feature", "rgb", "padim")
# The map column that each ablation's pixel metrics are computed from.
ABLATION_MAP_COLUMN: dict[str, str] = {
    "kl": "kl_map", "feature": "feature_map", "rgb": "rgb_map", "padim": "padim_map",
}
MAP_COLUMNS: tuple[str, ...] = ("anomaly_map", "kl_map", "feature_map", "rgb_map", "padim_map")
PNG_COLUMNS: tuple[str, ...] = ("reconstruction", "input_png")
SCORE_METADATA_KEY = b"diffad"

SCORE_SCHEMA = pa.schema([
    pa.field("run_id", pa.string(), nullable=False),
    pa.field("category", pa.string(), nullable=False),
    pa.field("image_path", pa.string(), nullable=False),
    pa.field("defect_type", pa.string(), nullable=False),
    pa.field("label", pa.int8(), nullable=False),
    pa.field("image_score", pa.float64(), nullable=False),
    pa.field("map_height", pa.int32(), nullable=False),
    pa.field("map_width", pa.int32(), nullable=False),
    pa.field("anomaly_map", pa.binary(), nullable=False),
    pa.field("kl_map", pa.binary()),
    pa.field("feature_map", pa.binary()),
    pa.field("rgb_map", pa.binary()),
    pa.field("padim_map", pa.binary()),
    pa.field("mask", pa.binary()),
    pa.field("reconstruction", pa.binary()),
    pa.field("input_png", pa.binary()),
    pa.field("score_kl", pa.float64()),
    pa.field("score_feature", pa.float64()),
    pa.field("score_rgb", pa.float64()),
    pa.field("score_padim", pa.float64()),
    pa.field("model_version", pa.string(), nullable=False),
])

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
_METRIC_ABLATION: list[tuple[str, pa.DataType]] = [
    (f"{metric}_{abl}", pa.float64())
    for abl in ABLATIONS
    for metric in ("pixel_auroc", "pro", "image_auroc")
]
METRICS_SCHEMA = pa.schema([pa.field(n, t) for n, t in _METRIC_BASE + _METRIC_ABLATION])
METRICS_REQUIRED: tuple[str, ...] = tuple(n for n, _ in _METRIC_BASE)
MEAN_ROW = "mean"
_TIMING_KEYS = ("score_ms_per_image", "reconstruct_ms_per_image", "train_seconds")
_PART_RE = re.compile(r"^part-(\d+)\.parquet$")


class ResultsSchemaError(ValueError):
    """A results file that does not match the expected schema (names the file and the column)."""


# ----------------------------------------------------------------------------- paths
def scores_dir(run_dir: str | Path) -> Path:
    """``<run_dir>/scores``."""
    return Path(run_dir) / "scores"


def partition_dir(run_dir: str | Path, category: str) -> Path:
    """``<run_dir>/scores/category=<category>``."""
    return scores_dir(run_dir) / f"category={_check_category(category)}"


def metrics_path(run_dir: str | Path) -> Path:
    """``<run_dir>/metrics.parquet``."""
    return Path(run_dir) / "metrics.parquet"


def _check_category(category: str) -> str:
    if not isinstance(category, str) or not category or category.startswith(".") \
            or "/" in category or "\\" in category or category == MEAN_ROW:
        raise ValueError(f"invalid category name {category!r} for a results partition")
    return category


def list_categories_in_run(run_dir: str | Path) -> list[str]:
    """Categories that have a (complete) score partition in this run, sorted."""
    root = scores_dir(run_dir)
    if not root.is_dir():
        return []
    return sorted(
        p.name.split("=", 1)[1] for p in root.iterdir()
        if p.is_dir() and p.name.startswith("category=") and not p.name.startswith(".")
    )


# ----------------------------------------------------------------------------- encoding
def encode_map(arr: np.ndarray | None, shape: tuple[int, int] | None = None) -> bytes | None:
    """A 2-D map as float16 C-order bytes (``None`` stays ``None``)."""
    if arr is None:
        return None
    a = _to_numpy(arr)
    if a.ndim != 2:
        raise ValueError(f"a map must be 2-D (H, W), got shape {a.shape}")
    if shape is not None and a.shape != shape:
        raise ValueError(f"map shape {a.shape} differs from the anomaly map's {shape}")
    return np.ascontiguousarray(a, dtype=np.float16).tobytes()


def decode_map(blob: bytes | None, height: int, width: int) -> np.ndarray | None:
    """Inverse of :func:`encode_map`: float32 array (H, W)."""
    if blob is None:
        return None
    a = np.frombuffer(blob, dtype=np.float16)
    if a.size != height * width:
        raise ResultsSchemaError(f"map blob has {a.size} values, expected {height}x{width}")
    return a.reshape(height, width).astype(np.float32)


def encode_mask(mask: np.ndarray | None, shape: tuple[int, int] | None = None) -> bytes | None:
    """A {0, 1} mask as ``np.packbits`` of its flattened C-order values."""
    if mask is None:
        return None
    m = _to_numpy(mask)
    if m.ndim != 2:
        raise ValueError(f"a mask must be 2-D (H, W), got shape {m.shape}")
    if shape is not None and m.shape != shape:
        raise ValueError(f"mask shape {m.shape} differs from the anomaly map's {shape}")
    return np.packbits((m > 0).astype(np.uint8).ravel()).tobytes()


def decode_mask(blob: bytes | None, height: int, width: int) -> np.ndarray | None:
    """Inverse of :func:`encode_mask`: uint8 {0, 1} array (H, W)."""
    if blob is None:
        return None
    bits = np.unpackbits(np.frombuffer(blob, dtype=np.uint8))
    if bits.size < height * width or bits.size - height * width >= 8:
        raise ResultsSchemaError(f"mask blob has {len(blob)} bytes, expected {height}x{width} bits")
    return bits[: height * width].reshape(height, width)


def encode_png(image: np.ndarray | None) -> bytes | None:
    """An image as PNG bytes: (H, W, 3) or (H, W) uint8, or float in [0, 1]."""
    if image is None:
        return None
    from PIL import Image

    a = _to_numpy(image)
    if a.ndim == 3 and a.shape[0] in (1, 3) and a.shape[-1] not in (1, 3):
        a = np.moveaxis(a, 0, -1)  # (C, H, W) -> (H, W, C)
    if a.ndim == 3 and a.shape[-1] == 1:
        a = a[..., 0]
    if a.dtype != np.uint8:
        if a.min(initial=0.0) < 0.0:
            raise ValueError("float images for PNG must be in [0, 1] (got negative values)")
        a = np.clip(np.rint(a * 255.0), 0, 255).astype(np.uint8)
    if a.ndim not in (2, 3):
        raise ValueError(f"cannot encode an image of shape {a.shape} as PNG")
    buf = io.BytesIO()
    Image.fromarray(a).save(buf, format="PNG")
    return buf.getvalue()


def decode_png(blob: bytes | None) -> np.ndarray | None:
    """PNG bytes -> uint8 RGB (H, W, 3)."""
    if blob is None:
        return None
    from PIL import Image

    with Image.open(io.BytesIO(blob)) as im:
        return np.asarray(im.convert("RGB"))


def _to_numpy(x: Any) -> np.ndarray:
    if hasattr(x, "detach"):  # a torch tensor, without importing torch here
        x = x.detach().cpu().numpy()
    return np.asarray(x)


# ----------------------------------------------------------------------------- records
def _get(record: Any, key: str, default: Any = None) -> Any:
    if isinstance(record, Mapping):
        return record.get(key, default)
    return getattr(record, key, default)


def _ablation_value(record: Any, name: str, kind: str) -> Any:
    """An ablation score/map from a record: a direct key (``score_kl`` / ``rgb_map``) or a nested
    dict (``ablation_scores`` / ``extra_scores`` / ``ablation_maps`` keyed by ablation name)."""
    direct = _get(record, f"score_{name}" if kind == "score" else ABLATION_MAP_COLUMN[name])
    if direct is not None:
        return direct
    containers = ("ablation_scores", "extra_scores", "scores") if kind == "score" \
        else ("ablation_maps", "extra_maps", "maps")
    for key in containers:
        box = _get(record, key)
        if isinstance(box, Mapping) and box.get(name) is not None:
            return box[name]
    return None


def _record_row(record: Any, run_id: str, category: str, model_version: str) -> dict[str, Any]:
    rel_path = _get(record, "rel_path", _get(record, "image_path"))
    if rel_path is None:
        raise ValueError(f"score record for category {category!r} has no rel_path")
    amap = _get(record, "anomaly_map")
    if amap is None:
        raise ValueError(f"score record {rel_path!r} has no anomaly_map")
    amap = _to_numpy(amap)
    if amap.ndim != 2:
        raise ValueError(f"score record {rel_path!r}: anomaly_map must be (H, W), got {amap.shape}")
    shape = (int(amap.shape[0]), int(amap.shape[1]))
    label = int(_get(record, "label"))
    if label not in (0, 1):
        raise ValueError(f"score record {rel_path!r}: label must be 0 or 1, got {label}")
    image_score = float(_get(record, "image_score"))
    row: dict[str, Any] = {
        "run_id": run_id,
        "category": category,
        "image_path": str(rel_path).replace("\\", "/"),
        "defect_type": str(_get(record, "defect_type", "good" if label == 0 else "unknown")),
        "label": label,
        "image_score": image_score,
        "map_height": shape[0],
        "map_width": shape[1],
        "anomaly_map": encode_map(amap),
        "kl_map": encode_map(_get(record, "kl_map"), shape),
        "feature_map": encode_map(_get(record, "feature_map"), shape),
        "rgb_map": encode_map(_ablation_value(record, "rgb", "map"), shape),
        "padim_map": encode_map(_ablation_value(record, "padim", "map"), shape),
        "mask": encode_mask(_get(record, "mask"), shape),
        "reconstruction": encode_png(_get(record, "reconstruction")),
        "input_png": encode_png(_get(record, "input_image", _get(record, "input_png"))),
        "model_version": model_version,
    }
    for name in ABLATIONS:
        value = _ablation_value(record, name, "score")
        row[f"score_{name}"] = None if value is None else float(value)
    return row


def _rows_to_table(rows: list[dict[str, Any]], metadata: dict[bytes, bytes]) -> pa.Table:
    columns = {f.name: [r[f.name] for r in rows] for f in SCORE_SCHEMA}
    return pa.Table.from_pydict(columns, schema=SCORE_SCHEMA.with_metadata(metadata))


def _atomic_write_table(table: pa.Table, path: Path) -> None:
    tmp = path.parent / f".{path.name}.{uuid.uuid4().hex}.tmp"
    try:
        pq.write_table(table, tmp, compression="zstd")
        os.replace(tmp, path)
    finally:
        if tmp.exists():
            tmp.unlink()


# ----------------------------------------------------------------------------- writing scores
def write_scores(
    run_dir: str | Path,
    category: str,
    records: Iterable[Any],
    model_version: str,
    *,
    rows_per_part: int = 64,
    alpha: float | None = None,
    alpha_source: str | None = None,
    preset: str | None = None,
) -> list[Path]:
    """Write a category's score partition, streaming ``rows_per_part`` rows per file.

    ``records``: ScoreRecord-like dataclasses or dicts (rel_path, defect_type, label, image_score,
    anomaly_map, kl_map, feature_map, mask, optional reconstruction / input_image, ablation scores
    and maps). ``alpha`` / ``alpha_source`` / ``preset`` are stored as file metadata and picked up by
    :func:`evaluate_run` (``alpha=None``: the records' own ``alpha`` attribute, if any). A rerun replaces the partition as a whole. Returns the part paths.
    """
    if rows_per_part < 1:
        raise ValueError("rows_per_part must be >= 1")
    run_dir = Path(run_dir)
    final = partition_dir(run_dir, category)
    root = final.parent
    root.mkdir(parents=True, exist_ok=True)
    run_id = run_dir.resolve().name
    meta = _score_metadata(run_id, category, model_version, alpha, alpha_source, preset)
    token = uuid.uuid4().hex
    staging = root / f".tmp-category={category}-{token}"
    staging.mkdir()
    names: list[str] = []
    try:
        rows: list[dict[str, Any]] = []
        for record in records:
            if alpha is None and _get(record, "alpha") is not None:
                # the scorer's records carry the alpha they were made with
                alpha = float(_get(record, "alpha"))
                meta = _score_metadata(run_id, category, model_version, alpha, alpha_source, preset)
            rows.append(_record_row(record, run_id, category, model_version))
            if len(rows) >= rows_per_part:
                names.append(_write_part(staging, len(names), rows, meta))
                rows = []
        if rows or not names:  # an empty category still gets one (empty) part with the schema
            names.append(_write_part(staging, len(names), rows, meta))
        _swap_in(staging, final, token)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    return [final / n for n in names]


def _score_metadata(run_id: str, category: str, model_version: str, alpha: float | None,
                    alpha_source: str | None, preset: str | None) -> dict[bytes, bytes]:
    return {SCORE_METADATA_KEY: json.dumps({
        "run_id": run_id, "category": category, "model_version": model_version,
        "alpha": alpha, "alpha_source": alpha_source, "preset": preset,
    }).encode()}


def _write_part(directory: Path, index: int, rows: list[dict[str, Any]],
                meta: dict[bytes, bytes]) -> str:
    name = f"part-{index:05d}.parquet"
    _atomic_write_table(_rows_to_table(rows, meta), directory / name)
    return name


def _swap_in(staging: Path, final: Path, token: str) -> None:
    """Replace ``final`` by ``staging`` with renames; the old generation is removed afterwards."""
    old = final.parent / f".old-{final.name}-{token}"
    if final.exists():
        os.replace(final, old)
    os.replace(staging, final)
    shutil.rmtree(old, ignore_errors=True)
    for stale in final.parent.glob(f".tmp-{final.name}-*"):
        # leftovers of an interrupted earlier write of this category (not a concurrent one:
        # one category is written by one process at a time)
        if stale != staging:
            shutil.rmtree(stale, ignore_errors=True)


# ----------------------------------------------------------------------------- reading scores
def _part_files(run_dir: Path, category: str) -> list[Path]:
    d = partition_dir(run_dir, category)
    parts = [p for p in d.iterdir() if _PART_RE.match(p.name)] if d.is_dir() else []
    return sorted(parts, key=lambda p: int(_PART_RE.match(p.name).group(1)))  # type: ignore[union-attr]


def _validate_schema(path: Path, schema: pa.Schema, expected: pa.Schema,
                     required: Sequence[str]) -> None:
    for name in required:
        idx = schema.get_field_index(name)
        if idx < 0:
            raise ResultsSchemaError(f"{path}: column {name!r} is missing")
        want = expected.field(name).type
        got = schema.field(idx).type
        if not (got == want or (pa.types.is_large_binary(got) and pa.types.is_binary(want))
                or (pa.types.is_large_string(got) and pa.types.is_string(want))):
            raise ResultsSchemaError(f"{path}: column {name!r} has type {got}, expected {want}")


def read_scores(run_dir: str | Path, categories: Sequence[str] | None = None,
                columns: Sequence[str] | None = None) -> pd.DataFrame:
    """Score rows of a run as a DataFrame (binary columns stay bytes; see :func:`iter_maps`).

    ``categories=None``: every category with a partition. A requested category without a partition
    raises ``FileNotFoundError``. Every file's schema is checked.
    """
    run_dir = Path(run_dir)
    cats = list_categories_in_run(run_dir) if categories is None else list(categories)
    cols = list(SCORE_SCHEMA.names) if columns is None else list(columns)
    unknown = [c for c in cols if c not in SCORE_SCHEMA.names]
    if unknown:
        raise ValueError(f"unknown score column(s) {unknown}; known: {SCORE_SCHEMA.names}")
    frames: list[pd.DataFrame] = []
    for cat in cats:
        parts = _part_files(run_dir, cat)
        if not parts:
            raise FileNotFoundError(f"no score partition for category {cat!r} in {scores_dir(run_dir)}")
        for path in parts:
            frames.append(_read_part(path, cols).to_pandas())
    if not frames:
        return pd.DataFrame({c: pd.Series(dtype=_pandas_dtype(SCORE_SCHEMA.field(c).type))
                             for c in cols})
    return pd.concat(frames, ignore_index=True)


def _pandas_dtype(t: pa.DataType) -> str:
    if pa.types.is_floating(t):
        return "float64"
    if pa.types.is_integer(t):
        return "int64"
    return "object"


def _read_part(path: Path, columns: Sequence[str]) -> pa.Table:
    try:
        schema = pq.read_schema(path)
    except (pa.ArrowInvalid, OSError) as exc:
        raise ResultsSchemaError(f"{path}: not a readable parquet file ({exc})") from exc
    _validate_schema(path, schema, SCORE_SCHEMA, columns)
    return pq.read_table(path, columns=list(columns))


def read_score_metadata(run_dir: str | Path, category: str) -> dict[str, Any]:
    """The metadata ``write_scores`` stored with a partition (alpha, alpha_source, preset, ...)."""
    parts = _part_files(Path(run_dir), category)
    if not parts:
        raise FileNotFoundError(f"no score partition for category {category!r} in {scores_dir(run_dir)}")
    meta = pq.read_schema(parts[0]).metadata or {}
    raw = meta.get(SCORE_METADATA_KEY)
    return json.loads(raw) if raw else {}


def iter_maps(
    run_dir: str | Path,
    categories: Sequence[str] | None = None,
    maps: Sequence[str] = ("anomaly_map", "mask"),
) -> Iterator[dict[str, Any]]:
    """Rows with their maps decoded to numpy, one part file at a time (memory stays bounded).

    Each dict has category, image_path, defect_type, label, image_score, model_version, the
    ablation scores, and for each name in ``maps`` the decoded array (float32 maps, uint8 mask,
    uint8 RGB images for reconstruction/input_png) or ``None``.
    """
    run_dir = Path(run_dir)
    bad = [m for m in maps if m not in MAP_COLUMNS + PNG_COLUMNS + ("mask",)]
    if bad:
        raise ValueError(f"unknown map column(s) {bad}")
    meta_cols = ["category", "image_path", "defect_type", "label", "image_score", "model_version",
                 "map_height", "map_width"] + [f"score_{a}" for a in ABLATIONS]
    cats = list_categories_in_run(run_dir) if categories is None else list(categories)
    for cat in cats:
        parts = _part_files(run_dir, cat)
        if not parts:
            raise FileNotFoundError(f"no score partition for category {cat!r} in {scores_dir(run_dir)}")
        for path in parts:
            table = _read_part(path, meta_cols + list(maps))
            data = table.to_pydict()
            for i in range(table.num_rows):
                h, w = data["map_height"][i], data["map_width"][i]
                row = {c: data[c][i] for c in meta_cols}
                for m in maps:
                    blob = data[m][i]
                    if m == "mask":
                        row[m] = decode_mask(blob, h, w)
                    elif m in PNG_COLUMNS:
                        row[m] = decode_png(blob)
                    else:
                        row[m] = decode_map(blob, h, w)
                yield row


# ----------------------------------------------------------------------------- metrics table
def write_metrics(run_dir: str | Path, df: pd.DataFrame) -> Path:
    """Write ``metrics.parquet`` atomically (columns: METRICS_SCHEMA; missing optional ones null)."""
    missing = [c for c in ("category",) if c not in df.columns]
    if missing:
        raise ResultsSchemaError(f"metrics table lacks column(s) {missing}")
    extra = [c for c in df.columns if c not in METRICS_SCHEMA.names]
    if extra:
        raise ResultsSchemaError(f"metrics table has unknown column(s) {extra}")
    path = metrics_path(run_dir)
    path.parent.mkdir(parents=True, exist_ok=True)
    _atomic_write_table(_metrics_table(df), path)
    return path


def _metrics_table(df: pd.DataFrame) -> pa.Table:
    data: dict[str, list[Any]] = {}
    for field in METRICS_SCHEMA:
        if field.name in df.columns:
            data[field.name] = [_clean(v, field.type) for v in df[field.name].tolist()]
        else:
            data[field.name] = [None] * len(df)
    return pa.Table.from_pydict(data, schema=METRICS_SCHEMA)


def _drop_empty_ablations(df: pd.DataFrame) -> pd.DataFrame:
    empty = [c for c, _ in _METRIC_ABLATION if c in df.columns and df[c].isna().all()]
    return df.drop(columns=empty)


def _clean(value: Any, t: pa.DataType) -> Any:
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return None
    if pa.types.is_floating(t):
        return float(value)
    if pa.types.is_integer(t):
        return int(value)
    return str(value)


def read_metrics(run_dir: str | Path) -> pd.DataFrame:
    """Read ``metrics.parquet`` (schema checked; ablation columns that are all null are dropped)."""
    path = metrics_path(run_dir)
    if not path.is_file():
        raise FileNotFoundError(f"{path} does not exist (run evaluation first)")
    try:
        schema = pq.read_schema(path)
    except (pa.ArrowInvalid, OSError) as exc:
        raise ResultsSchemaError(f"{path}: not a readable parquet file ({exc})") from exc
    _validate_schema(path, schema, METRICS_SCHEMA, METRICS_REQUIRED)
    return _drop_empty_ablations(pq.read_table(path).to_pandas())


# ----------------------------------------------------------------------------- evaluation
def _metric(fn: Any, *args: Any, **kwargs: Any) -> float:
    """A metric value, or NaN when it is undefined (e.g. a single class in the labels)."""
    try:
        value = float(fn(*args, **kwargs))
    except ValueError as exc:
        warnings.warn(f"metric {getattr(fn, '__name__', fn)} undefined: {exc}", stacklevel=3)
        return math.nan
    return value


def _category_metrics(run_dir: Path, category: str, fpr_limit: float) -> dict[str, Any]:
    from diffad_core import metrics as m

    present = set(pq.read_schema(_part_files(run_dir, category)[0]).names)
    map_cols = ["anomaly_map", "mask"] + [c for c in ("kl_map", "feature_map", "rgb_map",
                                                      "padim_map") if c in present]
    maps: dict[str, list[np.ndarray | None]] = {c: [] for c in map_cols}
    scores: dict[str, list[float | None]] = {"image_score": []} | {f"score_{a}": [] for a in ABLATIONS}
    labels: list[int] = []
    versions: set[str] = set()
    for row in iter_maps(run_dir, [category], maps=map_cols):
        labels.append(int(row["label"]))
        versions.add(row["model_version"])
        for c in map_cols:
            maps[c].append(row[c])
        for c in scores:
            scores[c].append(row[c])
    out: dict[str, Any] = {"category": category, "n_test": len(labels),
                           "model_version": ",".join(sorted(versions)) or None}
    if not labels:
        out["status"] = "empty partition"
        return out
    lab = np.asarray(labels, dtype=np.int64)
    masks = []
    missing_gt = 0
    for mk, amap, lb in zip(maps["mask"], maps["anomaly_map"], labels):
        if mk is None:
            missing_gt += int(lb == 1)
            mk = np.zeros(amap.shape, dtype=np.uint8)
        masks.append(mk)
    mask_arr = np.stack(masks)
    pixel_ok = missing_gt == 0
    out["status"] = "ok" if pixel_ok else f"no ground truth for {missing_gt} anomalous image(s)"

    def pixel_pair(col: str) -> tuple[float, float]:
        if not pixel_ok or col not in maps or any(x is None for x in maps[col]):
            return math.nan, math.nan
        arr = np.stack(maps[col])  # type: ignore[arg-type]
        return (_metric(m.pixel_auroc, arr, mask_arr),
                _metric(m.pro_score, arr, mask_arr, fpr_limit=fpr_limit))

    def image_metric(col: str) -> float:
        vals = scores[col]
        if any(v is None for v in vals):
            return math.nan
        return _metric(m.image_auroc, np.asarray(vals, dtype=np.float64), lab)

    out["pixel_auroc"], out["pro"] = pixel_pair("anomaly_map")
    out["image_auroc"] = image_metric("image_score")
    for abl in ABLATIONS:
        col = ABLATION_MAP_COLUMN[abl]
        has_map = col in maps and all(x is not None for x in maps[col])
        has_score = all(v is not None for v in scores[f"score_{abl}"])
        if has_map:
            out[f"pixel_auroc_{abl}"], out[f"pro_{abl}"] = pixel_pair(col)
        if has_score:
            out[f"image_auroc_{abl}"] = image_metric(f"score_{abl}")
    return out


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
    partition metadata. ``categories``: the expected categories (default: those with a partition, plus
    any named in ``timings``); an expected category without a partition gets a row with status
    ``"missing partition"`` and NaN metrics; so does a category listed in an earlier
    ``metrics.parquet`` of the run, whose timings are kept when ``timings`` does not give them.
    The mean row averages the rows with status ``ok``. Writes ``metrics.parquet`` unless
    ``write=False``.
    """
    run_dir = Path(run_dir)
    timings = dict(timings or {})
    previous = _previous_timings(run_dir)
    present = list_categories_in_run(run_dir)
    expected = list(categories) if categories is not None \
        else sorted(set(present) | {c for c in timings if c != MEAN_ROW} | set(previous))
    rows: list[dict[str, Any]] = []
    for cat in expected:
        if cat not in present:
            warnings.warn(f"category {cat!r} has no score partition in {scores_dir(run_dir)}",
                          stacklevel=2)
            row: dict[str, Any] = {"category": cat, "n_test": 0, "status": "missing partition"}
        else:
            row = _category_metrics(run_dir, cat, fpr_limit)
            meta = read_score_metadata(run_dir, cat)
            for key in ("alpha", "alpha_source", "preset"):
                if meta.get(key) is not None:
                    row[key] = meta[key]
        for key, value in previous.get(cat, {}).items():
            row.setdefault(key, value)
        for key, value in timings.get(cat, {}).items():
            if key in _TIMING_KEYS or key in ("alpha", "alpha_source", "model_version", "preset"):
                row[key] = value
        if preset is not None and row.get("preset") is None:
            row["preset"] = preset
        rows.append(row)
    df = pd.DataFrame(rows, columns=[c for c in METRICS_SCHEMA.names])
    df = pd.concat([df, _mean_row(df, preset).to_frame().T], ignore_index=True)
    if write:
        write_metrics(run_dir, df)
    # the same frame read_metrics() gives back for the written file
    return _drop_empty_ablations(_metrics_table(df).to_pandas())


def _previous_timings(run_dir: Path) -> dict[str, dict[str, Any]]:
    """Timings of an earlier ``metrics.parquet`` of this run, so re-evaluating from the parquet
    files alone (without the timings) keeps them."""
    path = metrics_path(run_dir)
    if not path.is_file():
        return {}
    try:
        df = read_metrics(run_dir)
    except ResultsSchemaError as exc:
        warnings.warn(f"ignoring the earlier {path}: {exc}", stacklevel=3)
        return {}
    out: dict[str, dict[str, Any]] = {}
    for rec in df.to_dict("records"):
        if rec["category"] == MEAN_ROW:
            continue
        out[rec["category"]] = {k: rec[k] for k in _TIMING_KEYS
                                if k in rec and rec[k] is not None and not pd.isna(rec[k])}
    return out


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
    presets = {p for p in df["preset"].dropna()} or ({preset} if preset else set())
    row["preset"] = ",".join(sorted(presets)) or None
    versions = {v for v in df["model_version"].dropna()}
    row["model_version"] = ",".join(sorted(versions)) if len(versions) > 1 else \
        (next(iter(versions)) if versions else None)
    sources = {s for s in df["alpha_source"].dropna()}
    row["alpha_source"] = ",".join(sorted(sources)) or None
    return row
