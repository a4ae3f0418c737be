"""Round twenty-three of issue #8: the noise draws per scoring step re-chosen on the photo family.

The rule was fixed and committed before this script (bench/tune_cpu_draws_photo_rule.md). The
preset's models of both tuning families (those of round twenty-two's choice) score each family's
test split as painted and at 0.35 contrast with the preset's scoring at K = 4 (the preset), 8 and
16 noise draws, each K with its own calibration on the models' held-out normals. Output:
bench/tune_cpu_draws_photo.txt.

    TUNE_HOME=/tmp/diffad-tune-draws .venv/bin/python bench/tune_cpu_draws_photo.py
"""

from __future__ import annotations

import sys
import time
from concurrent.futures import ThreadPoolExecutor
from itertools import product

import pandas as pd

import tune_cpu_faint as faint  # beside this script: the synthetic families, metrics, output
import tune_cpu_photo as photo  # the photo families, their models and round nineteen's rule

DRAWS = {"preset": 4, "draws8": 8, "draws16": 16}
CATEGORIES = (*photo.PHOTO_CATEGORIES, *faint.CATEGORIES)
SCORING_KEYS = ("alpha", "calibrate_maps", "feature_whitening", "position_mean_sigma", "edge_spread_width",
                "top_k", "image_score_sigma", "validation_fraction")


def _training(category: str) -> str:
    """The preset's models: round twenty-two's if it adopted its training timestep cap."""
    from diffad_core.config import load_config

    if load_config("cpu").train.max_timestep == 401:
        return "tcap401"
    return photo.TRAINING[photo.family_kind(category)]


def _rows(job: tuple[str, str]) -> list[dict]:
    from diffad_core.config import load_config

    candidate, category = job
    preset = load_config("cpu")

    def check(ev, settings) -> None:
        assert ev.cfg.train.max_timestep == preset.train.max_timestep, f"{job}: not the preset's training"
        assert all(getattr(settings, k) == getattr(preset.score, k) for k in SCORING_KEYS), f"{job}: scoring"

    # The models were trained before rounds nineteen and twenty-one changed the scoring.
    update = {"top_k": preset.score.top_k, "edge_spread_width": preset.score.edge_spread_width,
              "noise_draws": DRAWS[candidate]}
    return photo.candidate_rows(category, _training(category), candidate, update, check)


def main() -> int:
    from diffad_core.config import load_config

    preset = load_config(preset="cpu").score
    assert preset.noise_draws == DRAWS["preset"] and preset.edge_spread_width == 4, "the cpu preset moved"
    t0 = time.perf_counter()
    with ThreadPoolExecutor(max_workers=2) as pool:
        df = pd.DataFrame([r for part in pool.map(_rows, product(DRAWS, CATEGORIES)) for r in part])
    df["mean3"] = (df.pixel_auroc + df.pro + df.image_auroc) / 3
    means = df.groupby(["family", "candidate"]).mean3.mean()
    candidates = [c for c in DRAWS if c != "preset"]
    chosen, lines = photo.named_rule_step(means, candidates, lambda near_best: min(near_best, key=DRAWS.get))
    cols = ["pixel_auroc", "pro", "image_auroc", "mean3"]
    out = [
        "round twenty-three (bench/tune_cpu_draws_photo_rule.md): score.noise_draws 8 / 16 against the preset's 4, "
        f"the preset's models of both tuning families ({', '.join(sorted({_training(c) for c in CATEGORIES}))}), "
        "each K with its own calibration",
        f"total wall time {time.perf_counter() - t0:.0f} s (two jobs at once, one thread each)",
        "", "means over categories (score_s: calibration and scoring of both draws, per category):",
        df.groupby(["family", "candidate"])[cols + ["score_s"]].mean().round(3).to_string(),
        "", "rule (baseline: the preset; the smallest K within 0.002 of the best qualifying one):", *lines,
        f"  -> {chosen} (K = {DRAWS[chosen]})",
        "", "per category:",
        df.groupby(["family", "category", "candidate"])[cols].mean().round(3).to_string(),
    ]
    faint.write_output("tune_cpu_draws_photo.txt", out)
    return 0


if __name__ == "__main__":
    sys.exit(main())
