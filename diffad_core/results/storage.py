"""Score partitions on disk: the parquet schema, writing a category's partition atomically.

Layout under a run directory ``results/<run_id>/`` (hive partitioning, so
``pandas.read_parquet(run_dir / "scores")`` or ``pyarrow.dataset`` add a ``category`` column)::

    scores/category=<c>/part-00000.parquet   one row per test image (see score_schema)

Columns (format version 2; maps are Arrow tensors, readable without diffad)::

    run_id, rel_path, defect_type       string
    label                               int8 (1 = anomalous)
    image_score                         float64
    map_height, map_width               int32 (the same for every row of a partition)
    anomaly_map                         fixed_shape_tensor<float16>[H, W] (Eq. 11)
    <scorer>_map for each scorer of     fixed_shape_tensor<float16>[H, W]: kl_map, feature_map,
      config.ABLATIONS                    rgb_map, ...; stored when every record has that map
    mask                                fixed_shape_tensor<uint8>[H, W] {0, 1}; absent = no ground truth
    reconstruction, input_image         list<uint8>: the (H, W, 3) RGB image in C order; null = not made
    score_<scorer>                      float64, null = not computed
    model_version                       string

A pandas user gets a map as a flat numpy array (``row["anomaly_map"].reshape(H, W)``); pyarrow's
``to_numpy_ndarray()`` gives the (N, H, W) stack. Tensor columns hold no nulls: Arrow C++ before
26 cannot read null fixed-size lists back from parquet. A write builds the partition in a hidden
folder and swaps it in with renames, so readers never see half of one and a failed write leaves the
previous partition in place. The readers are in ``reading.py``.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import uuid
from collections.abc import Iterable, Iterator, Mapping, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import pyarrow as pa
import pyarrow.dataset as ds
import pyarrow.parquet as pq

from diffad_core._atomic import atomic_write, replace_dir
from diffad_core.config import ABLATIONS  # the scorer names' one definition

if TYPE_CHECKING:
    from diffad_core.score import ScoreRecord

FORMAT_VERSION = 2
SCORE_METADATA_KEY = b"diffad"
MEAN_ROW = "mean"  # the metrics table's summary row: never a category name
# the map column of each ablation scorer (its pixel metrics are computed from it)
ABLATION_MAP_COLUMN: dict[str, str] = {a: f"{a}_map" for a in ABLATIONS}
# scorers whose map is a ScoreRecord field of its own; the others' come from ablation_maps
_RECORD_FIELD = {"kl": "kl_map", "feature": "feature_map"}
MAP_COLUMNS: tuple[str, ...] = ("anomaly_map",) + tuple(ABLATION_MAP_COLUMN.values())
IMAGE_COLUMNS: tuple[str, ...] = ("reconstruction", "input_image")
SCORE_COLUMNS: tuple[str, ...] = tuple(f"score_{a}" for a in ABLATIONS)
_SCALAR_FIELDS = [
    pa.field("run_id", pa.string(), nullable=False),
    pa.field("rel_path", pa.string(), nullable=False),
    pa.field("defect_type", pa.string(), nullable=False),
    pa.field("label", pa.int8(), nullable=False),
    pa.field("image_score", pa.float64(), nullable=False),
    pa.field("map_height", pa.int32(), nullable=False),
    pa.field("map_width", pa.int32(), nullable=False),
]
# "element" is the list child's name that a parquet round trip gives back
_IMAGE_TYPE = pa.list_(pa.field("element", pa.uint8()))
_TAIL_FIELDS = ([pa.field(c, _IMAGE_TYPE) for c in IMAGE_COLUMNS]
                + [pa.field(c, pa.float64()) for c in SCORE_COLUMNS]
                + [pa.field("model_version", pa.string(), nullable=False)])
# every column a partition may hold, in file order ("category" comes from the folder name)
ALL_COLUMNS: tuple[str, ...] = tuple(
    [f.name for f in _SCALAR_FIELDS] + list(MAP_COLUMNS) + ["mask"] + [f.name for f in _TAIL_FIELDS])
_REQUIRED: tuple[str, ...] = (*(f.name for f in _SCALAR_FIELDS), "anomaly_map", "model_version")
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


def _check_category(category: str) -> str:
    if not isinstance(category, str) or not category or category.startswith(".") \
            or "/" in category or "\\" in category or "=" in category or category == MEAN_ROW:
        raise ValueError(f"invalid category name {category!r} for a results partition")
    return category


def list_categories_in_run(run_dir: str | Path) -> list[str]:
    """Categories that have a (complete) score partition in this run, sorted."""
    root = scores_dir(run_dir)
    if not root.is_dir():
        return []
    return sorted(p.name.split("=", 1)[1] for p in root.iterdir()
                  if p.is_dir() and p.name.startswith("category="))


def part_files(run_dir: str | Path, category: str) -> list[Path]:
    """The partition's part files in order (empty when there is no partition)."""
    d = partition_dir(run_dir, category)
    parts = [p for p in d.iterdir() if _PART_RE.match(p.name)] if d.is_dir() else []
    return sorted(parts, key=lambda p: int(_PART_RE.match(p.name).group(1)))  # type: ignore[union-attr]


