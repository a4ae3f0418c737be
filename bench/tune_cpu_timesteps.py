"""Round eleven of issue #8: the scoring steps T of Eq. 11.

The rule was fixed and committed before this script (bench/tune_cpu_timesteps_rule.md). Round
nine's models and its two families of the synthetic seed 1 (bench/tune_cpu_faint.py: as painted,
"full", and every test defect at 0.35 of its contrast, "faint"; generated and trained there when
missing) are scored with the ``cpu`` preset as round ten leaves it (alpha 0.1), once per
candidate T, each with its own calibration on the held-out normals. Output:
bench/tune_cpu_timesteps.txt.

    TUNE_HOME=/tmp/diffad-tune-draws .venv/bin/python bench/tune_cpu_timesteps.py
"""

from __future__ import annotations

import os
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from itertools import product
from pathlib import Path

import numpy as np
import pandas as pd

import tune_cpu_faint as faint  # beside this script: the families, their models, round nine's scoring

ROOT = Path(__file__).resolve().parent.parent
CANDIDATES = ((5, 50, 100), (5, 50, 100, 150), (50, 100, 150), (50, 100), (100, 150),
              (5, 25, 50, 75, 100))
BASELINE = CANDIDATES[0]
ALPHA = 0.1  # the cpu preset's, round nine (checked in main())


def _rows(job: tuple[str, tuple[int, ...]]) -> list[dict]:
    """Both families' metrics of one model scored with one T."""
    from diffad_core.metrics import image_auroc, pixel_auroc, pro_score

    category, steps = job
    start = time.perf_counter()
    _, _, records = faint.scored_families(category, ALPHA, list(steps))
    rows = []
    for family, recs in records.items():
        anomaly = np.stack([r.anomaly_map for r in recs])
        masks = np.stack([r.mask for r in recs])
        rows.append({"family": family, "category": category, "T": str(list(steps)),
                     "pixel_auroc": pixel_auroc(anomaly, masks),
                     "pro": pro_score(anomaly, masks, fpr_limit=0.3),
                     "image_auroc": image_auroc(np.array([r.image_score for r in recs]),
                                                np.array([r.label for r in recs])),
                     "score_s": time.perf_counter() - start})
    return rows


def main() -> int:
    from diffad_core.config import load_config

    cfg = load_config(preset="cpu")
    assert cfg.score.alpha == ALPHA and cfg.score.image_score_center == "none", "the cpu preset moved"
    assert all(getattr(cfg.score, k) == v for k, v in faint.PRESET_SCORING.items())
    assert tuple(cfg.diffusion.score_timesteps) == BASELINE
    t0 = time.perf_counter()
    faint._generate()
    with ThreadPoolExecutor(max_workers=2) as pool:
        train_s = dict(zip(faint.CATEGORIES, pool.map(faint._train, faint.CATEGORIES)))
    with ThreadPoolExecutor(max_workers=2) as pool:
        jobs = list(product(faint.CATEGORIES, CANDIDATES))
        df = pd.DataFrame([r for part in pool.map(_rows, jobs) for r in part])
    df["mean3"] = (df.pixel_auroc + df.pro + df.image_auroc) / 3
    means = df.groupby(["family", "T"]).mean3.mean()

    base = str(list(BASELINE))
    base_faint, base_full = means[("faint", base)], means[("full", base)]
    lines, qualifying = [], []
    for steps in CANDIDATES[1:]:
        key = str(list(steps))
        f, u = means[("faint", key)], means[("full", key)]
        ok = f > base_faint + 0.005 and u >= base_full - 0.005
        lines.append(f"  T {key}: M_faint {f:.3f}  M_full {u:.3f}" + ("  qualifies" if ok else ""))
        if ok:
            qualifying.append((f, key))
    chosen = max(qualifying)[1] if qualifying else base

    cols = ["pixel_auroc", "pro", "image_auroc", "mean3"]
    out = [
        "round eleven (bench/tune_cpu_timesteps_rule.md): round nine's models of the synthetic "
        "seed-1 family, scored on it (full) and on its faint draw (defect contrast 0.35), "
        f"alpha {ALPHA}, each T with its own calibration",
        f"scoring: {faint.PRESET_SCORING}; total wall time {time.perf_counter() - t0:.0f} s "
        "(two jobs at once, one thread each)",
        f"training s per category (0: the model was there): {train_s}",
        "", "means over categories:",
        df.groupby(["family", "T"])[cols + ["score_s"]].mean().round(3).to_string(),
        "", f"rule (from T {base}: M_faint {base_faint:.3f}, M_full {base_full:.3f}):", *lines,
        f"  -> T {chosen}",
        "", "per category:", df.groupby(["family", "category", "T"])[cols].mean().round(3).to_string(),
    ]
    path = Path(os.environ.get("TUNE_OUT", ROOT / "bench" / "tune_cpu_timesteps.txt"))
    path.write_text("\n".join(out) + "\n")
    print("\n".join(out))
    return 0


if __name__ == "__main__":
    sys.exit(main())
