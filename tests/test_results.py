"""Parquet results: schema, round trips, atomic partition replacement, evaluation from parquet."""

from __future__ import annotations

import io
import json
import math
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from PIL import Image
from sklearn.metrics import roc_auc_score

from diffad_core import results as R


@dataclass
class _Rec:
    rel_path: str
    defect_type: str
    label: int
    image_score: float
    anomaly_map: np.ndarray
    kl_map: np.ndarray | None
    feature_map: np.ndarray | None
    mask: np.ndarray
    alpha: float = 0.5
    ablation_scores: dict[str, float] = field(default_factory=dict)
    ablation_maps: dict[str, np.ndarray] = field(default_factory=dict)


def _records(category: str, n_good: int = 3, n_bad: int = 3, size: int = 8, seed: int = 0,
             as_dict: bool = False) -> list:
    """Tiny records: anomalous images have a 3x3 defect that the map highlights (noisily)."""
    rng = np.random.default_rng(seed)
    out = []
    for i in range(n_good + n_bad):
        label = int(i >= n_good)
        mask = np.zeros((size, size), np.uint8)
        amap = rng.random((size, size)).astype(np.float32)
        if label:
            r, c = rng.integers(0, size - 3, 2)
            mask[r:r + 3, c:c + 3] = 1
            amap[r:r + 3, c:c + 3] += 0.7
        kw = dict(
            rel_path=f"{category}/test/{'bad' if label else 'good'}/{i:03d}.png",
            defect_type="bad" if label else "good", label=label,
            image_score=float(np.sort(amap.ravel())[-4:].mean()), anomaly_map=amap,
            kl_map=amap * 2.0, feature_map=rng.random((size, size)).astype(np.float32), mask=mask,
            ablation_scores={"kl": float(amap.max()), "rgb": float(rng.random())},
            ablation_maps={"rgb": rng.random((size, size)).astype(np.float32)},
        )
        out.append(kw if as_dict else _Rec(**kw))
    return out


def test_round_trip_schema_and_decoding(tmp_path: Path) -> None:
    run = tmp_path / "results" / "run-1"
    recs = _records("bottle")
    recs[0].ablation_maps["padim"] = np.ones((8, 8), np.float32)
    recs[0].ablation_scores["padim"] = 1.5
    paths = R.write_scores(run, "bottle", recs, "v3", rows_per_part=4)
    assert [p.name for p in paths] == ["part-00000.parquet", "part-00001.parquet"]
    assert paths[0].parent == run / "scores" / "category=bottle"
    schema = pq.read_schema(paths[0])
    assert schema.field("label").type == pa.int8()
    assert schema.field("anomaly_map").type == pa.binary()
    assert schema.field("image_score").type == pa.float64()

    df = R.read_scores(run)
    assert len(df) == 6
    assert set(df["run_id"]) == {"run-1"} and set(df["model_version"]) == {"v3"}
    assert df["label"].tolist() == [0, 0, 0, 1, 1, 1]
    assert df.loc[0, "image_path"] == "bottle/test/good/000.png"
    assert df["score_kl"].notna().all() and df["score_feature"].isna().all()
    assert df.loc[0, "score_padim"] == 1.5 and math.isnan(df.loc[1, "score_padim"])

    rows = list(R.iter_maps(run, maps=("anomaly_map", "kl_map", "mask", "rgb_map", "padim_map")))
    for rec, row in zip(recs, rows):
        np.testing.assert_allclose(row["anomaly_map"], rec.anomaly_map, rtol=1e-3, atol=1e-3)
        np.testing.assert_allclose(row["kl_map"], rec.kl_map, rtol=1e-3, atol=1e-3)
        np.testing.assert_array_equal(row["mask"], rec.mask)
        assert row["mask"].dtype == np.uint8 and row["anomaly_map"].dtype == np.float32
    assert rows[0]["padim_map"] is not None and rows[1]["padim_map"] is None
    assert R.read_score_metadata(run, "bottle")["alpha"] == 0.5


