"""Report: tables with paper numbers, ablations, timings, figures, provenance; markdown helper."""

from __future__ import annotations

import re
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from diffad_core import report as Rep
from diffad_core import results as R
from diffad_core.score import ScoreRecord


def _records(n_good: int = 2, n_bad: int = 2, size: int = 32, seed: int = 0,
             kinds: tuple[str, ...] = ("hole",)) -> tuple[list[ScoreRecord], dict, dict]:
    """Textured grey images; anomalous ones have a dark square that the map and mask mark.
    Returns the records, their reconstructions and their input images (by rel_path)."""
    rng = np.random.default_rng(seed)
    out, recons, inputs = [], {}, {}
    for i in range(n_good + n_bad):
        label = int(i >= n_good)
        kind = kinds[(i - n_good) % len(kinds)] if label else "good"
        img = (rng.random((size, size, 3)) * 60 + 120).astype(np.uint8)
        mask = np.zeros((size, size), np.uint8)
        amap = rng.random((size, size)).astype(np.float32) * 0.3
        if label:
            mask[8:16, 10:20] = 1
            img[8:16, 10:20] = 20
            amap[8:16, 10:20] += 1.0
        rel = f"cat/test/{kind}/{i:03d}.png"
        out.append(ScoreRecord(
            rel_path=rel, defect_type=kind, label=label, image_score=float(amap.max()),
            anomaly_map=amap, kl_map=amap, feature_map=amap * 0.5, mask=mask,
            ablation_scores={"kl": float(amap.max()), "feature": float(amap.mean())}))
        inputs[rel] = img
        recons[rel] = img.copy()
        recons[rel][8:16, 10:20] = 150
    return out, recons, inputs


@pytest.fixture()
def run(tmp_path: Path) -> Path:
    run_dir = tmp_path / "results" / "run-7"
    recs, recons, inputs = _records(seed=1)
    R.write_scores(run_dir, "bottle", recs, "v1", alpha=0.5, alpha_source="fixed",
                   reconstructions=recons, input_images=inputs)
    R.write_scores(run_dir, "weave", _records(seed=2)[0], "v1", alpha=0.6,
                   alpha_source="synthetic anomalies on held-out train/good")
    with pytest.warns(UserWarning, match="'cable' has no score partition"):
        R.evaluate_run(run_dir, {"bottle": {"train_seconds": 12.5, "score_ms_per_image": 3.25,
                                            "reconstruct_ms_per_image": 40.0}},
                       categories=["bottle", "weave", "cable"])
    return run_dir


