"""Score partitions: schema, round trips, plain pandas reads, atomic replacement, migration."""

from __future__ import annotations

import io
import json
import math
import os
from pathlib import Path

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from diffad_core.cli import main
from PIL import Image

from diffad_core import results as R
from diffad_core.results import storage
from diffad_core.config import ABLATIONS
from diffad_core.score import ScoreRecord
from tests.results_helpers import make_records


def test_round_trip_schema_and_decoding(tmp_path: Path) -> None:
    run = tmp_path / "results" / "run-1"
    recs = make_records("bottle")
    for r in recs:  # padim for every image, or the column is not stored
        r.ablation_maps["padim"] = np.ones((8, 8), np.float32)
    recs[0].ablation_scores["padim"] = 1.5
    paths = R.write_scores(run, "bottle", recs, "v3", rows_per_part=4)
    assert [p.name for p in paths] == ["part-00000.parquet", "part-00001.parquet"]
    assert paths[0].parent == run / "scores" / "category=bottle"
    schema = pq.read_schema(paths[0])
    assert schema.field("label").type == pa.int8()
    assert schema.field("anomaly_map").type == R.map_type(8, 8)
    assert schema.field("mask").type == R.map_type(8, 8, pa.uint8())
    stored = ("kl_map", "feature_map", "rgb_map", "padim_map")
    assert schema.remove_metadata() == R.score_schema(8, 8, maps=stored)
    assert R.validate_score_file(paths[0]).names == schema.names

    df = R.read_scores(run)
    assert len(df) == 6 and df.columns[0] == "category" and set(df["category"]) == {"bottle"}
    assert set(df["run_id"]) == {"run-1"} and set(df["model_version"]) == {"v3"}
    assert df["label"].tolist() == [0, 0, 0, 1, 1, 1]
    assert df.loc[0, "rel_path"] == "bottle/test/good/000.png"
    assert df["score_kl"].notna().all() and df["score_feature"].isna().all()
    assert df.loc[0, "score_padim"] == 1.5 and math.isnan(df.loc[1, "score_padim"])
    assert df.loc[0, "anomaly_map"].shape == (8, 8)

    rows = list(R.iter_maps(run, maps=("anomaly_map", "kl_map", "mask", "rgb_map", "padim_map")))
    for rec, row in zip(recs, rows):
        np.testing.assert_allclose(row["anomaly_map"], rec.anomaly_map, rtol=1e-3, atol=1e-3)
        np.testing.assert_allclose(row["kl_map"], rec.kl_map, rtol=1e-3, atol=1e-3)
        np.testing.assert_array_equal(row["mask"], rec.mask)
        assert row["mask"].dtype == np.uint8 and row["anomaly_map"].dtype == np.float32
        assert row["category"] == "bottle" and row["rel_path"] == rec.rel_path
    assert rows[0]["padim_map"] is not None
    assert R.read_score_metadata(run, "bottle")["alpha"] == 0.5
    assert R.read_score_metadata(run, "bottle")["format_version"] == R.FORMAT_VERSION


def test_written_partition_reads_without_diffad(tmp_path: Path) -> None:
    """Plain pyarrow and pandas read a partition; numpy alone turns a cell into the map."""
    recs = make_records("grid", n_good=1, n_bad=2, size=6)
    recon = np.random.default_rng(1).integers(0, 255, (6, 6, 3), dtype=np.uint8)
    R.write_scores(tmp_path, "grid", recs, "v1", reconstructions={recs[2].rel_path: recon})
    R.write_scores(tmp_path, "tile", make_records("tile", 1, 1, size=6), "v1")
    part = tmp_path / "scores" / "category=grid" / "part-00000.parquet"

    table = pq.read_table(part)
    h, w = table.column("map_height")[0].as_py(), table.column("map_width")[0].as_py()
    stack = table.column("anomaly_map").combine_chunks().to_numpy_ndarray()  # the type has H, W
    assert stack.shape == (3, h, w) and stack.dtype == np.float16
    np.testing.assert_array_equal(stack[1], recs[1].anomaly_map.astype(np.float16))

    df = pd.read_parquet(part)
    cell = df.loc[2, "anomaly_map"]
    assert isinstance(cell, np.ndarray) and cell.dtype == np.float16
    np.testing.assert_array_equal(np.reshape(cell, (h, w)), recs[2].anomaly_map.astype(np.float16))
    np.testing.assert_array_equal(np.reshape(df.loc[2, "mask"], (h, w)), recs[2].mask)
    np.testing.assert_array_equal(np.reshape(df.loc[2, "reconstruction"], (h, w, 3)), recon)
    assert df.loc[0, "reconstruction"] is None

    # the hive layout: pandas on the scores folder adds the category from the folder names
    every = pd.read_parquet(tmp_path / "scores")
    assert sorted(every["category"].astype(str).unique()) == ["grid", "tile"] and len(every) == 5
    assert R.scores_dataset(tmp_path).to_table().num_rows == 5