def test_dict_records_png_and_column_subset(tmp_path: Path) -> None:
    recs = _records("grid", n_good=1, n_bad=1, as_dict=True)
    recon = np.random.default_rng(1).integers(0, 255, (8, 8, 3), dtype=np.uint8)
    recs[1]["reconstruction"] = recon
    R.write_scores(tmp_path, "grid", recs, "v1", alpha=0.3, alpha_source="fixed", preset="smoke")
    df = R.read_scores(tmp_path, columns=["image_path", "reconstruction"])
    assert list(df.columns) == ["image_path", "reconstruction"]
    assert df.loc[0, "reconstruction"] is None
    with Image.open(io.BytesIO(df.loc[1, "reconstruction"])) as im:
        np.testing.assert_array_equal(np.asarray(im), recon)
    meta = R.read_score_metadata(tmp_path, "grid")
    assert (meta["alpha"], meta["alpha_source"], meta["preset"]) == (0.3, "fixed", "smoke")


def test_mask_packing_odd_size() -> None:
    m = (np.random.default_rng(0).random((5, 7)) > 0.5).astype(np.uint8)
    blob = R.encode_mask(m)
    assert len(blob) == math.ceil(35 / 8)
    np.testing.assert_array_equal(R.decode_mask(blob, 5, 7), m)
    with pytest.raises(R.ResultsSchemaError):
        R.decode_mask(blob, 8, 8)


def test_rerun_replaces_partition(tmp_path: Path) -> None:
    R.write_scores(tmp_path, "wood", _records("wood", 4, 4), "v1", rows_per_part=2)
    assert len(list((tmp_path / "scores" / "category=wood").iterdir())) == 4
    R.write_scores(tmp_path, "wood", _records("wood", 1, 1), "v2", rows_per_part=2)
    files = sorted(p.name for p in (tmp_path / "scores").rglob("*") if p.is_file())
    assert files == ["part-00000.parquet"]  # one generation, no temp dirs left
    assert sorted(p.name for p in (tmp_path / "scores").iterdir()) == ["category=wood"]
    df = R.read_scores(tmp_path)
    assert len(df) == 2 and set(df["model_version"]) == {"v2"}


def test_failed_write_keeps_old_partition(tmp_path: Path) -> None:
    R.write_scores(tmp_path, "tile", _records("tile", 1, 1), "v1")

    def broken():
        yield from _records("tile", 2, 2)
        raise RuntimeError("scorer crashed")

    with pytest.raises(RuntimeError, match="scorer crashed"):
        R.write_scores(tmp_path, "tile", broken(), "v2", rows_per_part=1)
    df = R.read_scores(tmp_path)
    assert len(df) == 2 and set(df["model_version"]) == {"v1"}
    assert sorted(p.name for p in (tmp_path / "scores").iterdir()) == ["category=tile"]


def test_bad_records_are_rejected(tmp_path: Path) -> None:
    rec = _records("x", 1, 0, as_dict=True)[0]
    with pytest.raises(ValueError, match="label"):
        R.write_scores(tmp_path, "x", [dict(rec, label=2)], "v")
    with pytest.raises(ValueError, match="differs from the anomaly map"):
        R.write_scores(tmp_path, "x", [dict(rec, mask=np.zeros((4, 4), np.uint8))], "v")
    with pytest.raises(ValueError, match="invalid category"):
        R.write_scores(tmp_path, "../evil", [rec], "v")
    assert R.list_categories_in_run(tmp_path) == []


def test_wrong_schema_names_file_and_column(tmp_path: Path) -> None:
    R.write_scores(tmp_path, "pill", _records("pill", 1, 1), "v")
    part = tmp_path / "scores" / "category=pill" / "part-00000.parquet"
    table = pq.read_table(part).drop(["image_score"])
    pq.write_table(table, part)
    with pytest.raises(R.ResultsSchemaError, match=r"part-00000\.parquet.*'image_score'"):
        R.read_scores(tmp_path)
    table = pq.read_table(part).set_column(
        4, "label", pa.array(["0", "1"]))  # label as strings
    pq.write_table(table, part)
    with pytest.raises(R.ResultsSchemaError, match="'label' has type string"):
        R.read_scores(tmp_path, columns=["label"])
    with pytest.raises(FileNotFoundError, match="screw"):
        R.read_scores(tmp_path, categories=["screw"])


