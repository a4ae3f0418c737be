"""Round thirteen's choice (bench/tune_cpu_position_rule.md) on held-out seeds 10 and 9, measured
after the choice and choosing nothing.

The models the seed-10 and seed-9 benchmarks trained (bench/heldout_seed10_benchmark.txt,
bench/heldout_seed9_alpha.txt; their versions are read from those files) score their test sets
twice with the ``cpu`` preset's scoring, once with one mean per term (``global``, round eleven's
preset) and once with the per-position means (``position_smooth``, the preset now), each with its
own calibration on the model's held-out normals. Output: bench/position_on_heldout.txt.

    .venv/bin/python bench/position_on_heldout.py /tmp/heldout10-home:/tmp/heldout10:10 \\
        /tmp/heldout9-home:/tmp/heldout9:9
"""

from __future__ import annotations

import re
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import pandas as pd
import torch

ROOT = Path(__file__).resolve().parent.parent
RECORDS = {"10": ROOT / "bench" / "heldout_seed10_benchmark.txt",
           "9": ROOT / "bench" / "heldout_seed9_alpha.txt"}
SETTINGS = {"global": None, "position_smooth": 2.0}


def _versions(seed: str) -> dict[str, str]:
    return dict(re.findall(r"(\w+)@([0-9a-f]{16})", RECORDS[seed].read_text()))


def _rows(job: tuple[str, str, str, str, str]) -> list[dict]:
    from diffad_core.data import prepare_split
    from diffad_core.metrics import image_auroc, pixel_auroc, pro_score
    from diffad_core.score import score_split
    from diffad_core.usecases import load_for_evaluation
    from diffad_core.validation import calibrate

    home, data_root, seed, category, version = job
    torch.set_num_threads(1)
    ev = load_for_evaluation(Path(home) / "checkpoints" / "folder" / category / version)
    rows = []
    for name, sigma in SETTINGS.items():
        settings = ev.cfg.score.model_copy(update={"position_mean_sigma": sigma})
        cfg = ev.cfg.model_copy(update={"score": settings}).with_changes({"data": {"root": data_root}})
        calibration = calibrate(ev.model, cfg, category)
        prepared = prepare_split(cfg, category, "test")
        recs = list(score_split(ev.model, prepared, settings, alpha=settings.alpha,
                                calibration=calibration, seed=cfg.seed, progress=False))
        anomaly, masks = np.stack([r.anomaly_map for r in recs]), np.stack([r.mask for r in recs])
        rows.append({"seed": seed, "category": category, "calibration": name, "alpha": settings.alpha,
                     "pixel_auroc": 100 * pixel_auroc(anomaly, masks),
                     "pro": 100 * pro_score(anomaly, masks, fpr_limit=0.3),
                     "image_auroc": 100 * image_auroc(np.array([r.image_score for r in recs]),
                                                      np.array([r.label for r in recs]))})
    return rows


def main(argv: list[str]) -> int:
    t0 = time.perf_counter()
    jobs = []
    for spec in argv:
        home, data_root, seed = spec.split(":")
        jobs += [(home, data_root, seed, c, v) for c, v in sorted(_versions(seed).items())]
    with ThreadPoolExecutor(max_workers=2) as pool:
        df = pd.DataFrame([r for part in pool.map(_rows, jobs) for r in part])
    cols = ["pixel_auroc", "pro", "image_auroc"]
    out = [
        "# Recorded by: .venv/bin/python bench/position_on_heldout.py " + " ".join(argv),
        "", "Round thirteen's per-position calibration on the held-out models (measured after the "
        f"choice; chooses nothing). Wall time {time.perf_counter() - t0:.0f} s.",
        "", "means over categories (%):",
        df.groupby(["seed", "calibration"])[cols].mean().round(1).to_string(),
        "", "per category (%):",
        df.groupby(["seed", "category", "calibration"])[cols].mean().round(1).to_string(),
    ]
    path = ROOT / "bench" / "position_on_heldout.txt"
    path.write_text("\n".join(out) + "\n")
    print("\n".join(out))
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