def test_images_and_metadata(tmp_path: Path) -> None:
    recs = make_records("grid", n_good=1, n_bad=1)
    recon = np.random.default_rng(1).integers(0, 255, (8, 8, 3), dtype=np.uint8)
    inp = np.full((8, 8, 3), 7, np.uint8)
    R.write_scores(tmp_path, "grid", recs, "v1", reconstructions={recs[1].rel_path: recon},
                   input_images={recs[1].rel_path: inp}, alpha=0.3, alpha_source="fixed",
                   preset="smoke")
    df = R.read_scores(tmp_path, columns=["rel_path", "reconstruction"])
    assert list(df.columns) == ["rel_path", "reconstruction"]
    assert df.loc[0, "reconstruction"] is None
    np.testing.assert_array_equal(df.loc[1, "reconstruction"], recon)
    row = list(R.iter_maps(tmp_path, maps=("input_image",)))[1]
    np.testing.assert_array_equal(row["input_image"], inp)
    meta = R.read_score_metadata(tmp_path, "grid")
    assert (meta["alpha"], meta["alpha_source"], meta["preset"]) == (0.3, "fixed", "smoke")
    part = next((tmp_path / "scores" / "category=grid").iterdir())
    meta = json.loads(pq.read_schema(part).metadata[R.SCORE_METADATA_KEY])
    assert meta["model_version"] == "v1" and meta["category"] == "grid" and meta["map_shape"] == [8, 8]


def test_typed_input_only(tmp_path: Path) -> None:
    rec = make_records("x", 1, 0)[0]
    with pytest.raises(TypeError, match="ScoreRecord"):
        R.write_scores(tmp_path, "x", [vars(rec)], "v")
    with pytest.raises(ValueError, match="label"):
        R.write_scores(tmp_path, "x", [ScoreRecord(**{**vars(rec), "label": 2})], "v")
    with pytest.raises(ValueError, match="differs from the anomaly map"):
        R.write_scores(tmp_path, "x", [ScoreRecord(**{**vars(rec), "mask": np.zeros((4, 4))})], "v")
    with pytest.raises(ValueError, match="unknown ablation scorer"):
        R.write_scores(tmp_path, "x", [ScoreRecord(**{**vars(rec), "ablation_scores": {"s": 1.0}})],
                       "v")
    with pytest.raises(ValueError, match=r"uint8 \(8, 8, 3\)"):
        R.write_scores(tmp_path, "x", [rec], "v",
                       reconstructions={rec.rel_path: np.zeros((8, 8, 3), np.float32)})
    with pytest.raises(ValueError, match="no record has"):
        R.write_scores(tmp_path, "x", [rec], "v", input_images={"elsewhere.png": np.zeros(
            (8, 8, 3), np.uint8)})
    other = make_records("x", 1, 0, size=6)[0]
    with pytest.raises(ValueError, match="differs from the anomaly map"):
        R.write_scores(tmp_path, "x", [rec, other], "v")
    no_rgb = ScoreRecord(**{**vars(rec), "rel_path": "y.png", "ablation_maps": {}})
    with pytest.raises(ValueError, match=r"\['rgb_map'\] given for some images"):
        R.write_scores(tmp_path, "x", [rec, no_rgb], "v")
    with pytest.raises(ValueError, match="invalid category"):
        R.write_scores(tmp_path, "../evil", [rec], "v")
    assert R.list_categories_in_run(tmp_path) == []
    assert sorted(p.name for p in (tmp_path / "scores").iterdir()) == []  # no staging left