def test_report_mvtec(run: Path, tmp_path: Path) -> None:
    prov = {"git_sha": "a" * 40, "git_dirty": True, "config_hash": "cfg123", "manifest_hash": "man9",
            "seed": 3, "preset": "paper", "versions": {"python": "3.11", "torch": "2.14.1"},
            "device": {"cuda_name": "H100"}, "hostname": "gpu1"}
    out = Rep.build_report(run, tmp_path / "rep", dataset="mvtec", title="Bench",
                           provenance=prov, weights_note="ImageNet EfficientNet-b4 (timm)",
                           registry_decisions=["bottle: v2 promoted to champion (PRO +0.4)"])
    md = out["markdown"].read_text()
    assert md.startswith("# Bench")
    # our numbers next to the paper's Table 1 (Ours, Ours*) for bottle and the mean row
    bottle = next(line for line in md.splitlines() if line.startswith("| bottle |"))
    assert "97.7 / 95.0" in bottle and "100.0" in bottle  # our synthetic bottle is perfectly separable
    assert "| cable |" in md and "missing partition" in md
    assert "96.7 / 93.7" in md and "96.7 / 94.1" in md
    assert "KL only" in md and "feature only" in md and "ensemble (Eq. 11)" in md
    assert "12.5" in md and "3.2" in md and "40.0" in md
    assert "0.60 (synthetic anomalies on held-out train/good)" in md
    assert "a" * 40 + " (dirty work tree)" in md and "man9" in md and "cfg123" in md
    assert "ImageNet EfficientNet-b4 (timm)" in md and "promoted to champion" in md
    assert "do not apply" not in md
    assert "figures/bottle.png" in md

    page = out["html"].read_text()
    assert page.count("data:image/png;base64,") == 2  # bottle and weave, embedded
    assert not re.search(r"src=['\"](?!data:)", page)  # self-contained
    assert "<table>" in page and "H100" in page

    fig = out["figures"]["bottle"]
    with Image.open(fig) as im:
        arr = np.asarray(im.convert("RGB"))
    # 3 rows (2 anomalous first, then one normal) x 4 panels (input, gt, overlay, reconstruction),
    # then the weakest normal image if it is not the one shown (the weak anomalous ones are)
    weak = R.weakest_images(run, "bottle", n_anomalous=2, n_good=1)
    n_rows = 3 + int(weak["rel_path"].iloc[-1] != "cat/test/good/000.png")
    assert arr.shape[0] == n_rows * (160 + 16) + (n_rows - 1) * 4
    assert arr.shape[1] == 4 * 160 + 3 * 4
    gt_panel = arr[:160, 164:324]
    assert gt_panel.max() == 255 and gt_panel.min() == 0  # white defect on black
    overlay = arr[:160, 328:488].astype(int)
    # the defect (rows 8:16, cols 10:20 at 32 px = 5x upscale) is red in the overlay, the rest is not
    assert overlay[60, 75, 0] > overlay[60, 75, 2] + 50
    assert overlay[140, 140, 2] >= overlay[140, 140, 0]
    third_row_gt = arr[2 * 180:2 * 180 + 160, 164:324]
    assert third_row_gt.max() == 0  # the normal image comes last, with an empty mask


def test_report_synthetic_has_honest_note(run: Path, tmp_path: Path) -> None:
    out = Rep.build_report(run, tmp_path / "rep2", dataset="synthetic")
    md = out["markdown"].read_text()
    assert "paper's MVTec-AD numbers do not apply" in md
    assert "paper Ours" not in md and "97.7 / 95.0" not in md
    assert "no provenance was given" in md and "weights: not stated" in md
    # weave has no input images in the parquet and no data_root: grey input panel, still drawn
    assert out["figures"]["weave"].is_file()


def test_report_loads_inputs_from_data_root(tmp_path: Path) -> None:
    run_dir = tmp_path / "r"
    recs = _records(1, 1)[0]
    root = tmp_path / "data"
    for r in recs:
        p = root / r.rel_path
        p.parent.mkdir(parents=True, exist_ok=True)
        Image.fromarray(np.full((64, 64, 3), (0, 200, 0), np.uint8)).save(p)
    R.write_scores(run_dir, "cat", recs, "v")
    R.evaluate_run(run_dir)
    out = Rep.build_report(run_dir, tmp_path / "o", dataset="folder", data_root=root,
                           figures_per_category=1)
    with Image.open(out["figures"]["cat"]) as im:
        arr = np.asarray(im.convert("RGB"))
    assert tuple(arr[50, 50]) == (0, 200, 0)  # the input panel shows the resized file


def test_report_needs_metrics(tmp_path: Path) -> None:
    with pytest.raises(FileNotFoundError, match="metrics.parquet"):
        Rep.build_report(tmp_path, tmp_path / "o", dataset="mvtec")


def test_metrics_markdown_table(run: Path) -> None:
    table = Rep.metrics_markdown_table(R.read_metrics(run))
    lines = table.splitlines()
    assert lines[0].startswith("| category | pixel AUROC % | PRO % | image AUROC %")
    assert lines[-1].startswith("| mean |")
    cable = next(line for line in lines if line.startswith("| cable |"))
    assert "n/a" in cable and "missing partition" in cable
    assert len(lines) == 2 + 4