def scores_dataset(run_dir: str | Path) -> ds.Dataset:
    """All partitions as one ``pyarrow.dataset`` (hive ``category`` column). Categories must share
    the map size and map columns; evaluation reads one partition at a time instead."""
    return ds.dataset(scores_dir(run_dir), format="parquet", partitioning="hive")


# ----------------------------------------------------------------------------- schema
def map_type(height: int, width: int, value_type: pa.DataType = pa.float16()) -> pa.DataType:
    """The tensor type of a stored map: ``fixed_shape_tensor<value_type>[height, width]``."""
    return pa.fixed_shape_tensor(value_type, (int(height), int(width)))


def score_schema(height: int, width: int, maps: Iterable[str] = ("anomaly_map",),
                 with_mask: bool = True) -> pa.Schema:
    """The schema of a partition whose maps are ``height x width`` and that stores ``maps``."""
    stored = set(maps) | {"anomaly_map"}
    unknown = stored - set(MAP_COLUMNS)
    if unknown:
        raise ValueError(f"unknown map column(s) {sorted(unknown)}; known: {MAP_COLUMNS}")
    fields = list(_SCALAR_FIELDS)
    fields += [pa.field(c, map_type(height, width), nullable=False) for c in MAP_COLUMNS
               if c in stored]
    if with_mask:
        fields.append(pa.field("mask", map_type(height, width, pa.uint8()), nullable=False))
    return pa.schema(fields + _TAIL_FIELDS)


def validate_score_file(path: str | Path) -> pa.Schema:
    """The schema of a part file, checked: the required columns are there and every known column
    has its type (ResultsSchemaError names the file and the column; a file of the format before
    version 2 says how to convert it). Map and score columns of scorers that this version does not
    know, or that the file lacks, are allowed: adding a scorer keeps older runs readable."""
    path = Path(path)
    try:
        schema = pq.read_schema(path)
    except (pa.ArrowInvalid, OSError) as exc:
        raise ResultsSchemaError(f"{path}: not a readable parquet file ({exc})") from exc
    if "image_path" in schema.names or "input_png" in schema.names:
        raise ResultsSchemaError(
            f"{path}: written by the results format before version {FORMAT_VERSION} (maps as "
            "bytes); convert the run with `diffad evaluate --migrate --run-dir RUN_DIR`")
    for name in _REQUIRED:
        if schema.get_field_index(name) < 0:
            raise ResultsSchemaError(f"{path}: column {name!r} is missing")
    amap = schema.field("anomaly_map").type
    if not isinstance(amap, pa.FixedShapeTensorType) or len(amap.shape) != 2:
        raise ResultsSchemaError(f"{path}: column 'anomaly_map' has type {amap}, expected a 2-D "
                                 "fixed_shape_tensor")
    expected = score_schema(*amap.shape, maps=MAP_COLUMNS)
    for field in schema:
        if field.name in expected.names and field.type != expected.field(field.name).type:
            raise ResultsSchemaError(f"{path}: column {field.name!r} has type {field.type}, "
                                     f"expected {expected.field(field.name).type}")
    return schema


# ----------------------------------------------------------------------------- records -> rows
def _map_array(value: Any, what: str, shape: tuple[int, int] | None) -> np.ndarray:
    a = np.asarray(value)
    if a.ndim != 2:
        raise ValueError(f"{what} must be 2-D (H, W), got shape {a.shape}")
    if shape is not None and a.shape != shape:
        raise ValueError(f"{what} has shape {a.shape}, which differs from the anomaly map's {shape}")
    return a


def _image_array(value: Any, what: str, shape: tuple[int, int]) -> np.ndarray:
    a = np.asarray(value)
    if a.dtype != np.uint8 or a.shape != shape + (3,):
        raise ValueError(f"{what} must be uint8 {shape + (3,)} (the map's size, RGB), got "
                         f"{a.dtype} {a.shape}")
    return a