def test_rerun_replaces_partition(tmp_path: Path) -> None:
    R.write_scores(tmp_path, "wood", make_records("wood", 4, 4), "v1", rows_per_part=2)
    assert len(list((tmp_path / "scores" / "category=wood").iterdir())) == 4
    R.write_scores(tmp_path, "wood", make_records("wood", 1, 1), "v2", rows_per_part=2)
    files = sorted(p.name for p in (tmp_path / "scores").rglob("*") if p.is_file())
    assert files == ["part-00000.parquet"]  # one generation, no temp dirs left
    assert sorted(p.name for p in (tmp_path / "scores").iterdir()) == ["category=wood"]
    df = R.read_scores(tmp_path)
    assert len(df) == 2 and set(df["model_version"]) == {"v2"}


def _only_old_partition(run: Path) -> None:
    df = R.read_scores(run)
    assert len(df) == 2 and set(df["model_version"]) == {"v1"}
    assert sorted(p.name for p in (run / "scores").iterdir()) == ["category=tile"]


def test_failed_record_stream_keeps_old_partition(tmp_path: Path) -> None:
    R.write_scores(tmp_path, "tile", make_records("tile", 1, 1), "v1")

    def broken():
        yield from make_records("tile", 2, 2)
        raise RuntimeError("scorer crashed")

    with pytest.raises(RuntimeError, match="scorer crashed"):
        R.write_scores(tmp_path, "tile", broken(), "v2", rows_per_part=1)
    _only_old_partition(tmp_path)


def test_failed_part_write_keeps_old_partition(tmp_path: Path, monkeypatch) -> None:
    """The disk fills up while the third part file is being written."""
    R.write_scores(tmp_path, "tile", make_records("tile", 1, 1), "v1")
    real = pq.write_table
    calls = []

    def failing(table, where, **kw):
        calls.append(where)
        if len(calls) == 3:
            Path(where).write_bytes(b"PAR1 half a file")
            raise OSError("No space left on device")
        real(table, where, **kw)

    monkeypatch.setattr(storage.pq, "write_table", failing)
    with pytest.raises(OSError, match="No space"):
        R.write_scores(tmp_path, "tile", make_records("tile", 3, 3), "v2", rows_per_part=2)
    monkeypatch.undo()
    _only_old_partition(tmp_path)


def test_failed_swap_puts_old_partition_back(tmp_path: Path, monkeypatch) -> None:
    R.write_scores(tmp_path, "tile", make_records("tile", 1, 1), "v1")
    real = os.replace

    def failing(src, dst):
        if Path(src).name.startswith(".tmp-category="):
            raise OSError("rename failed")
        real(src, dst)

    monkeypatch.setattr(storage.os, "replace", failing)
    with pytest.raises(OSError, match="rename failed"):
        R.write_scores(tmp_path, "tile", make_records("tile", 2, 2), "v2")
    monkeypatch.undo()
    _only_old_partition(tmp_path)


def test_crash_between_renames_is_recovered(tmp_path: Path) -> None:
    """A process killed after moving the old generation aside, before the new one was renamed
    in: the next write puts the old one back first, so a failing write still leaves it."""
    R.write_scores(tmp_path, "tile", make_records("tile", 1, 1), "v1")
    final = R.partition_dir(tmp_path, "tile")
    os.replace(final, final.parent / ".old-category=tile-deadbeef")
    (final.parent / ".tmp-category=tile-cafe").mkdir()  # the killed writer's staging folder

    def broken():
        raise RuntimeError("again")
        yield

    with pytest.raises(RuntimeError):
        R.write_scores(tmp_path, "tile", broken(), "v2")
    assert sorted(p.name for p in final.parent.iterdir()) == [".tmp-category=tile-cafe",
                                                               "category=tile"]
    R.write_scores(tmp_path, "tile", make_records("tile", 1, 1), "v3")
    assert sorted(p.name for p in final.parent.iterdir()) == ["category=tile"]


def test_wrong_schema_names_file_and_column(tmp_path: Path) -> None:
    R.write_scores(tmp_path, "pill", make_records("pill", 1, 1), "v")
    part = tmp_path / "scores" / "category=pill" / "part-00000.parquet"
    original = pq.read_table(part)
    pq.write_table(original.drop(["image_score"]), part)
    with pytest.raises(R.ResultsSchemaError, match=r"part-00000\.parquet.*'image_score'"):
        R.read_scores(tmp_path)
    idx = original.schema.get_field_index("label")
    pq.write_table(original.set_column(idx, "label", pa.array(["0", "1"])), part)
    with pytest.raises(R.ResultsSchemaError, match="'label' has type string"):
        R.read_scores(tmp_path, columns=["label"])
    with pytest.raises(FileNotFoundError, match="screw"):
        R.read_scores(tmp_path, categories=["screw"])
    with pytest.raises(ValueError, match="unknown score column"):
        R.read_scores(tmp_path, columns=["image_path"])


