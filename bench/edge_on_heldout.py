"""Round twenty-one's spreads on the held-out family: a measurement after the choice.

Round twenty-one (bench/tune_cpu_edge_rule.md) chose to divide each term of Eq. 11 by its
held-out normals' spread at each of the 4 outermost pixels' distances from the edge, on the
tuning families (bench/tune_cpu_edge.txt). This reads the KL and feature maps that held-out
benchmark runs stored in their parquet partitions, calibrates each run's own models on their own
held-out normal training images twice, with one spread per term (`none`) and with round
twenty-one's (`edge4`), and mixes the same stored maps by Eq. 11 under each, with the preset's
scoring otherwise (alpha 0.1, per-position means, top-64). It chooses nothing. Each run's own
setting reproduces the anomaly maps it stored (checked; they are stored in float16).

    .venv/bin/python bench/edge_on_heldout.py HOME:DATA_ROOT... OUT
"""

from __future__ import annotations

import sys
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import pandas as pd
import torch

from diffad_core.config import load_config
from diffad_core.metrics import image_auroc, pixel_auroc, pro_score
from diffad_core.results import list_categories_in_run, read_category
from diffad_core.score import ComponentMaps, anomaly_map, image_scores
from diffad_core.usecases import load_for_evaluation
from diffad_core.validation import calibrate

WIDTHS = {"none": None, "edge4": 4}
SCORING_KEYS = ("alpha", "calibrate_maps", "feature_whitening", "noise_draws", "position_mean_sigma")


def _rows(job: tuple[Path, str, str]) -> list[dict]:
    run, root, category = job
    torch.set_num_threads(1)
    data = read_category(run, category, maps=("kl_map", "feature_map", "anomaly_map"))
    (version,) = data.model_versions
    ev = load_for_evaluation(run.parent.parent / "checkpoints" / "folder" / category / version.split("@")[1])
    preset = load_config("cpu").score
    maps = ComponentMaps(kl=torch.from_numpy(data.maps["kl_map"]), feature=torch.from_numpy(data.maps["feature_map"]))
    rows, reproduced = [], False
    for name, width in WIDTHS.items():
        settings = ev.cfg.score.model_copy(update={"top_k": preset.top_k, "edge_spread_width": width})
        assert all(getattr(settings, k) == getattr(preset, k) for k in SCORING_KEYS), f"{run}/{category}: scoring"
        cfg = ev.cfg.model_copy(update={"score": settings}).with_changes({"data": {"root": root}})
        anomaly = anomaly_map(maps, settings.alpha, calibrate(ev.model, cfg, category))
        reproduced |= np.allclose(anomaly.numpy(), data.maps["anomaly_map"], rtol=1e-2, atol=2e-2)
        rows.append({"run": run.name, "category": category, "spread": name,
                     "pixel_auroc": 100 * pixel_auroc(anomaly.numpy(), data.mask),
                     "pro": 100 * pro_score(anomaly.numpy(), data.mask, fpr_limit=0.3),
                     "image_auroc": 100 * image_auroc(image_scores(anomaly, settings).numpy(), data.labels)})
    assert reproduced, f"{run}/{category}: neither calibration reproduces the stored anomaly maps"
    return rows


def main(argv: list[str]) -> int:
    if len(argv) < 2:
        print(__doc__.splitlines()[-1].strip(), file=sys.stderr)
        return 2
    *pairs, out = argv
    jobs = []
    for pair in pairs:
        home, root = pair.split(":")
        (run,) = [p for p in (Path(home) / "results").iterdir() if (p / "run.json").is_file()]
        jobs += [(run, root, category) for category in list_categories_in_run(run)]
    with ThreadPoolExecutor(max_workers=2) as pool:
        df = pd.DataFrame([r for part in pool.map(_rows, jobs) for r in part])
    cols = ["pixel_auroc", "pro", "image_auroc"]
    text = "\n".join([
        f"# Recorded by: .venv/bin/python bench/edge_on_heldout.py {' '.join(argv)}",
        "", "per category (%):", df.set_index(["run", "category", "spread"])[cols].round(1).to_string(),
        "", "means over categories (%):", df.groupby(["run", "spread"])[cols].mean().round(1).to_string(),
    ])
    Path(out).write_text(text + "\n")
    print(text)
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
