"""Round nineteen's image score on the held-out family: a measurement after the choice.

Round nineteen (bench/tune_cpu_photo_rule.md) chose the top-64 mean of the 64 px map as the
`cpu` preset's image score on the photo tuning family (bench/tune_cpu_photo.txt). This reads the
Eq. 11 and PaDiM maps that held-out benchmark runs stored in their parquet partitions (the run
folders named as arguments) and computes the image AUROC of the top-4 and the top-64 mean from
them, for the ensemble and for PaDiM, on the same maps. It chooses nothing. The maps are stored in
float16; the ensemble's image scores the run stored are reproduced by one of the two readings
(checked, within 0.2 %), so its image AUROC is the benchmark's.

    .venv/bin/python bench/topk_on_heldout.py RUN_DIR... OUT
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

TOP_KS = (4, 64)
MAPS = {"ensemble": "anomaly_map", "padim": "padim_map"}


def main(argv: list[str]) -> int:
    if len(argv) < 2:
        print(__doc__.splitlines()[-1].strip(), file=sys.stderr)
        return 2
    *runs, out = argv
    settings = load_config("cpu").score
    rows = []
    for run in runs:
        for category in list_categories_in_run(run):
            data = read_category(run, category, maps=tuple(MAPS.values()))
            for scorer, column in MAPS.items():
                maps = torch.from_numpy(data.maps[column])
                scores = {k: image_scores(maps, settings.model_copy(update={"top_k": k})).numpy() for k in TOP_KS}
                if scorer == "ensemble":
                    assert any(np.allclose(s, data.image_scores, rtol=2e-3, atol=1e-3) for s in scores.values()), \
                        f"{run}/{category}: neither reading reproduces the stored image scores"
                rows += [{"run": Path(run).name, "category": category, "scorer": scorer, "top_k": k,
                          "image_auroc": 100 * image_auroc(s, data.labels)} for k, s in scores.items()]
    df = pd.DataFrame(rows)
    text = "\n".join([
        f"# Recorded by: .venv/bin/python bench/topk_on_heldout.py {' '.join(runs)} {out}",
        "", "image AUROC % of the top-k mean of each stored map (pixel AUROC and PRO do not depend on k)", "",
        df.pivot_table(index=["run", "category"], columns=["scorer", "top_k"], values="image_auroc").round(1).to_string(),
        "", "means over categories:",
        df.groupby(["run", "scorer", "top_k"]).image_auroc.mean().unstack().round(1).to_string(),
    ])
    Path(out).write_text(text + "\n")
    print(text)
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
