"""Round twenty-four of issue #8: a smoothing defect in the photo tuning family, and a two-sided
reading of the calibrated terms of Eq. 11.

The rule was fixed and committed before this script (bench/tune_cpu_twosided_rule.md). The photo
tuning family is drawn again with the `blur` painter among its defect kinds (its training images
are checked to be byte-identical to those round twenty-two's models were trained on); then each
model of both tuning families (round twenty-two's `ck/tcap401`) scores each family's two draws
once with the preset's scoring, and the candidates only read the same calibrated maps
differently. Output: bench/tune_cpu_twosided.txt.

    TUNE_HOME=/tmp/diffad-tune-draws .venv/bin/python bench/tune_cpu_twosided.py
"""

from __future__ import annotations

import hashlib
import os
import sys
import time
from concurrent.futures import ThreadPoolExecutor

import numpy as np
import pandas as pd
import torch

import tune_cpu_faint as faint  # beside this script: the synthetic families, metrics, output
import tune_cpu_photo as photo  # the photo families and round nineteen's rule

TRAINING = "tcap401"  # round twenty-two's models (the preset's training)
CANDIDATES = {"preset": [], "twosided_feature": ["feature"], "twosided_both": ["kl", "feature"]}
CATEGORIES = (*photo.PHOTO_CATEGORIES, *faint.CATEGORIES)
SCORING_KEYS = ("alpha", "calibrate_maps", "feature_whitening", "position_mean_sigma", "edge_spread_width",
                "top_k", "image_score_sigma", "validation_fraction", "noise_draws", "two_sided_terms")


def _training_images_digest() -> str:
    """One sha256 over the photo family's training images (names and bytes)."""
    digest = hashlib.sha256()
    for path in sorted(photo.PHOTO_FAMILIES["photo-full"].glob("*/train/good/*.png")):
        digest.update(str(path.relative_to(photo.PHOTO_FAMILIES["photo-full"])).encode())
        digest.update(path.read_bytes())
    return digest.hexdigest()


def _rows(category: str) -> list[dict]:
    """One model scores its family's two draws once with the preset's scoring; every candidate
    reads the same calibrated maps: a row of metrics per (draw, candidate, defect kind or all)."""
    from diffad_core.config import load_config
    from diffad_core.data import prepare_split
    from diffad_core.metrics import image_auroc, pixel_auroc, pro_score
    from diffad_core.score import ComponentMaps, anomaly_map, image_scores, score_split
    from diffad_core.usecases import load_for_evaluation
    from diffad_core.validation import calibrate

    os.environ["DIFFAD_HOME"] = str(photo.HOME)
    torch.set_num_threads(1)
    preset = load_config("cpu")
    ev = load_for_evaluation(photo.HOME / "ck" / TRAINING / category)
    assert ev.cfg.train.max_timestep == preset.train.max_timestep, f"{category}: not the preset's training"
    # The models were trained before rounds nineteen, twenty-one and twenty-three changed the scoring.
    settings = ev.cfg.score.model_copy(update={k: getattr(preset.score, k) for k in SCORING_KEYS})
    cfg = ev.cfg.model_copy(update={"score": settings})
    start = time.perf_counter()
    calibration = calibrate(ev.model, cfg, category)
    families = (photo.PHOTO_FAMILIES if photo.family_kind(category) == "photo"
                else {f"synth-{k}": v for k, v in faint.FAMILIES.items()})
    rows = []
    for family, root in families.items():
        prepared = prepare_split(cfg.with_changes({"data": {"root": str(root)}}), category, "test")
        records = list(score_split(ev.model, prepared, settings, alpha=settings.alpha, calibration=calibration,
                                   seed=cfg.seed, progress=False))
        maps = ComponentMaps(kl=torch.from_numpy(np.stack([r.kl_map for r in records])),
                             feature=torch.from_numpy(np.stack([r.feature_map for r in records])))
        recorded = np.stack([r.anomaly_map for r in records])
        assert np.allclose(anomaly_map(maps, settings.alpha, calibration).numpy(), recorded, atol=1e-5)
        masks = np.stack([r.mask for r in records])
        kinds = np.array([r.defect_type for r in records])
        labels = np.array([r.label for r in records])
        for candidate, two_sided in CANDIDATES.items():
            anomaly = anomaly_map(maps, settings.alpha, calibration, two_sided).numpy()
            rows.append({"family": family, "category": category, "candidate": candidate, "kind": "all",
                         "pixel_auroc": pixel_auroc(anomaly, masks),
                         "pro": pro_score(anomaly, masks, fpr_limit=0.3),
                         "image_auroc": image_auroc(image_scores(torch.from_numpy(anomaly), settings).numpy(),
                                                    labels)})
            for kind in sorted(set(kinds) - {"good"}):
                keep = (kinds == "good") | (kinds == kind)
                rows.append({"family": family, "category": category, "candidate": candidate, "kind": kind,
                             "pixel_auroc": pixel_auroc(anomaly[keep], masks[keep])})
    for row in rows:
        row["score_s"] = time.perf_counter() - start
    return rows


def main() -> int:
    from diffad_core.config import load_config

    assert load_config("cpu").score.two_sided_terms == [], "the cpu preset moved"
    t0 = time.perf_counter()
    before = _training_images_digest()
    photo._generate_photo()
    if _training_images_digest() != before:
        raise SystemExit("the photo family's training images changed: round twenty-two's models do not stand")
    faint._generate()
    with ThreadPoolExecutor(max_workers=2) as pool:
        df = pd.DataFrame([r for part in pool.map(_rows, CATEGORIES) for r in part])
    whole = df[df.kind == "all"].copy()
    whole["mean3"] = (whole.pixel_auroc + whole.pro + whole.image_auroc) / 3
    means = whole.groupby(["family", "candidate"]).mean3.mean()
    candidates = [c for c in CANDIDATES if c != "preset"]
    chosen, lines = photo.named_rule_step(means, candidates, lambda near_best: near_best[0])  # twosided_feature first
    cols = ["pixel_auroc", "pro", "image_auroc", "mean3"]
    per_kind = (df[df.kind != "all"].groupby(["family", "kind", "candidate"]).pixel_auroc.mean()
                .unstack("candidate")[list(CANDIDATES)])
    out = [
        "round twenty-four (bench/tune_cpu_twosided_rule.md): score.two_sided_terms [feature] / [kl, feature] "
        f"against the preset's one-sided reading, the photo family with the blur painter, models ck/{TRAINING}",
        f"total wall time {time.perf_counter() - t0:.0f} s (two categories at once, one thread each); "
        "the photo family's training images byte-identical before and after drawing it again",
        "", "means over categories (score_s: calibration and scoring of both draws, per category):",
        whole.groupby(["family", "candidate"])[cols + ["score_s"]].mean().round(3).to_string(),
        "", "rule (baseline: the preset; between candidates within 0.002, twosided_feature):", *lines,
        f"  -> {chosen}",
        "", "pixel AUROC per defect kind (normal images and that kind), mean over categories; chooses nothing:",
        per_kind.round(3).to_string(),
        "", "per category:",
        whole.groupby(["family", "category", "candidate"])[cols].mean().round(3).to_string(),
    ]
    faint.write_output("tune_cpu_twosided.txt", out)
    return 0


if __name__ == "__main__":
    sys.exit(main())