def _record_row(rec: ScoreRecord, shape: tuple[int, int] | None,
                images: Mapping[str, Mapping[str, np.ndarray]], record_type: type) -> dict[str, Any]:
    """One record as a row of numpy values (maps not yet encoded)."""
    if not isinstance(rec, record_type):
        raise TypeError(f"write_scores takes diffad_core.score.ScoreRecord objects, got "
                        f"{type(rec).__name__}")
    what = f"score record {rec.rel_path!r}"
    if rec.label not in (0, 1):
        raise ValueError(f"{what}: label must be 0 or 1, got {rec.label}")
    amap = _map_array(rec.anomaly_map, f"{what}: anomaly_map", shape)
    shape = (int(amap.shape[0]), int(amap.shape[1]))
    unknown = (set(rec.ablation_scores) | set(rec.ablation_maps)) - set(ABLATIONS)
    if unknown:
        raise ValueError(f"{what}: unknown ablation scorer(s) {sorted(unknown)}; known: {ABLATIONS}")
    given = {"anomaly_map": amap} | {
        col: getattr(rec, _RECORD_FIELD[a]) if a in _RECORD_FIELD else rec.ablation_maps.get(a)
        for a, col in ABLATION_MAP_COLUMN.items()}
    row: dict[str, Any] = {
        "rel_path": str(rec.rel_path).replace("\\", "/"), "defect_type": str(rec.defect_type),
        "label": int(rec.label), "image_score": float(rec.image_score),
        "map_height": shape[0], "map_width": shape[1],
    }
    for col, value in given.items():
        if value is not None:
            row[col] = _map_array(value, f"{what}: {col}", shape)
    if rec.mask is not None:
        row["mask"] = (_map_array(rec.mask, f"{what}: mask", shape) > 0).astype(np.uint8)
    for col in IMAGE_COLUMNS:
        img = images.get(col, {}).get(rec.rel_path)
        row[col] = None if img is None else _image_array(img, f"{what}: {col}", shape)
    for name in ABLATIONS:
        value = rec.ablation_scores.get(name)
        row[f"score_{name}"] = None if value is None else float(value)
    return row


def _tensor_column(name: str, arrays: Sequence[np.ndarray], typ: pa.DataType) -> pa.Array:
    size = int(np.prod(typ.shape))
    values = np.concatenate([np.ravel(a) for a in arrays]) if arrays else np.zeros(0)
    with np.errstate(over="ignore"):  # checked just below
        flat = values.astype(typ.value_type.to_pandas_dtype())
    if flat.dtype == np.float16 and np.isinf(flat).any() and np.isfinite(values).all():
        raise ValueError(f"{name}: values up to {np.abs(values).max():.4g} overflow float16 "
                         "(largest 65504); scale the map before writing")
    storage = pa.FixedSizeListArray.from_arrays(pa.array(flat, type=typ.value_type), size)
    return pa.ExtensionArray.from_storage(typ, storage)


def _rows_to_table(rows: list[dict[str, Any]], schema: pa.Schema) -> pa.Table:
    columns = []
    for field in schema:
        values = [r[field.name] for r in rows]
        if isinstance(field.type, pa.FixedShapeTensorType):
            columns.append(_tensor_column(field.name, values, field.type))
        elif field.name in IMAGE_COLUMNS:
            columns.append(pa.array([None if v is None else v.ravel() for v in values],
                                    type=field.type))
        else:
            columns.append(pa.array(values, type=field.type))
    return pa.Table.from_arrays(columns, schema=schema)


# ----------------------------------------------------------------------------- writing
def write_scores(
    run_dir: str | Path,
    category: str,
    records: Iterable[ScoreRecord],
    model_version: str,
    *,
    reconstructions: Mapping[str, np.ndarray] | None = None,
    input_images: Mapping[str, np.ndarray] | None = None,
    rows_per_part: int = 64,
    alpha: float | None = None,
    alpha_source: str | None = None,
    preset: str | None = None,
) -> list[Path]:
    """Write a category's score partition, streaming ``rows_per_part`` rows per file; a rerun
    replaces the partition as a whole. Returns the part paths.

    ``records``: :class:`~diffad_core.score.ScoreRecord` objects, all with maps of one size and the
    same maps given (the first record decides which map columns the partition stores).
    ``reconstructions`` / ``input_images``: ``{rel_path: uint8 (H, W, 3)}`` at the map's size, for
    the images that have one (a key that matches no record is an error). ``alpha`` /
    ``alpha_source`` / ``preset`` go into the file metadata (``alpha=None``: the first record's).
    """
    # Imported here, not at the top: score.py brings torch and the model code (6.8 s against
    # 1.0 s to import this package, measured), which readers, evaluation and the report never need.
    from diffad_core.score import ScoreRecord

    if rows_per_part < 1:
        raise ValueError("rows_per_part must be >= 1")
    run_dir = Path(run_dir)
    images = {"reconstruction": dict(reconstructions or {}), "input_image": dict(input_images or {})}
    meta = {"run_id": run_dir.resolve().name, "category": _check_category(category),
            "model_version": model_version, "alpha": alpha, "alpha_source": alpha_source,
            "preset": preset}
    seen: set[str] = set()

    def rows() -> Iterator[dict[str, Any]]:
        shape: tuple[int, int] | None = None
        for rec in records:
            row = _record_row(rec, shape, images, ScoreRecord)
            shape = (row["map_height"], row["map_width"])
            if meta["alpha"] is None:
                meta["alpha"] = float(rec.alpha)
            seen.add(rec.rel_path)
            yield row
        stray = sorted({k for box in images.values() for k in box} - seen)
        if stray:
            raise ValueError(f"images given for {len(stray)} rel_path(s) that no record has, "
                             f"e.g. {stray[:3]}")

    return _write_partition(run_dir, category, rows(), model_version, meta, rows_per_part)


