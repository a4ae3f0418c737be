"""The ensemble against its own terms on a held-out run, with the terms calibrated as Eq. 11
calibrates them.

Until this session's fix (``score_batch``: the "KL only" and "feature only" ablations are Eq. 11
at alpha 1 and 0) the benchmark reported the raw terms; with one mean per term that gave the same
metrics, with the per-position means it does not. This scores a held-out benchmark's own models
(their versions read from its recorded output) once more with the ``cpu`` preset's scoring and
today's code, and prints the ensemble, the two calibrated terms and the raw ones. Chooses nothing.

    .venv/bin/python bench/terms_on_heldout.py HOME DATA_ROOT RECORDED_OUTPUT OUT
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

from diffad_core.data import prepare_split
from diffad_core.metrics import image_auroc, pixel_auroc, pro_score
from diffad_core.score import image_scores, score_split
from diffad_core.usecases import load_for_evaluation
from diffad_core.validation import calibrate


def _rows(job: tuple[str, str, str, str]) -> list[dict]:
    home, data_root, category, version = job
    torch.set_num_threads(1)
    ev = load_for_evaluation(Path(home) / "checkpoints" / "folder" / category / version)
    settings = ev.cfg.score.model_copy(update={"ablations": ["kl", "feature"]})
    cfg = ev.cfg.model_copy(update={"score": settings}).with_changes({"data": {"root": data_root}})
    calibration = calibrate(ev.model, cfg, category)
    recs = list(score_split(ev.model, prepare_split(cfg, category, "test"), settings, alpha=settings.alpha,
                            calibration=calibration, seed=cfg.seed, progress=False))
    masks, labels = np.stack([r.mask for r in recs]), np.array([r.label for r in recs])
    maps = {"ensemble": np.stack([r.anomaly_map for r in recs]),
            "KL only (calibrated)": np.stack([r.ablation_maps["kl"] for r in recs]),
            "feature only (calibrated)": np.stack([r.ablation_maps["feature"] for r in recs]),
            "KL only (raw)": np.stack([r.kl_map for r in recs]),
            "feature only (raw)": np.stack([r.feature_map for r in recs])}
    rows = []
    for scorer, m in maps.items():
        scores = image_scores(torch.from_numpy(m), settings).numpy()
        rows.append({"category": category, "scorer": scorer, "pixel_auroc": 100 * pixel_auroc(m, masks),
                     "pro": 100 * pro_score(m, masks, fpr_limit=0.3),
                     "image_auroc": 100 * image_auroc(scores, labels)})
    return rows


def main(argv: list[str]) -> int:
    if len(argv) != 4:
        print(__doc__.splitlines()[-1].strip(), file=sys.stderr)
        return 2
    home, data_root, record, out = argv
    versions = dict(re.findall(r"(\w+)@([0-9a-f]{16})", Path(record).read_text()))
    t0 = time.perf_counter()
    with ThreadPoolExecutor(max_workers=2) as pool:
        jobs = [(home, data_root, c, v) for c, v in sorted(versions.items())]
        df = pd.DataFrame([r for part in pool.map(_rows, jobs) for r in part])
    cols = ["pixel_auroc", "pro", "image_auroc"]
    order = list(dict.fromkeys(df.scorer))
    text = "\n".join([
        f"# Recorded by: .venv/bin/python bench/terms_on_heldout.py {' '.join(argv)}",
        f"", f"models: {versions}; wall time {time.perf_counter() - t0:.0f} s", "",
        "means over categories (%):",
        df.groupby("scorer")[cols].mean().reindex(order).round(1).to_string(),
        "", "per category (%):",
        df.set_index(["category", "scorer"])[cols].round(1).to_string(),
    ])
    Path(out).write_text(text + "\n")
    print(text)
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
