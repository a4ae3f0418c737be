"""PaDiM, the baseline, fed the images at a larger size: a reference beside the `cpu` preset.

In the `cpu` preset the UNet, PaDiM and the masks are at 64 px, and the feature target alone
sees the images at up to 256 px (bench/tune_cpu_features_rule.md). So the PaDiM numbers that
`diffad benchmark` prints beside the ensemble are those of a 64 px PaDiM. This script measures
PaDiM as the pipeline builds it (`model.build_padim`, the preset's backbone and channels),
fitted on the same training images: the held-out normals are left out as training leaves them.
Its input is the images at each size in SIZES. Each map is then brought to the 64 px masks
(bilinear, antialiased) and scored with the pipeline's metrics and image score. At 64 px it
must reproduce the benchmark's own PaDiM row, which checks the script. It is a measurement only:
nothing is chosen with it.

    .venv/bin/python bench/padim_at_size.py ROOT OUT.txt      # ROOT: an MVTec-style folder
"""

from __future__ import annotations

import sys
import time
from pathlib import Path

import numpy as np
import pandas as pd
import torch
import torch.nn.functional as F

from diffad_core.config import load_config
from diffad_core.data import list_categories, prepare_split, split_train_validation
from diffad_core.metrics import image_auroc, pixel_auroc, pro_score
from diffad_core.model import build_padim
from diffad_core.score import image_scores

SIZES = (64, 128, 256)
EVAL_SIZE = 64  # the cpu preset's image size: where its masks and maps are scored


def _category(root: Path, category: str, size: int) -> dict[str, float]:
    cfg = load_config("cpu", overrides=[f"data.root={root}", f"data.categories=[{category}]",
                                        f"data.image_size={size}"])
    at_eval = cfg.with_changes({"data": {"image_size": EVAL_SIZE}})
    train = prepare_split(cfg, category, "train")
    keep, _held_out = split_train_validation(len(train), cfg.score.validation_fraction, cfg.seed)
    images = torch.from_numpy(train.images[keep])
    padim = build_padim(cfg)
    start = time.perf_counter()
    padim.fit(images[i:i + cfg.score.batch_size] for i in range(0, len(images), cfg.score.batch_size))
    test, masks = prepare_split(cfg, category, "test"), prepare_split(at_eval, category, "test")
    maps = []
    for i in range(0, len(test), cfg.score.batch_size):
        m = padim.score_map(torch.from_numpy(test.images[i:i + cfg.score.batch_size])).float().unsqueeze(1)
        m = F.interpolate(m, size=(size, size), mode="bilinear", align_corners=False)  # as score._padim_map
        if size != EVAL_SIZE:
            m = F.interpolate(m, size=(EVAL_SIZE, EVAL_SIZE), mode="bilinear", align_corners=False, antialias=True)
        maps.append(m[:, 0])
    amap = torch.cat(maps)
    scores = image_scores(amap, cfg.score).numpy()
    # Also the top-4 mean, the cpu preset's image score before round nineteen's top-64
    # (bench/tune_cpu_photo.txt), so that draws before and after it compare.
    top4 = image_scores(amap, cfg.score.model_copy(update={"top_k": 4})).numpy()
    amap_np = amap.numpy().astype(np.float32)
    return {"category": category, "size": size, "pixel_auroc": pixel_auroc(amap_np, masks.masks),
            "pro": pro_score(amap_np, masks.masks, fpr_limit=cfg.metrics.pro_fpr_limit),
            "image_auroc": image_auroc(scores, masks.labels), "image_auroc_top4": image_auroc(top4, masks.labels),
            "seconds": time.perf_counter() - start}


def main(argv: list[str]) -> int:
    if len(argv) != 2:
        print(__doc__.strip().splitlines()[-1], file=sys.stderr)
        return 2
    root, out = Path(argv[0]), Path(argv[1])
    torch.set_num_threads(1)
    rows = [_category(root, c, s) for s in SIZES for c in list_categories(root, "folder")]
    df = pd.DataFrame(rows)
    metrics = ["pixel_auroc", "pro", "image_auroc", "image_auroc_top4"]
    df[metrics] *= 100
    mean = df.groupby("size")[[*metrics, "seconds"]].mean()
    top_k = load_config("cpu").score.top_k
    text = "\n".join([f"PaDiM of the cpu preset on {root}, maps scored at {EVAL_SIZE} px; image_auroc: the "
                      f"preset's image score (top-{top_k} mean), image_auroc_top4: the top-4 mean", "",
                      df.round(1).to_string(index=False), "", "means over categories:",
                      mean.round(1).to_string()])
    out.write_text(text + "\n")
    print(text)
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