def test_empty_category_and_empty_run(tmp_path: Path) -> None:
    R.write_scores(tmp_path, "empty", [], "v")
    assert R.list_categories_in_run(tmp_path) == ["empty"]
    assert len(R.read_scores(tmp_path)) == 0
    assert len(R.read_scores(tmp_path / "nothing")) == 0
    assert len(R.read_category(tmp_path, "empty").labels) == 0


def test_real_score_record_ablation_dicts(tmp_path: Path) -> None:
    """kl and feature maps come from their own fields; rgb and padim from ablation_maps."""
    rng = np.random.default_rng(3)
    amap = rng.random((6, 6)).astype(np.float32)
    mask = np.zeros((6, 6), np.uint8)
    mask[1:3, 1:3] = 1
    rec = ScoreRecord(rel_path="c/test/crack/000.png", defect_type="crack", label=1,
                      image_score=0.9, anomaly_map=amap, kl_map=amap, feature_map=amap * 0.5,
                      mask=mask, category="c", alpha=0.4,
                      ablation_scores={a: 0.2 for a in ABLATIONS},
                      ablation_maps={"kl": amap, "feature": amap * 0.5, "rgb": amap * 3,
                                     "padim": amap + 1})
    R.write_scores(tmp_path, "c", [rec], "v1")
    df = R.read_scores(tmp_path)
    assert df.loc[0, "score_rgb"] == 0.2 and df.loc[0, "score_padim"] == 0.2
    row = next(R.iter_maps(tmp_path, maps=R.MAP_COLUMNS))
    np.testing.assert_allclose(row["padim_map"], amap + 1, atol=1e-2)
    np.testing.assert_allclose(row["feature_map"], amap * 0.5, atol=1e-3)
    assert R.read_score_metadata(tmp_path, "c")["alpha"] == 0.4


# ----------------------------------------------------------------------------- the old format
def _write_old_format_partition(run: Path, category: str, recs: list[ScoreRecord],
                                reconstruction: np.ndarray) -> None:
    """A partition exactly as the results code before format 2 wrote it: maps as float16 bytes,
    the mask as numpy.packbits (None for normal images), images as PNG bytes."""
    def png(a: np.ndarray) -> bytes:
        buf = io.BytesIO()
        Image.fromarray(a).save(buf, format="PNG")
        return buf.getvalue()

    binary = ["anomaly_map", "kl_map", "feature_map", "rgb_map", "padim_map", "mask",
              "reconstruction", "input_png"]
    schema = pa.schema(
        [("run_id", pa.string()), ("category", pa.string()), ("image_path", pa.string()),
         ("defect_type", pa.string()), ("label", pa.int8()), ("image_score", pa.float64()),
         ("map_height", pa.int32()), ("map_width", pa.int32())]
        + [(c, pa.binary()) for c in binary]
        + [(f"score_{a}", pa.float64()) for a in ABLATIONS] + [("model_version", pa.string())])
    rows = []
    for i, r in enumerate(recs):
        rows.append({
            "run_id": run.name, "category": category, "image_path": r.rel_path,
            "defect_type": r.defect_type, "label": r.label, "image_score": r.image_score,
            "map_height": 8, "map_width": 8,
            "anomaly_map": r.anomaly_map.astype(np.float16).tobytes(),
            "kl_map": r.kl_map.astype(np.float16).tobytes(),
            "feature_map": r.feature_map.astype(np.float16).tobytes(),
            "rgb_map": r.ablation_maps["rgb"].astype(np.float16).tobytes(), "padim_map": None,
            "mask": np.packbits(r.mask.ravel()).tobytes() if r.label else None,
            "reconstruction": png(reconstruction) if i == len(recs) - 1 else None,
            "input_png": None,
            **{f"score_{a}": r.ablation_scores.get(a) for a in ABLATIONS},
            "model_version": "old-v1",
        })
    meta = {b"diffad": json.dumps({"run_id": run.name, "category": category,
                                   "model_version": "old-v1", "alpha": 0.6,
                                   "alpha_source": "config", "preset": "paper"}).encode()}
    table = pa.Table.from_pylist(rows, schema=schema.with_metadata(meta))
    part = run / "scores" / f"category={category}" / "part-00000.parquet"
    part.parent.mkdir(parents=True)
    pq.write_table(table, part)


