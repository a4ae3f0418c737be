"""Round eight's noise draws on the family the `cpu` preset was not tuned on: a measurement.

Round eight (bench/tune_cpu_draws_rule.md) adopted ``score.noise_draws=4`` on the synthetic
tuning family; the held-out benchmark then ran once with it. This rescoring of that benchmark's
own models (``DIFFAD_HOME``s given as arguments) puts K = 1 and K = 4 side by side on the same
test images, so the effect of the draws on held-out data is not confounded with the draw of the
data. It chooses nothing (the preset was fixed before it ran). The K = 4 rows reproduce the
benchmark's printed numbers.

    .venv/bin/python bench/draws_on_heldout.py HOME... OUT
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
from diffad_core.validation import calibrate

DRAWS = (1, 4)


def _evaluate(job: tuple[str, Path]) -> list[dict]:
    home, checkpoint = job
    os.environ["DIFFAD_HOME"] = home  # prepare_split's cache; the data root is in the config
    torch.set_num_threads(1)
    ev = load_for_evaluation(checkpoint)
    category = ev.model.categories[0]
    rows = []
    for k in DRAWS:
        cfg = ev.cfg.with_changes({"score": {"noise_draws": k, "ablations": ["feature"]}})
        prepared = prepare_split(cfg, category, "test")
        recs = list(score_split(ev.model, prepared, cfg.score, alpha=cfg.score.alpha,
                                calibration=calibrate(ev.model, cfg, category), seed=cfg.seed,
                                progress=False))
        masks, labels = np.stack([r.mask for r in recs]), np.array([r.label for r in recs])
        scorers = {"ensemble": ([r.anomaly_map for r in recs], [r.image_score for r in recs]),
                   "feature": ([r.ablation_maps["feature"] for r in recs],
                               [r.ablation_scores["feature"] for r in recs])}
        for scorer, (maps, scores) in scorers.items():
            m = np.stack(maps).astype(np.float32)
            rows.append({"draw": cfg.data.name, "category": category, "noise_draws": k, "scorer": scorer,
                         "pixel_auroc": 100 * pixel_auroc(m, masks),
                         "pro": 100 * pro_score(m, masks, fpr_limit=cfg.metrics.pro_fpr_limit),
                         "image_auroc": 100 * image_auroc(np.asarray(scores), labels)})
    return rows


def main(argv: list[str]) -> int:
    *homes, out = argv
    jobs = [(home, ck.parent) for home in homes
            for ck in sorted(Path(home, "checkpoints", "folder").glob("*/*/model.safetensors"))]
    with ThreadPoolExecutor(max_workers=2) as pool:
        df = pd.DataFrame([r for part in pool.map(_evaluate, jobs) for r in part])
    df["mean3"] = (df.pixel_auroc + df.pro + df.image_auroc) / 3
    means = df.groupby(["draw", "scorer", "noise_draws"])[["pixel_auroc", "pro", "image_auroc", "mean3"]].mean()
    lines = [f"# Recorded by: .venv/bin/python bench/draws_on_heldout.py {' '.join(argv)}",
             "# A measurement, not a selection (the preset was fixed by bench/tune_cpu_draws_rule.md). "
             "Whitened, calibrated maps, alpha 0.5; percent.", "",
             "per category:", df.round(1).to_string(index=False), "",
             "means over categories:", means.round(1).to_string()]
    Path(out).write_text("\n".join(lines) + "\n")
    print("\n".join(lines))
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