def _write_partition(run_dir: Path, category: str, rows: Iterable[dict[str, Any]],
                     model_version: str, meta: dict[str, Any], rows_per_part: int) -> list[Path]:
    """Write row dicts (numpy maps) into a hidden staging folder, then swap it in."""
    final = partition_dir(run_dir, category)
    final.parent.mkdir(parents=True, exist_ok=True)
    _restore_interrupted_swap(final)
    token = uuid.uuid4().hex
    staging = final.parent / f".tmp-{final.name}-{token}"
    staging.mkdir()
    names: list[str] = []
    schema: pa.Schema | None = None
    try:
        batch: list[dict[str, Any]] = []
        for row in rows:
            row["run_id"], row["model_version"] = meta["run_id"], model_version
            if schema is None:
                schema = _schema_of(row, meta)
            elif (missing := set(schema.names) ^ (set(row) & set(ALL_COLUMNS))):
                raise ValueError(f"score record {row['rel_path']!r}: map(s) {sorted(missing)} given "
                                 "for some images of the category but not for others")
            batch.append(row)
            if len(batch) >= rows_per_part:
                names.append(_write_part(staging, len(names), batch, schema))
                batch = []
        if batch or not names:  # an empty category still gets one (empty) part with a schema
            names.append(_write_part(staging, len(names), batch, schema or _schema_of(None, meta)))
        _swap_in(staging, final)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    return [final / n for n in names]


def _schema_of(row: dict[str, Any] | None, meta: dict[str, Any]) -> pa.Schema:
    if row is None:  # no rows: a placeholder map size
        schema, shape = score_schema(1, 1), None
    else:
        schema = score_schema(row["map_height"], row["map_width"],
                              maps=[c for c in MAP_COLUMNS if c in row], with_mask="mask" in row)
        shape = [row["map_height"], row["map_width"]]
    blob = json.dumps({**meta, "format_version": FORMAT_VERSION, "map_shape": shape})
    return schema.with_metadata({SCORE_METADATA_KEY: blob.encode()})


def _write_part(directory: Path, index: int, rows: list[dict[str, Any]], schema: pa.Schema) -> str:
    name = f"part-{index:05d}.parquet"
    table = _rows_to_table(rows, schema)
    # dictionaries and min/max statistics only for the scalar columns: on maps they cost time
    # and are never used
    scalars = [f.name for f in schema
               if not isinstance(f.type, pa.FixedShapeTensorType) and f.name not in IMAGE_COLUMNS]
    atomic_write(directory / name, lambda tmp: pq.write_table(
        table, tmp, compression="zstd", use_dictionary=scalars, write_statistics=scalars))
    return name


def _swap_in(staging: Path, final: Path) -> None:
    """Replace ``final`` by ``staging`` (``_atomic.replace_dir``), then remove the leftovers of
    interrupted earlier writes."""
    replace_dir(staging, final)
    for stale in final.parent.glob(f".tmp-{final.name}-*"):
        # leftovers of an interrupted earlier write (one category has one writer at a time)
        shutil.rmtree(stale, ignore_errors=True)


def _restore_interrupted_swap(final: Path) -> None:
    """A crash between the two renames of ``replace_dir`` leaves only ``.old-<name>-*``: put it
    back before writing, so that a failure of this write still leaves the old partition."""
    olds = sorted(final.parent.glob(f".old-{final.name}-*"), key=lambda p: p.stat().st_mtime)
    if not final.exists() and olds:
        os.replace(olds[-1], final)
        olds = olds[:-1]
    for stale in olds:
        shutil.rmtree(stale, ignore_errors=True)
