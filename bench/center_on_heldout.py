"""Round ten's image-score candidates on the held-out family: a measurement after the choice.

Round ten (bench/tune_cpu_center_rule.md) kept ``score.image_score_center=none`` on the
synthetic tuning family (bench/tune_cpu_center.txt). This reads the Eq. 11 maps that held-out
benchmark runs stored in their parquet partitions (the runs named as arguments: their run
folders) and computes the image AUROC of each candidate from them, so the three readings are
compared on the same maps. It chooses nothing. The maps are stored in float16, so the ``none``
rows reproduce the image scores the benchmark stored to float16's precision (checked: within
0.2 %), and their image AUROC the benchmark's; the pixel metrics do not depend on the candidate.

    .venv/bin/python bench/center_on_heldout.py RUN_DIR... OUT
"""

from __future__ import annotations

import sys
from pathlib import Path

import numpy as np
import pandas as pd
import torch

from diffad_core.config import load_config
from diffad_core.metrics import image_auroc
from diffad_core.results import list_categories_in_run, read_category
from diffad_core.score import image_scores

CENTERS = ("none", "median", "robust")


def main(argv: list[str]) -> int:
    if len(argv) < 2:
        print(__doc__.splitlines()[-1].strip(), file=sys.stderr)
        return 2
    *runs, out = argv
    # The preset's image score when round ten ran (the top-4 mean; top-64 since round nineteen).
    settings = load_config("cpu").score.model_copy(update={"top_k": 4})
    rows = []
    for run in runs:
        for category in list_categories_in_run(run):
            data = read_category(run, category, maps=("anomaly_map",))
            anomaly = torch.from_numpy(data.maps["anomaly_map"])
            for center in CENTERS:
                scores = image_scores(anomaly, settings.model_copy(update={"image_score_center": center})).numpy()
                if center == "none":
                    assert np.allclose(scores, data.image_scores, rtol=2e-3, atol=1e-3), f"{run}/{category}"
                rows.append({"run": Path(run).name, "category": category, "center": center,
                             "image_auroc": 100 * image_auroc(scores, data.labels)})
    df = pd.DataFrame(rows)
    text = "\n".join([
        f"# Recorded by: .venv/bin/python bench/center_on_heldout.py {' '.join(runs)} {out}",
        "", "image AUROC % per candidate (pixel AUROC and PRO do not depend on it)", "",
        df.pivot_table(index=["run", "category"], columns="center", values="image_auroc").round(1).to_string(),
        "", "means over categories:",
        df.groupby(["run", "center"]).image_auroc.mean().unstack().round(1).to_string(),
    ])
    Path(out).write_text(text + "\n")
    print(text)
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
