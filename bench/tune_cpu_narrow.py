"""Round twelve of issue #8: a 128 px UNet at half the width, and the stride-16 feature target.

The rule was fixed and committed before this script (bench/tune_cpu_narrow_rule.md). Two new
trainings of the synthetic seed-1 family's four categories (bench/tune_cpu_faint.py's families
and training command) are scored, with round nine's ``feat256`` models as the baseline, on the
family as painted ("full") and with its test defects at 0.35 of their contrast ("faint"), with
the ``cpu`` preset's scoring as round eleven leaves it. Output: bench/tune_cpu_narrow.txt.

    TUNE_HOME=/tmp/diffad-tune-draws .venv/bin/python bench/tune_cpu_narrow.py
"""

from __future__ import annotations

import json
import os
import re
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from itertools import product
from pathlib import Path

import numpy as np
import pandas as pd

import tune_cpu_faint as faint  # beside this script: the families, their training, round nine's scoring

ROOT = Path(__file__).resolve().parent.parent
TRAININGS = {"feat256": (), "narrow128": ("auto.max_image_size=128",),
             "stride16": ("features.out_indices=[1,2,3]",)}
BASELINE = "feat256"
ALPHA = 0.1  # the cpu preset's, round nine (checked in main())
TIME_FACTOR = 1.15  # the rule's cap on a candidate's training time against the baseline's


def _baseline_train_s() -> dict[str, float]:
    """Round nine's training seconds of the baseline models (bench/tune_cpu_faint.txt)."""
    text = (ROOT / "bench" / "tune_cpu_faint.txt").read_text()
    line = next(x for x in text.splitlines() if x.startswith("training s per category"))
    return {k: float(v) for k, v in re.findall(r"'(\w+)': ([0-9.]+)", line)}


def _rows(job: tuple[str, str]) -> list[dict]:
    """Both families' metrics of one model."""
    from diffad_core.metrics import image_auroc, pixel_auroc, pro_score

    category, training = job
    start = time.perf_counter()
    _, _, records = faint.scored_families(category, ALPHA, training=training)
    meta = json.loads((faint.HOME / "ck" / training / category / "meta.json").read_text())
    cfg = json.loads((faint.HOME / "ck" / training / category / "config.json").read_text())
    rows = []
    for family, recs in records.items():
        anomaly = np.stack([r.anomaly_map for r in recs])
        masks = np.stack([r.mask for r in recs])
        rows.append({"family": family, "category": category, "training": training,
                     "pixel_auroc": pixel_auroc(anomaly, masks),
                     "pro": pro_score(anomaly, masks, fpr_limit=0.3),
                     "image_auroc": image_auroc(np.array([r.image_score for r in recs]),
                                                np.array([r.label for r in recs])),
                     "image_size": cfg["data"]["image_size"], "width": cfg["unet"]["base_channels"],
                     "steps": meta["steps"], "score_s": time.perf_counter() - start})
    return rows


def main() -> int:
    from diffad_core.config import load_config

    cfg = load_config(preset="cpu")
    assert cfg.score.alpha == ALPHA and cfg.score.image_score_center == "none", "the cpu preset moved"
    assert all(getattr(cfg.score, k) == v for k, v in faint.PRESET_SCORING.items())
    assert cfg.auto.max_image_size == 64 and cfg.features.out_indices == [1, 2]
    t0 = time.perf_counter()
    faint._generate()
    jobs = list(product(TRAININGS, faint.CATEGORIES))
    with ThreadPoolExecutor(max_workers=2) as pool:
        seconds = list(pool.map(lambda j: faint._train(j[1], j[0], TRAININGS[j[0]]), jobs))
    train_s = {(name, c): s for (name, c), s in zip(jobs, seconds)}
    base_s = _baseline_train_s()
    for c in faint.CATEGORIES:
        if train_s[(BASELINE, c)] == 0.0:  # round nine's model, its time from round nine's log
            train_s[(BASELINE, c)] = base_s[c]
    print(f"trained: {train_s}", flush=True)
    with ThreadPoolExecutor(max_workers=2) as pool:
        scored = list(pool.map(_rows, [(c, name) for name, c in jobs]))
    df = pd.DataFrame([r for part in scored for r in part])
    df["train_s"] = [train_s[(t, c)] for t, c in zip(df.training, df.category)]
    df["mean3"] = (df.pixel_auroc + df.pro + df.image_auroc) / 3
    means = df.groupby(["family", "training"]).mean3.mean()
    time_of = df[df.family == "full"].groupby("training").train_s.mean()

    base_faint, base_full = means[("faint", BASELINE)], means[("full", BASELINE)]
    lines, qualifying = [], []
    for name in TRAININGS:
        if name == BASELINE:
            continue
        f, u, ratio = means[("faint", name)], means[("full", name)], time_of[name] / time_of[BASELINE]
        ok = f > base_faint + 0.005 and u >= base_full - 0.005 and ratio <= TIME_FACTOR
        lines.append(f"  {name}: M_faint {f:.3f}  M_full {u:.3f}  training time x{ratio:.2f}"
                     + ("  qualifies" if ok else ""))
        if ok:
            qualifying.append((f, name))
    chosen = max(qualifying)[1] if qualifying else BASELINE

    cols = ["pixel_auroc", "pro", "image_auroc", "mean3"]
    out = [
        "round twelve (bench/tune_cpu_narrow_rule.md): trainings of the synthetic seed-1 family, "
        "scored on it (full) and on its faint draw (defect contrast 0.35), alpha 0.1",
        f"scoring: {faint.PRESET_SCORING}; total wall time {time.perf_counter() - t0:.0f} s "
        "(two jobs at once, one thread each)",
        f"candidates: {TRAININGS}",
        "", "means over categories:",
        df.groupby(["family", "training"])[cols + ["image_size", "width", "steps", "train_s", "score_s"]]
          .mean().round(3).to_string(),
        "", f"rule (from {BASELINE}: M_faint {base_faint:.3f}, M_full {base_full:.3f}):", *lines,
        f"  -> {chosen}",
        "", "per category:", df.groupby(["family", "category", "training"])[cols + ["train_s"]]
          .mean().round(3).to_string(),
    ]
    path = Path(os.environ.get("TUNE_OUT", ROOT / "bench" / "tune_cpu_narrow.txt"))
    path.write_text("\n".join(out) + "\n")
    print("\n".join(out))
    return 0


if __name__ == "__main__":
    sys.exit(main())