def test_migrate_old_format_run(tmp_path: Path) -> None:
    run = tmp_path / "results" / "old-run"
    recs = make_records("wood", 2, 3)
    recon = np.random.default_rng(5).integers(0, 255, (8, 8, 3), dtype=np.uint8)
    _write_old_format_partition(run, "wood", recs, recon)
    with pytest.raises(R.ResultsSchemaError, match="evaluate --migrate"):
        R.read_scores(run)
    assert R.is_legacy_partition(run, "wood")

    assert main(["evaluate", "--migrate", "--run-dir", str(run)]) == 0  # the CLI way
    assert R.migrate_run(run) == []  # already converted
    assert not R.is_legacy_partition(run, "wood")
    df = R.read_scores(run)
    assert df["rel_path"].tolist() == [r.rel_path for r in recs]
    assert set(df["model_version"]) == {"old-v1"} and set(df["run_id"]) == {"old-run"}
    assert df["padim_map"].isna().all()  # the old partition had no padim maps
    np.testing.assert_array_equal(df.loc[4, "reconstruction"], recon)
    for rec, row in zip(recs, R.iter_maps(run, maps=("anomaly_map", "rgb_map", "mask"))):
        np.testing.assert_array_equal(row["anomaly_map"], rec.anomaly_map.astype(np.float16))
        np.testing.assert_array_equal(row["mask"], rec.mask)  # None for normal -> zeros
    meta = R.read_score_metadata(run, "wood")
    assert (meta["alpha"], meta["preset"], meta["migrated_from_format"]) == (0.6, "paper", 1)
    assert R.evaluate_run(run, write=False).loc[0, "status"] == "ok"


def test_migrate_without_ground_truth_drops_the_mask(tmp_path: Path) -> None:
    run = tmp_path / "old"
    recs = make_records("wood", 1, 2)
    _write_old_format_partition(run, "wood", recs, np.zeros((8, 8, 3), np.uint8))
    table = pq.read_table(run / "scores" / "category=wood" / "part-00000.parquet")
    idx = table.schema.get_field_index("mask")
    table = table.set_column(idx, table.schema.field(idx), pa.nulls(3, pa.binary()))
    pq.write_table(table, run / "scores" / "category=wood" / "part-00000.parquet")
    with pytest.warns(UserWarning, match="mask is missing for 2 of 3"):
        R.migrate_run(run)
    assert R.read_category(run, "wood").mask is None
    df = R.evaluate_run(run, write=False)
    assert df.loc[0, "status"] == R.NO_GROUND_TRUTH and math.isnan(df.loc[0, "pixel_auroc"])


def test_runs_with_other_scorers_stay_readable(tmp_path: Path) -> None:
    """A partition written when score.ABLATIONS had other scorers: missing score/map columns
    read as null, unknown ones are ignored."""
    R.write_scores(tmp_path, "old", make_records("old", 2, 2), "v")
    part = R.part_files(tmp_path, "old")[0]
    table = pq.read_table(part).drop(["score_padim", "rgb_map"])
    table = table.append_column("score_retired", pa.array([1.0] * 4))
    pq.write_table(table, part)
    df = R.read_scores(tmp_path)
    assert df["score_padim"].isna().all() and df["rgb_map"].isna().all()
    assert "score_retired" not in df.columns
    data = R.read_category(tmp_path, "old")
    assert "rgb_map" not in data.maps and "padim" not in data.ablation_scores
    assert "kl" in data.ablation_scores
    assert R.evaluate_run(tmp_path, write=False).loc[0, "status"] == "ok"


def test_float16_overflow_is_an_error(tmp_path: Path) -> None:
    rec = make_records("x", 1, 0)[0]
    rec.feature_map = rec.feature_map * 1e6
    with pytest.raises(ValueError, match="feature_map: values up to .* overflow float16"):
        R.write_scores(tmp_path, "x", [rec], "v")
    assert R.list_categories_in_run(tmp_path) == []


def test_reading_and_report_do_not_import_torch() -> None:
    """Rebuilding a report or re-evaluating a run needs no model code (write_scores imports
    ScoreRecord, and with it torch, only when called)."""
    import subprocess
    import sys

    code = ("import sys, diffad_core.results, diffad_core.report; "
            "sys.exit('torch' in sys.modules)")
    assert subprocess.run([sys.executable, "-c", code], timeout=120).returncode == 0