def test_failure_modes_and_weakest_images(tmp_path: Path) -> None:
    """Two defect kinds, one found and one missed: the failure-mode table shows which, and the
    figure adds the weakest images after the first ones."""
    run_dir = tmp_path / "r"
    recs, recons, inputs = _records(n_good=3, n_bad=6, kinds=("hole", "crack"))
    for r in recs:
        if r.defect_type == "crack":  # the map misses cracks
            r.anomaly_map = np.random.default_rng(int(r.rel_path[-7:-4])).random((32, 32)).astype(
                np.float32) * 0.3
            r.image_score = float(r.anomaly_map.max())
    R.write_scores(run_dir, "cat", recs, "v", reconstructions=recons, input_images=inputs)
    R.evaluate_run(run_dir)
    out = Rep.build_report(run_dir, tmp_path / "o", dataset="synthetic", figures_per_category=1)
    md = out["markdown"].read_text()
    assert "## Failure modes per defect kind" in md
    crack = next(line for line in md.splitlines() if line.startswith("| cat | crack |"))
    hole = next(line for line in md.splitlines() if line.startswith("| cat | hole |"))
    assert crack.split("|")[3].strip() == "3" and crack.split("|")[4].strip() == "3"
    assert float(hole.split("|")[5]) > 95.0 > 70.0 > float(crack.split("|")[5])
    # weakest: 2 missed cracks + the top normal image, none of them the first (a hole)
    weak = R.weakest_images(run_dir, "cat", n_anomalous=2, n_good=1)
    assert set(weak["defect_type"]) == {"crack", "good"}
    assert "Weakest images:" in md and all(p in md for p in weak["rel_path"])
    with Image.open(out["figures"]["cat"]) as im:
        assert im.size[1] == 4 * (160 + 16) + 3 * 4  # 1 first image + 3 weakest
    assert "Failure modes per defect kind" in out["html"].read_text()


def test_report_on_a_run_without_defect_metrics_file(run: Path, tmp_path: Path) -> None:
    """Runs evaluated before defect_metrics.parquet existed: the table is computed."""
    R.defect_metrics_path(run).unlink()
    md = Rep.build_report(run, tmp_path / "o", dataset="mvtec")["markdown"].read_text()
    assert "| bottle | hole | 2 | 2 |" in md and "| weave | hole |" in md


def test_timings_give_seconds_per_stage_and_a_projection(run: Path, tmp_path: Path) -> None:
    """Issue #11: time per category for each stage, a total row, and the full MVTec-AD benchmark
    projected from the measured rates onto N devices."""
    n = int(R.read_metrics(run).set_index("category").loc["bottle", "n_test"])
    md = Rep.build_report(run, tmp_path / "rep3", dataset="mvtec")["markdown"].read_text()
    section = md.split("## Timings", 1)[1].split("## Figures", 1)[0]
    bottle = next(line for line in section.splitlines() if line.startswith("| bottle |"))
    # 12.5 s training, 3.25 ms x n scored, 40 ms x n reconstructed (all of bottle's images)
    score_s, recon_s = 3.25 * n / 1000, 40.0 * n / 1000
    assert bottle == (f"| bottle | 12.5 | 3.2 | {score_s:.1f} | 40.0 | {recon_s:.1f} | "
                      f"{12.5 + score_s + recon_s:.1f} | v1 |")
    total = next(line for line in section.splitlines() if line.startswith("| total |"))
    assert total.startswith(f"| total | 12.5 | 3.2 | {score_s:.1f} | 40.0 | {recon_s:.1f} |")
    per_category = 12.5 + 1725 / 15 * (3.25 + 40.0) / 1000
    assert "Projected full MVTec-AD benchmark (15 categories, 1725 test images)" in section
    assert f"| 1 | {15 * per_category / 3600:.2f} |" in section
    assert f"| 4 | {4 * per_category / 3600:.2f} |" in section  # ceil(15 / 4) rounds
    assert f"| 15 | {per_category / 3600:.2f} |" in section
