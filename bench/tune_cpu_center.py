"""Round ten of issue #8: the image score read against the image's own background.

The rule was fixed and committed before this script (bench/tune_cpu_center_rule.md). Round
nine's models and its two families of the synthetic seed 1 (bench/tune_cpu_faint.py: as painted,
"full", and every test defect at 0.35 of its contrast, "faint"; generated and trained there when
missing) are scored once with the ``cpu`` preset as round nine leaves it (alpha 0.1); the
candidates only read Eq. 11's map differently (``score.image_score_center``). Output:
bench/tune_cpu_center.txt.

    TUNE_HOME=/tmp/diffad-tune-draws .venv/bin/python bench/tune_cpu_center.py
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

import tune_cpu_faint as faint  # beside this script: the families, their models, round nine's scoring

ROOT = Path(__file__).resolve().parent.parent
CENTERS = ("none", "median", "robust")
ALPHA = 0.1  # the cpu preset's, round nine (checked in main())


def _rows(category: str) -> list[dict]:
    """Both families' maps of one model, then each candidate's metrics."""
    from diffad_core.metrics import image_auroc, pixel_auroc, pro_score
    from diffad_core.score import image_scores

    settings, _, records = faint.scored_families(category, ALPHA)
    rows = []
    for family, recs in records.items():
        anomaly = torch.from_numpy(np.stack([r.anomaly_map for r in recs]))
        masks = np.stack([r.mask for r in recs])
        labels = np.array([r.label for r in recs])
        pix, pro = pixel_auroc(anomaly.numpy(), masks), pro_score(anomaly.numpy(), masks, fpr_limit=0.3)
        recorded = np.array([r.image_score for r in recs])
        assert np.allclose(image_scores(anomaly, settings).numpy(), recorded, atol=1e-5)
        for center in CENTERS:
            read = settings.model_copy(update={"image_score_center": center})
            rows.append({"family": family, "category": category, "center": center,
                         "pixel_auroc": pix, "pro": pro,
                         "image_auroc": image_auroc(image_scores(anomaly, read).numpy(), labels)})
    return rows


def main() -> int:
    from diffad_core.config import load_config

    preset = load_config(preset="cpu").score
    assert preset.alpha == ALPHA and preset.image_score_center == "none", "the cpu preset moved"
    assert all(getattr(preset, k) == v for k, v in faint.PRESET_SCORING.items())
    t0 = time.perf_counter()
    faint._generate()
    with ThreadPoolExecutor(max_workers=2) as pool:
        train_s = dict(zip(faint.CATEGORIES, pool.map(faint._train, faint.CATEGORIES)))
    with ThreadPoolExecutor(max_workers=2) as pool:
        df = pd.DataFrame([r for part in pool.map(_rows, faint.CATEGORIES) for r in part])
    df["mean3"] = (df.pixel_auroc + df.pro + df.image_auroc) / 3
    means = df.groupby(["family", "center"]).mean3.mean()

    base_faint, base_full = means[("faint", "none")], means[("full", "none")]
    lines, qualifying = [], []
    for center in CENTERS[1:]:
        f, u = means[("faint", center)], means[("full", center)]
        ok = f > base_faint + 0.005 and u >= base_full - 0.005
        lines.append(f"  {center}: M_faint {f:.3f}  M_full {u:.3f}" + ("  qualifies" if ok else ""))
        if ok:
            qualifying.append((f, center))
    chosen = max(qualifying)[1] if qualifying else "none"

    cols = ["pixel_auroc", "pro", "image_auroc", "mean3"]
    out = [
        "round ten (bench/tune_cpu_center_rule.md): round nine's models of the synthetic seed-1 "
        "family, scored on it (full) and on its faint draw (defect contrast 0.35), alpha 0.1",
        f"scoring: {faint.PRESET_SCORING}; total wall time {time.perf_counter() - t0:.0f} s "
        "(two categories at once, one thread each)",
        f"training s per category (0: the model was there): {train_s}",
        "", "means over categories:",
        df.groupby(["family", "center"])[cols].mean().round(3).to_string(),
        "", f"rule (from none: M_faint {base_faint:.3f}, M_full {base_full:.3f}):", *lines,
        f"  -> image_score_center {chosen}",
        "", "per category:", df.groupby(["family", "category", "center"])[cols].mean().round(3).to_string(),
    ]
    path = Path(os.environ.get("TUNE_OUT", ROOT / "bench" / "tune_cpu_center.txt"))
    path.write_text("\n".join(out) + "\n")
    print("\n".join(out))
    return 0


if __name__ == "__main__":
    sys.exit(main())
