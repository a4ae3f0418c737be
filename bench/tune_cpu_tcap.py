"""Round twenty-two of issue #8: training only the part of the chain that is scored.

The rule was fixed and committed before this script (bench/tune_cpu_tcap_rule.md). Both tuning
families (the photo family of round nineteen, the synthetic seed-1 family) get a fresh training
of the `cpu` preset with `train.max_timestep=401` (`$TUNE_HOME/ck/tcap401`), and each model, with
round nineteen's as the baseline (`ck/photo`, `ck/long`), scores its family as painted and at 0.35
contrast with the preset's scoring (round twenty-one's) and its own calibration. Output:
bench/tune_cpu_tcap.txt.

    TUNE_HOME=/tmp/diffad-tune-draws .venv/bin/python bench/tune_cpu_tcap.py
"""

from __future__ import annotations

import os
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from itertools import product

import pandas as pd
import torch

import tune_cpu_faint as faint  # beside this script: the synthetic families, training, metrics
import tune_cpu_photo as photo  # the photo families, their models and round nineteen's rule

CAP = 401  # the original step of the largest scoring step (index 100 of the 250-step chain)
CATEGORIES = (*photo.PHOTO_CATEGORIES, *faint.CATEGORIES)
# candidate -> training folder per family kind
TRAININGS = {"preset": {"photo": "photo", "synth": "long"}, "tcap401": {"photo": "tcap401", "synth": "tcap401"}}
SCORING_KEYS = ("alpha", "calibrate_maps", "feature_whitening", "noise_draws", "position_mean_sigma",
                "edge_spread_width", "top_k", "image_score_sigma", "validation_fraction")


def _kind(category: str) -> str:
    return "photo" if category in photo.PHOTO_CATEGORIES else "synth"


def _train(category: str) -> float:
    extra = ("auto.time_budget_minutes=30", f"train.max_timestep={CAP}")
    if _kind(category) == "photo":
        extra = (f"data.root={photo.PHOTO_FAMILIES['photo-full']}", *extra)
    return faint._train(category, TRAININGS["tcap401"][_kind(category)], extra)


def _rows(job: tuple[str, str]) -> list[dict]:
    from diffad_core.config import load_config
    from diffad_core.data import prepare_split
    from diffad_core.score import score_split
    from diffad_core.usecases import load_for_evaluation
    from diffad_core.validation import calibrate

    candidate, category = job
    os.environ["DIFFAD_HOME"] = str(faint.HOME)
    torch.set_num_threads(1)
    training = TRAININGS[candidate][_kind(category)]
    ev = load_for_evaluation(faint.HOME / "ck" / training / category)
    assert ev.cfg.train.max_timestep == (CAP if candidate == "tcap401" else None), f"{job}: not its training"
    preset = load_config("cpu").score
    # The baseline models were trained before rounds nineteen and twenty-one changed the scoring.
    settings = ev.cfg.score.model_copy(update={"top_k": preset.top_k, "edge_spread_width": preset.edge_spread_width})
    assert all(getattr(settings, k) == getattr(preset, k) for k in SCORING_KEYS), f"{job}: not the preset's scoring"
    cfg = ev.cfg.model_copy(update={"score": settings})
    start = time.perf_counter()
    calibration = calibrate(ev.model, cfg, category)
    families = photo.PHOTO_FAMILIES if _kind(category) == "photo" else {f"synth-{k}": v for k, v in faint.FAMILIES.items()}
    logged = faint.logged_training(training, category)
    rows = []
    for family, root in families.items():
        prepared = prepare_split(cfg.with_changes({"data": {"root": str(root)}}), category, "test")
        records = list(score_split(ev.model, prepared, settings, alpha=settings.alpha, calibration=calibration,
                                   seed=cfg.seed, progress=False))
        rows.append({"family": family, "category": category, "candidate": candidate,
                     **faint.record_metrics(records), "steps": logged["steps"], "train_s": logged["seconds"]})
    for row in rows:
        row["score_s"] = time.perf_counter() - start
    return rows


def main() -> int:
    from diffad_core.config import load_config

    preset = load_config(preset="cpu")
    assert preset.train.max_timestep is None and preset.score.edge_spread_width == 4, "the cpu preset moved"
    assert preset.auto.time_budget_minutes == 30.0
    t0 = time.perf_counter()
    photo._generate_photo()
    faint._generate()
    with ThreadPoolExecutor(max_workers=2) as pool:
        train_s = dict(zip(CATEGORIES, pool.map(_train, CATEGORIES)))
    print(f"trained ({time.perf_counter() - t0:.0f} s): {train_s}", flush=True)
    with ThreadPoolExecutor(max_workers=2) as pool:
        df = pd.DataFrame([r for part in pool.map(_rows, product(TRAININGS, CATEGORIES)) for r in part])
    df["mean3"] = (df.pixel_auroc + df.pro + df.image_auroc) / 3
    means = df.groupby(["family", "candidate"]).mean3.mean()

    chosen, lines = photo.rule_step(means, ("preset",), [("tcap401",)], lambda c: c[0])
    cols = ["pixel_auroc", "pro", "image_auroc", "mean3"]
    out = [
        f"round twenty-two (bench/tune_cpu_tcap_rule.md): train.max_timestep={CAP} (tcap401, trained afresh) "
        "against the preset (round nineteen's models, ck/photo and ck/long), both tuning families, the "
        "preset's scoring (round twenty-one's), each model with its own calibration",
        f"total wall time {time.perf_counter() - t0:.0f} s (two jobs at once, one thread each); tcap401 "
        f"training s per category in this run (0: the model was there): {train_s}",
        "", "means over categories (train_s: from each training's own log):",
        df.groupby(["family", "candidate"])[cols + ["steps", "train_s", "score_s"]].mean().round(3).to_string(),
        "", "rule (baseline: the preset):", *lines, f"  -> {chosen[0]}",
        "", "per category:",
        df.groupby(["family", "category", "candidate"])[cols].mean().round(3).to_string(),
    ]
    faint.write_output("tune_cpu_tcap.txt", out)
    return 0


if __name__ == "__main__":
    sys.exit(main())
