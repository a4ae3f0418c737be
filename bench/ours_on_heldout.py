"""Does "Ours*" help on the family the `cpu` preset was not tuned on? (issue #8)

The rule was committed before this ran (bench/ours_on_heldout_rule.md). For every category
model a held-out benchmark trained (``DIFFAD_HOME``s given as arguments), the test split is
scored twice with the whitened, calibrated maps: at alpha 0.5 and with the alpha "Ours*"
chooses on the model's held-out normals with synthetic defects. Metrics come from the maps in
memory; each run's own printed numbers are reproduced by the matching row.

    .venv/bin/python bench/ours_on_heldout.py HOME... OUT
"""

from __future__ import annotations

import os
import sys
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import pandas as pd
import torch

from diffad_core.data import prepare_split
from diffad_core.metrics import image_auroc, pixel_auroc, pro_score
from diffad_core.score import score_split
from diffad_core.usecases import load_for_evaluation
from diffad_core.validation import calibrate, choose_alpha


def _evaluate(job: tuple[str, Path]) -> list[dict]:
    home, checkpoint = job
    os.environ["DIFFAD_HOME"] = home  # prepare_split's cache; the data root is in the config
    torch.set_num_threads(1)
    ev = load_for_evaluation(checkpoint)
    cfg = ev.cfg.with_changes({"score": {"feature_whitening": "full", "calibrate_maps": True}})
    category = ev.model.categories[0]
    calibration = calibrate(ev.model, cfg, category)
    chosen = choose_alpha(ev.model, cfg, category, calibration).alpha
    prepared = prepare_split(cfg, category, "test")
    rows = []
    for scoring, alpha in (("alpha 0.5", 0.5), ("Ours*", chosen)):
        recs = list(score_split(ev.model, prepared, cfg.score, alpha=alpha, calibration=calibration,
                                seed=cfg.seed, progress=False))
        maps = np.stack([r.anomaly_map for r in recs]).astype(np.float32)
        masks = np.stack([r.mask for r in recs])
        rows.append({"draw": cfg.data.name, "category": category, "scoring": scoring, "alpha": alpha,
                     "pixel_auroc": 100 * pixel_auroc(maps, masks),
                     "pro": 100 * pro_score(maps, masks, fpr_limit=cfg.metrics.pro_fpr_limit),
                     "image_auroc": 100 * image_auroc(np.array([r.image_score for r in recs]),
                                                      np.array([r.label for r in recs]))})
    return rows


def main(argv: list[str]) -> int:
    *homes, out = argv
    jobs = [(home, ck.parent) for home in homes
            for ck in sorted(Path(home, "checkpoints", "folder").glob("*/*/model.safetensors"))]
    with ThreadPoolExecutor(max_workers=2) as pool:
        df = pd.DataFrame([r for part in pool.map(_evaluate, jobs) for r in part])
    df["mean3"] = (df.pixel_auroc + df.pro + df.image_auroc) / 3
    means = df.groupby(["draw", "scoring"])[["pixel_auroc", "pro", "image_auroc", "mean3"]].mean()
    overall = df.groupby("scoring")[["pixel_auroc", "pro", "image_auroc", "mean3"]].mean()
    keep = overall.mean3["Ours*"] > overall.mean3["alpha 0.5"]
    lines = [f"# Recorded by: .venv/bin/python bench/ours_on_heldout.py {' '.join(argv)}",
             "# Rule: bench/ours_on_heldout_rule.md. Whitened, calibrated maps; percent.", "",
             "per category:", df.round(1).to_string(index=False), "",
             "means per draw:", means.round(1).to_string(), "",
             "means over the category-draws:", overall.round(1).to_string(), "",
             "rule: " + ("Ours* is above alpha 0.5: it stays on in the cpu preset" if keep else
                         "Ours* is not above alpha 0.5: the cpu preset goes back to alpha 0.5")]
    Path(out).write_text("\n".join(lines) + "\n")
    print("\n".join(lines))
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
