"""Evaluation from the parquet files only: the metrics table, per defect kind, weakest images."""

from __future__ import annotations

import math
import shutil
from pathlib import Path

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from sklearn.metrics import roc_auc_score

from diffad_core import metrics
from diffad_core import results as R
from diffad_core.score import ScoreRecord
from tests.results_helpers import make_records


def test_evaluate_run_from_parquet(tmp_path: Path) -> None:
    R.write_scores(tmp_path, "a", make_records("a", seed=1), "v1", alpha=0.5, alpha_source="fixed",
                   preset="smoke")
    R.write_scores(tmp_path, "b", make_records("b", seed=2), "v1", alpha=0.7,
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
    kinds = R.read_defect_metrics(tmp_path)
    assert kinds[["category", "defect_type"]].values.tolist() == [["a", "bad"], ["b", "bad"]]
    # one defect kind: its table row is the category's own numbers
    assert kinds.loc[0, "pixel_auroc"] == pytest.approx(df.loc[0, "pixel_auroc"])
    assert kinds.loc[0, "pro"] == pytest.approx(df.loc[0, "pro"])


def test_defect_kind_metrics_use_that_kind_and_all_good_images(tmp_path: Path) -> None:
    recs = make_records("w", n_good=3, n_bad=6, seed=4, kinds=("hole", "scratch"))
    for r in recs:  # scratches are found, holes are not (their map is noise)
        if r.defect_type == "hole":
            r.anomaly_map = np.random.default_rng(len(r.rel_path)).random((8, 8)).astype(np.float32)
            r.image_score = 0.0
    R.write_scores(tmp_path, "w", recs, "v")
    df = R.evaluate_defect_kinds(tmp_path)
    assert df["defect_type"].tolist() == ["hole", "scratch"]
    assert df["n_images"].tolist() == [3, 3] and df["n_good"].tolist() == [3, 3]
    assert (df["status"] == "ok").all()
    for kind, row in df.set_index("defect_type").iterrows():
        sel = [r for r in recs if r.defect_type in (kind, "good")]
        maps = np.stack([r.anomaly_map.astype(np.float16).astype(np.float32) for r in sel])
        masks = np.stack([r.mask for r in sel])
        assert row["pixel_auroc"] == pytest.approx(metrics.pixel_auroc(maps, masks))
        assert row["pro"] == pytest.approx(metrics.pro_score(maps, masks))
        assert row["image_auroc"] == pytest.approx(
            roc_auc_score([r.label for r in sel], [r.image_score for r in sel]))
    hole, scratch = df.set_index("defect_type").loc[["hole", "scratch"], "pixel_auroc"]
    assert scratch > 0.9 > 0.7 > hole
    assert not R.defect_metrics_path(tmp_path).exists()
    R.evaluate_defect_kinds(tmp_path, write=True)
    pd.testing.assert_frame_equal(R.read_defect_metrics(tmp_path), df)


def test_weakest_images(tmp_path: Path) -> None:
    recs = make_records("w", n_good=3, n_bad=4, seed=7)
    recs[3].anomaly_map = np.zeros((8, 8), np.float32)  # found by its score, map all ties
    recs[4].image_score = -1.0  # well localized but scored below every normal image
    recs[1].image_score = 99.0  # a normal image scoring above everything
    R.write_scores(tmp_path, "w", recs, "v")
    per = R.per_image_metrics(tmp_path, "w")
    assert per["rel_path"].tolist() == [r.rel_path for r in recs]
    assert per.loc[3, "pixel_auroc"] == 0.5 and per[per["label"] == 0]["pixel_auroc"].isna().all()
    assert per.loc[4, "score_overlap"] == 1.0  # every normal image scores at least as high
    assert per.loc[1, "score_overlap"] == 1.0  # every anomalous image scores at most as high

    weak = R.weakest_images(tmp_path, "w", n_anomalous=2, n_good=1)
    assert weak["rel_path"].tolist() == [recs[3].rel_path, recs[4].rel_path, recs[1].rel_path]
    assert weak["reason"].tolist() == ["worst localization", "hardest to detect",
                                       "highest normal score"]
    assert len(R.weakest_images(tmp_path, "w", n_anomalous=10, n_good=0)) == 4


def test_evaluate_single_class_gives_nan_not_crash(tmp_path: Path) -> None:
    R.write_scores(tmp_path, "good_only", make_records("g", n_good=2, n_bad=0), "v")
    with pytest.warns(UserWarning, match="undefined"):
        df = R.evaluate_run(tmp_path, write=False)
    assert math.isnan(df.loc[0, "pixel_auroc"]) and math.isnan(df.loc[0, "image_auroc"])
    assert not R.metrics_path(tmp_path).exists()
    assert len(R.evaluate_defect_kinds(tmp_path)) == 0
    assert R.weakest_images(tmp_path, "good_only")["reason"].tolist() == ["highest normal score"]


def test_metrics_schema_validation(tmp_path: Path) -> None:
    with pytest.raises(R.ResultsSchemaError, match="unknown column"):
        R.write_metrics(tmp_path, pd.DataFrame({"category": ["a"], "bogus": [1]}))
    pq.write_table(pa.table({"category": ["a"], "pixel_auroc": ["high"]}), R.metrics_path(tmp_path))
    with pytest.raises(R.ResultsSchemaError, match=r"metrics\.parquet.*'pixel_auroc'"):
        R.read_metrics(tmp_path)
    with pytest.raises(FileNotFoundError):
        R.read_metrics(tmp_path / "none")
    with pytest.raises(FileNotFoundError):
        R.read_defect_metrics(tmp_path / "none")


def test_evaluate_golden_numbers(tmp_path: Path) -> None:
    """Hand-computed: one defect pixel scoring 0.5 against 7 normal pixels
    (0.75, 0.25, 0, 0, 0.125, 0.25, 0.5): AUROC = (5 + 0.5 tie) / 7."""
    bad = ScoreRecord(rel_path="b.png", defect_type="d", label=1, image_score=0.9,
                      anomaly_map=np.array([[0.5, 0.75], [0.25, 0.0]], np.float32),
                      kl_map=None, feature_map=None, mask=np.array([[1, 0], [0, 0]], np.uint8))
    good = ScoreRecord(rel_path="g.png", defect_type="good", label=0, image_score=0.1,
                       anomaly_map=np.array([[0.0, 0.125], [0.25, 0.5]], np.float32),
                       kl_map=None, feature_map=None, mask=np.zeros((2, 2), np.uint8))
    R.write_scores(tmp_path, "gold", [bad, good], "v")
    df = R.evaluate_run(tmp_path)
    assert df.loc[0, "pixel_auroc"] == pytest.approx(5.5 / 7, abs=1e-12)
    assert df.loc[0, "image_auroc"] == 1.0 and df.loc[0, "n_test"] == 2
    assert df.loc[0, "status"] == "ok"
    assert not any(c.endswith("_kl") for c in df.columns)
    assert R.per_image_metrics(tmp_path, "gold").loc[0, "pixel_auroc"] == pytest.approx(2 / 3)


def test_no_ground_truth_masks(tmp_path: Path) -> None:
    recs = make_records("m", 2, 2)
    for r in recs:
        r.mask = None
    R.write_scores(tmp_path, "m", recs, "v")
    df = R.evaluate_run(tmp_path, write=False)
    assert df.loc[0, "status"] == R.NO_GROUND_TRUTH and math.isnan(df.loc[0, "pixel_auroc"])
    assert df.loc[0, "image_auroc"] >= 0.0
    assert R.per_image_metrics(tmp_path, "m")["pixel_auroc"].isna().all()
    weak = R.weakest_images(tmp_path, "m")  # no localization without masks
    assert weak["reason"].tolist() == ["hardest to detect"] * 2 + ["highest normal score"]


def test_reevaluation_keeps_timings_and_reports_lost_partitions(tmp_path: Path) -> None:
    R.write_scores(tmp_path, "a", make_records("a"), "v")
    R.write_scores(tmp_path, "b", make_records("b"), "v")
    R.evaluate_run(tmp_path, {"a": {"train_seconds": 7.0}, "b": {"train_seconds": 9.0}})
    shutil.rmtree(R.partition_dir(tmp_path, "b"))
    with pytest.warns(UserWarning, match="'b' has no score partition"):
        df = R.evaluate_run(tmp_path)  # no timings given: the earlier ones are kept
    assert df["category"].tolist() == ["a", "b", "mean"]
    assert df.loc[0, "train_seconds"] == 7.0 and df.loc[1, "status"] == "missing partition"
    assert R.read_metrics(tmp_path).loc[0, "train_seconds"] == 7.0
    assert R.read_defect_metrics(tmp_path)["category"].tolist() == ["a"]