def test_empty_category_and_empty_run(tmp_path: Path) -> None:
    R.write_scores(tmp_path, "empty", [], "v")
    assert R.list_categories_in_run(tmp_path) == ["empty"]
    assert len(R.read_scores(tmp_path)) == 0
    assert len(R.read_scores(tmp_path / "nothing")) == 0


def test_evaluate_run_from_parquet(tmp_path: Path) -> None:
    R.write_scores(tmp_path, "a", _records("a", seed=1), "v1", alpha=0.5, alpha_source="fixed",
                   preset="smoke")
    R.write_scores(tmp_path, "b", _records("b", seed=2), "v1", alpha=0.7,
                   alpha_source="synthetic", preset="smoke")
    timings = {"a": {"train_seconds": 10.0, "score_ms_per_image": 4.0},
               "b": {"train_seconds": 20.0, "score_ms_per_image": 6.0}}
    with pytest.warns(UserWarning, match="'c' has no score partition"):
        df = R.evaluate_run(tmp_path, timings, categories=["a", "b", "c"])
    assert df["category"].tolist() == ["a", "b", "c", "mean"]
    # pixel AUROC equals sklearn's on the float16 maps read back
    rows = list(R.iter_maps(tmp_path, ["a"]))
    maps = np.stack([r["anomaly_map"] for r in rows])
    masks = np.stack([r["mask"] for r in rows])
    expect = roc_auc_score(masks.ravel(), maps.ravel())
    assert df.loc[0, "pixel_auroc"] == pytest.approx(expect, abs=1e-12)
    img = roc_auc_score([r["label"] for r in rows], [r["image_score"] for r in rows])
    assert df.loc[0, "image_auroc"] == pytest.approx(img)
    assert 0.0 <= df.loc[0, "pro"] <= 1.0
    assert df.loc[1, "alpha"] == 0.7 and df.loc[1, "alpha_source"] == "synthetic"
    assert df.loc[2, "status"] == "missing partition" and math.isnan(df.loc[2, "pixel_auroc"])
    mean = df.iloc[3]
    assert mean["pixel_auroc"] == pytest.approx(df.loc[:1, "pixel_auroc"].mean())
    assert mean["train_seconds"] == pytest.approx(15.0)
    assert mean["n_test"] == 12 and mean["status"] == "mean of 2 of 3 categories"
    # ablations: kl map + score present, rgb map + score present, padim absent
    assert "pixel_auroc_kl" in df.columns and "image_auroc_rgb" in df.columns
    assert "pixel_auroc_padim" not in df.columns
    # kl_map = 2 * anomaly_map: a monotone transform keeps AUROC (up to float16 ties)
    assert df.loc[0, "pixel_auroc_kl"] == pytest.approx(df.loc[0, "pixel_auroc"], abs=0.01)

    back = R.read_metrics(tmp_path)
    pd.testing.assert_frame_equal(back.reset_index(drop=True), df.reset_index(drop=True),
                                  check_dtype=False)


def test_evaluate_single_class_gives_nan_not_crash(tmp_path: Path) -> None:
    R.write_scores(tmp_path, "good_only", _records("g", n_good=2, n_bad=0), "v")
    with pytest.warns(UserWarning, match="undefined"):
        df = R.evaluate_run(tmp_path, write=False)
    assert math.isnan(df.loc[0, "pixel_auroc"]) and math.isnan(df.loc[0, "image_auroc"])
    assert not R.metrics_path(tmp_path).exists()


def test_metrics_schema_validation(tmp_path: Path) -> None:
    with pytest.raises(R.ResultsSchemaError, match="unknown column"):
        R.write_metrics(tmp_path, pd.DataFrame({"category": ["a"], "bogus": [1]}))
    pq.write_table(pa.table({"category": ["a"], "pixel_auroc": ["high"]}), R.metrics_path(tmp_path))
    with pytest.raises(R.ResultsSchemaError, match=r"metrics\.parquet.*'pixel_auroc'"):
        R.read_metrics(tmp_path)
    with pytest.raises(FileNotFoundError):
        R.read_metrics(tmp_path / "none")


