"""Round twenty-one of issue #8: each term's spread taken per distance from the map's edge.

The rule was fixed and committed before this script (bench/tune_cpu_edge_rule.md). The preset's
models of both tuning families (round nineteen's `ck/photo`, round eighteen's `ck/long`) score
each family's test split as painted and at 0.35 contrast once, with the preset's scoring (top-64
image score); each candidate (`score.edge_spread_width` 4 or 8) only divides those maps by its
own calibration's spreads, whose whitening and per-position means are checked to be the
preset's. Output: bench/tune_cpu_edge.txt.

    TUNE_HOME=/tmp/diffad-tune-draws .venv/bin/python bench/tune_cpu_edge.py
"""

from __future__ import annotations

import os
import sys
import time
from concurrent.futures import ThreadPoolExecutor

import numpy as np
import pandas as pd
import torch

import tune_cpu_faint as faint  # beside this script: the synthetic families, metrics, output
import tune_cpu_photo as photo  # the photo families, their models and round nineteen's rule

WIDTHS = (None, 4, 8)  # score.edge_spread_width; None: the preset (one spread per term)
CATEGORIES = (*photo.PHOTO_CATEGORIES, *faint.CATEGORIES)
SCORING_KEYS = ("alpha", "calibrate_maps", "feature_whitening", "noise_draws", "position_mean_sigma",
                "top_k", "image_score_sigma", "edge_spread_width")


def _label(setting: tuple) -> str:
    return "the preset" if setting[0] is None else f"edge{setting[0]}"


def _rows(category: str) -> list[dict]:
    from diffad_core.config import load_config
    from diffad_core.data import prepare_split
    from diffad_core.metrics import image_auroc, pixel_auroc, pro_score
    from diffad_core.score import ComponentMaps, anomaly_map, image_scores, score_split
    from diffad_core.usecases import load_for_evaluation
    from diffad_core.validation import calibrate

    os.environ["DIFFAD_HOME"] = str(faint.HOME)
    torch.set_num_threads(1)
    kind = "photo" if category in photo.PHOTO_CATEGORIES else "synth"
    ev = load_for_evaluation(faint.HOME / "ck" / photo.TRAINING[kind] / category)
    preset = load_config("cpu").score
    settings = ev.cfg.score.model_copy(update={"top_k": preset.top_k})
    assert all(getattr(settings, k) == getattr(preset, k) for k in SCORING_KEYS), f"{category}: not the preset's scoring"
    start = time.perf_counter()
    calibrations = {}
    for width in WIDTHS:
        variant = ev.cfg.model_copy(update={"score": settings.model_copy(update={"edge_spread_width": width})})
        calibrations[width] = calibrate(ev.model, variant, category)
        assert calibrations[width].whitening == calibrations[None].whitening
        assert calibrations[width].position_means == calibrations[None].position_means
    families = photo.PHOTO_FAMILIES if kind == "photo" else {f"synth-{k}": v for k, v in faint.FAMILIES.items()}
    rows = []
    for family, root in families.items():
        prepared = prepare_split(ev.cfg.with_changes({"data": {"root": str(root)}}), category, "test")
        records = list(score_split(ev.model, prepared, settings, alpha=settings.alpha,
                                   calibration=calibrations[None], seed=ev.cfg.seed, progress=False))
        maps = ComponentMaps(kl=torch.from_numpy(np.stack([r.kl_map for r in records])),
                             feature=torch.from_numpy(np.stack([r.feature_map for r in records])))
        masks, labels = np.stack([r.mask for r in records]), np.array([r.label for r in records])
        kinds = np.array([r.defect_type for r in records])
        assert np.allclose(anomaly_map(maps, settings.alpha, calibrations[None]).numpy(),
                           np.stack([r.anomaly_map for r in records]), atol=1e-5)
        for width, calibration in calibrations.items():
            anomaly = anomaly_map(maps, settings.alpha, calibration)
            scores = image_scores(anomaly, settings).numpy()
            for defect in ("all", *sorted(set(kinds) - {"good"})):
                keep = np.ones(len(kinds), bool) if defect == "all" else (kinds == defect) | (kinds == "good")
                a = anomaly[keep].numpy()
                rows.append({"family": family, "category": category, "defect": defect,
                             "candidate": _label((width,)),
                             "pixel_auroc": pixel_auroc(a, masks[keep]),
                             "pro": pro_score(a, masks[keep], fpr_limit=0.3),
                             "image_auroc": image_auroc(scores[keep], labels[keep])})
    for row in rows:
        row["eval_s"] = time.perf_counter() - start
    return rows


def main() -> int:
    from diffad_core.config import load_config

    preset = load_config(preset="cpu").score
    assert preset.edge_spread_width is None and preset.top_k == 64, "the cpu preset moved"
    t0 = time.perf_counter()
    with ThreadPoolExecutor(max_workers=2) as pool:
        df = pd.DataFrame([r for part in pool.map(_rows, CATEGORIES) for r in part])
    df["mean3"] = (df.pixel_auroc + df.pro + df.image_auroc) / 3
    whole = df[df.defect == "all"]
    means = whole.groupby(["family", "candidate"]).mean3.mean()
    chosen, lines = photo.rule_step(means, ("the preset",), [(_label((w,)),) for w in WIDTHS[1:]],
                                    lambda c: c[0])
    cols = ["pixel_auroc", "pro", "image_auroc", "mean3"]
    out = [
        "round twenty-one (bench/tune_cpu_edge_rule.md): score.edge_spread_width 4 / 8 against the preset "
        "(one spread per term), the preset's models of both tuning families (ck/photo, ck/long), each "
        "test split scored once with the preset's scoring (top-64), each candidate with its own spreads",
        f"total wall time {time.perf_counter() - t0:.0f} s (two categories at once, one thread each)",
        "", "means over categories:",
        whole.groupby(["family", "candidate"])[cols].mean().round(3).to_string(),
        "", "rule (baseline: the preset):", *lines, f"  -> {chosen[0]}",
        "", "per category:",
        whole.groupby(["family", "category", "candidate"])[cols].mean().round(3).to_string(),
        "", "per defect kind (each kind with all normal test images of its category):",
        df[df.defect != "all"].groupby(["family", "category", "defect", "candidate"])[cols]
          .mean().round(3).to_string(),
    ]
    faint.write_output("tune_cpu_edge.txt", out)
    return 0


if __name__ == "__main__":
    sys.exit(main())
