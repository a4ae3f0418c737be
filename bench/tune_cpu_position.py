"""Round thirteen of issue #8: Eq. 11's terms calibrated per position.

The rule was fixed and committed before this script (bench/tune_cpu_position_rule.md). Round
nine's models and its two families of the synthetic seed 1 (bench/tune_cpu_faint.py: as painted,
"full", and every test defect at 0.35 of its contrast, "faint"; generated and trained there when
missing) are scored once with the ``cpu`` preset as round eleven leaves it (alpha 0.1); the
held-out normals' maps of the calibration are kept, and each candidate standardises the two
terms with them differently before Eq. 11. Output: bench/tune_cpu_position.txt.

    TUNE_HOME=/tmp/diffad-tune-draws .venv/bin/python bench/tune_cpu_position.py
"""

from __future__ import annotations

import os
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import pandas as pd
import torch
from scipy import ndimage

import tune_cpu_faint as faint  # beside this script: the families, their models, round nine's scoring

ROOT = Path(__file__).resolve().parent.parent
CANDIDATES = ("global", "position", "position_smooth")
ALPHA = 0.1  # the cpu preset's, round nine (checked in main())
SIGMA_AT_64 = 2.0  # position_smooth's blur of the per-position mean, px at a 64 px map


def _standardised(maps: np.ndarray, normals: np.ndarray, how: str) -> np.ndarray:
    """One term of Eq. 11 standardised by its held-out normal maps ``normals`` (N, H, W)."""
    if how == "global":  # as MapCalibration: torch's (unbiased) std
        return (maps - normals.mean()) / max(float(normals.std(ddof=1)), 1e-12)
    mu = normals.mean(axis=0)
    if how == "position_smooth":
        mu = ndimage.gaussian_filter(mu, SIGMA_AT_64 * mu.shape[-1] / 64, mode="nearest")
    return (maps - mu) / max(float((normals - mu).std(ddof=1)), 1e-12)


def _rows(category: str) -> list[dict]:
    """Both families' maps of one model and its held-out normals' maps, then each candidate."""
    os.environ["DIFFAD_HOME"] = str(faint.HOME)
    from diffad_core.data import prepare_split
    from diffad_core.metrics import image_auroc, pixel_auroc, pro_score
    from diffad_core.score import image_scores, score_split
    from diffad_core.usecases import load_for_evaluation
    from diffad_core.validation import _maps_of, calibrate, held_out_normals

    torch.set_num_threads(1)
    ev = load_for_evaluation(faint.HOME / "ck" / "feat256" / category)
    settings = ev.cfg.score.model_copy(update={**faint.PRESET_SCORING, "alpha": ALPHA})
    cfg = ev.cfg.model_copy(update={"score": settings})
    calibration = calibrate(ev.model, cfg, category)
    held = held_out_normals(ev.model, cfg, category)
    normal = _maps_of(ev.model, cfg, category, held.images, held.feature_images,
                      whitening=calibration.whitening)
    kl_n, feat_n = normal.kl.numpy(), normal.feature.numpy()
    # The same maps as the calibration's: its global statistics come back from them.
    assert np.isclose(kl_n.mean(), calibration.kl_mean, rtol=1e-4, atol=1e-6)
    assert np.isclose(feat_n.std(ddof=1), calibration.feature_std, rtol=1e-4)
    rows = []
    for family, root in faint.FAMILIES.items():
        prepared = prepare_split(cfg.with_changes({"data": {"root": str(root)}}), category, "test")
        recs = list(score_split(ev.model, prepared, settings, alpha=ALPHA, calibration=calibration,
                                seed=cfg.seed, progress=False))
        kl, feat = np.stack([r.kl_map for r in recs]), np.stack([r.feature_map for r in recs])
        assert kl.shape[1:] == kl_n.shape[1:], (kl.shape, kl_n.shape)
        masks = np.stack([r.mask for r in recs])
        labels = np.array([r.label for r in recs])
        for how in CANDIDATES:
            anomaly = (ALPHA * _standardised(kl, kl_n, how)
                       + (1 - ALPHA) * _standardised(feat, feat_n, how)).astype(np.float32)
            if how == "global":
                assert np.allclose(anomaly, np.stack([r.anomaly_map for r in recs]), rtol=1e-4, atol=1e-4)
            scores = image_scores(torch.from_numpy(anomaly), settings).numpy()
            rows.append({"family": family, "category": category, "calibration": how,
                         "pixel_auroc": pixel_auroc(anomaly, masks),
                         "pro": pro_score(anomaly, masks, fpr_limit=0.3),
                         "image_auroc": image_auroc(scores, labels), "n_normals": len(kl_n)})
    return rows


def main() -> int:
    from diffad_core.config import load_config

    cfg = load_config(preset="cpu")
    assert cfg.score.alpha == ALPHA and cfg.score.image_score_center == "none", "the cpu preset moved"
    assert all(getattr(cfg.score, k) == v for k, v in faint.PRESET_SCORING.items())
    t0 = time.perf_counter()
    faint._generate()
    with ThreadPoolExecutor(max_workers=2) as pool:
        train_s = dict(zip(faint.CATEGORIES, pool.map(faint._train, faint.CATEGORIES)))
    with ThreadPoolExecutor(max_workers=2) as pool:
        df = pd.DataFrame([r for part in pool.map(_rows, faint.CATEGORIES) for r in part])
    df["mean3"] = (df.pixel_auroc + df.pro + df.image_auroc) / 3
    means = df.groupby(["family", "calibration"]).mean3.mean()

    base_faint, base_full = means[("faint", "global")], means[("full", "global")]
    lines, qualifying = [], []
    for how in CANDIDATES[1:]:
        f, u = means[("faint", how)], means[("full", how)]
        ok = f > base_faint + 0.005 and u >= base_full - 0.005
        lines.append(f"  {how}: M_faint {f:.3f}  M_full {u:.3f}" + ("  qualifies" if ok else ""))
        if ok:
            qualifying.append((f, how))
    chosen = max(qualifying)[1] if qualifying else "global"

    cols = ["pixel_auroc", "pro", "image_auroc", "mean3"]
    out = [
        "round thirteen (bench/tune_cpu_position_rule.md): round nine's models of the synthetic "
        "seed-1 family, scored on it (full) and on its faint draw (defect contrast 0.35), alpha 0.1",
        f"scoring: {faint.PRESET_SCORING}; total wall time {time.perf_counter() - t0:.0f} s "
        "(two categories at once, one thread each)",
        f"training s per category (0: the model was there): {train_s}; held-out normals per "
        f"category: {df.groupby('category').n_normals.first().to_dict()}",
        "", "means over categories:",
        df.groupby(["family", "calibration"])[cols].mean().round(3).to_string(),
        "", f"rule (from global: M_faint {base_faint:.3f}, M_full {base_full:.3f}):", *lines,
        f"  -> {chosen}",
        "", "per category:", df.groupby(["family", "category", "calibration"])[cols].mean().round(3).to_string(),
    ]
    path = Path(os.environ.get("TUNE_OUT", ROOT / "bench" / "tune_cpu_position.txt"))
    path.write_text("\n".join(out) + "\n")
    print("\n".join(out))
    return 0


if __name__ == "__main__":
    sys.exit(main())