def test_metadata_is_json(tmp_path: Path) -> None:
    R.write_scores(tmp_path, "m", _records("m", 1, 1), "v9")
    part = next((tmp_path / "scores" / "category=m").iterdir())
    meta = json.loads(pq.read_schema(part).metadata[R.SCORE_METADATA_KEY])
    assert meta["model_version"] == "v9" and meta["category"] == "m"


def test_real_score_record_and_flow_dicts(tmp_path: Path) -> None:
    """The scorer's own ScoreRecord (ablation dicts) and its vars() plus a reconstruction."""
    from diffad_core.score import ScoreRecord

    rng = np.random.default_rng(3)
    amap = rng.random((6, 6)).astype(np.float32)
    mask = np.zeros((6, 6), np.uint8)
    mask[1:3, 1:3] = 1
    rec = ScoreRecord(rel_path="c/test/crack/000.png", defect_type="crack", label=1,
                      image_score=0.9, anomaly_map=amap, kl_map=amap, feature_map=amap, mask=mask,
                      category="c", alpha=0.4, ablation_scores={"rgb": 0.2, "padim": 3.0},
                      ablation_maps={"rgb": amap * 3, "padim": amap + 1})
    row = dict(vars(rec), reconstruction=np.zeros((6, 6, 3), np.uint8))
    R.write_scores(tmp_path, "c", [rec, dict(row, rel_path="c/test/crack/001.png")], "v1")
    df = R.read_scores(tmp_path)
    assert df["score_rgb"].tolist() == [0.2, 0.2] and df["score_padim"].tolist() == [3.0, 3.0]
    assert df.loc[0, "reconstruction"] is None and df.loc[1, "reconstruction"] is not None
    got = next(R.iter_maps(tmp_path, maps=("padim_map",)))["padim_map"]
    np.testing.assert_allclose(got, amap + 1, atol=1e-3)
    assert R.read_score_metadata(tmp_path, "c")["alpha"] == 0.4


def test_evaluate_golden_numbers(tmp_path: Path) -> None:
    """Hand-computed: one defect pixel scoring 0.5 against 7 normal pixels
    (0.75, 0.25, 0, 0, 0.125, 0.25, 0.5): AUROC = (5 + 0.5 tie) / 7."""
    bad = {"rel_path": "b.png", "defect_type": "d", "label": 1, "image_score": 0.9,
           "anomaly_map": np.array([[0.5, 0.75], [0.25, 0.0]], np.float32),
           "kl_map": None, "feature_map": None, "mask": np.array([[1, 0], [0, 0]], np.uint8)}
    good = {"rel_path": "g.png", "defect_type": "good", "label": 0, "image_score": 0.1,
            "anomaly_map": np.array([[0.0, 0.125], [0.25, 0.5]], np.float32),
            "kl_map": None, "feature_map": None, "mask": None}
    R.write_scores(tmp_path, "gold", [bad, good], "v")
    df = R.evaluate_run(tmp_path)
    assert df.loc[0, "pixel_auroc"] == pytest.approx(5.5 / 7, abs=1e-12)
    assert df.loc[0, "image_auroc"] == 1.0 and df.loc[0, "n_test"] == 2
    assert df.loc[0, "status"] == "ok"
    assert not any(c.endswith("_kl") for c in df.columns)


def test_reevaluation_keeps_timings_and_reports_lost_partitions(tmp_path: Path) -> None:
    R.write_scores(tmp_path, "a", _records("a"), "v")
    R.write_scores(tmp_path, "b", _records("b"), "v")
    R.evaluate_run(tmp_path, {"a": {"train_seconds": 7.0}, "b": {"train_seconds": 9.0}})
    import shutil

    shutil.rmtree(R.partition_dir(tmp_path, "b"))
    with pytest.warns(UserWarning, match="'b' has no score partition"):
        df = R.evaluate_run(tmp_path)  # no timings given: the earlier ones are kept
    assert df["category"].tolist() == ["a", "b", "mean"]
    assert df.loc[0, "train_seconds"] == 7.0 and df.loc[1, "status"] == "missing partition"
    assert R.read_metrics(tmp_path).loc[0, "train_seconds"] == 7.0
