"""Round eighteen of issue #8: a finer grid for Eq. 11's feature term, and the whole time budget.

The rule was fixed and committed before this script (bench/tune_cpu_finegrid_rule.md). The
synthetic seed-1 family's ``feat256`` models (bench/tune_cpu_faint.py's, trained where missing)
score both families (as painted, "full", and at 0.35 of the defects' contrast, "faint") with the
``cpu`` preset's scoring on their own 16 x 16 grid (``base``) and with the feature term compared
on 32 x 32 and 64 x 64 grids (``map32``, ``map64``: ``score.feature_map_size``); two new trainings,
``grid32`` (``unet.feature_stride=2``) and ``long`` (``auto.time_budget_minutes=30``), score the
same way on their own grid. Each candidate has its own calibration. Output:
bench/tune_cpu_finegrid.txt.

    TUNE_HOME=/tmp/diffad-tune-draws .venv/bin/python bench/tune_cpu_finegrid.py
"""

from __future__ import annotations

import json
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from itertools import product

import tune_cpu_faint as faint  # beside this script: the families, their models, round nine's scoring

ALPHA = 0.1  # the cpu preset's (checked in main())
# candidate: (training, score settings on top of the preset's)
CANDIDATES = {"base": ("feat256", {}), "map32": ("feat256", {"feature_map_size": 32}),
              "map64": ("feat256", {"feature_map_size": 64}), "grid32": ("grid32", {}),
              "long": ("long", {})}
TRAININGS = {"grid32": ("unet.feature_stride=2",), "long": ("auto.time_budget_minutes=30",)}
TIME_CAP = {"grid32": 1.15, "long": 1.3}  # the rule's, against base's training time


def _rows(category: str) -> list[dict]:
    rows = []
    for name, (training, score) in CANDIDATES.items():
        start = time.perf_counter()
        settings, calibration, records = faint.scored_families(category, ALPHA, training=training, score=score)
        assert settings.position_mean_sigma == 2.0 and calibration.whitening.kind == "full"
        score_s = time.perf_counter() - start
        cfg = json.loads((faint.HOME / "ck" / training / category / "config.json").read_text())
        grid = settings.feature_map_size or cfg["data"]["image_size"] // cfg["unet"]["feature_stride"]
        logged = faint.logged_training(training, category)
        rows += [{"family": family, "category": category, "candidate": name,
                  **faint.record_metrics(recs), "grid": grid, "steps": logged["steps"],
                  "train_s": logged["seconds"], "score_s": score_s}
                 for family, recs in records.items()]
    return rows


def main() -> int:
    from diffad_core.config import load_config

    preset = load_config(preset="cpu")
    assert preset.score.alpha == ALPHA and preset.score.feature_map_size is None, "the cpu preset moved"
    assert all(getattr(preset.score, k) == v for k, v in faint.PRESET_SCORING.items())
    assert preset.unet.feature_stride == 4 and preset.auto.time_budget_minutes == 25.0
    t0 = time.perf_counter()
    train_s = faint.prepared_models()
    jobs = list(product(TRAININGS, faint.CATEGORIES))
    with ThreadPoolExecutor(max_workers=2) as pool:
        list(pool.map(lambda j: faint._train(j[1], j[0], TRAININGS[j[0]]), jobs))
    print(f"trained ({time.perf_counter() - t0:.0f} s)", flush=True)
    df = faint.per_category(_rows)
    means = df.groupby(["family", "candidate"]).mean3.mean()
    time_of = df[df.family == "full"].groupby("candidate").train_s.mean()
    ratio = {name: time_of[name] / time_of["base"] for name in CANDIDATES}
    fast_enough = [n for n in CANDIDATES if n != "base" and ratio[n] <= TIME_CAP.get(n, float("inf"))]
    chosen, base_faint, base_full, lines = faint.one_step_rule(
        means, "base", fast_enough, lambda n: f"{n} (training time x{ratio[n]:.2f})")
    slow = [f"  {n}: training time x{ratio[n]:.2f} over the cap x{TIME_CAP[n]}, M_faint "
            f"{means[('faint', n)]:.3f}  M_full {means[('full', n)]:.3f}" for n in CANDIDATES
            if n != "base" and n not in fast_enough]

    cols = ["pixel_auroc", "pro", "image_auroc", "mean3"]
    out = [
        "round eighteen (bench/tune_cpu_finegrid_rule.md): the synthetic seed-1 family, scored on it "
        "(full) and on its faint draw (defect contrast 0.35), the cpu preset's scoring (alpha 0.1), "
        "the feature term on a finer grid (map32, map64: score.feature_map_size; grid32: "
        "unet.feature_stride=2) or trained for a 30-minute budget (long)",
        f"total wall time {time.perf_counter() - t0:.0f} s (two jobs at once, one thread each); "
        f"feat256 training s per category in this run (0: the model was there): {train_s}",
        "", "means over categories (train_s: from each training's own log):",
        df.groupby(["family", "candidate"])[cols + ["grid", "steps", "train_s", "score_s"]]
          .mean().round(3).to_string(),
        "", f"rule (from base: M_faint {base_faint:.3f}, M_full {base_full:.3f}):", *lines, *slow,
        f"  -> {chosen}",
        "", "per category:", df.groupby(["family", "category", "candidate"])[cols].mean().round(3).to_string(),
    ]
    faint.write_output("tune_cpu_finegrid.txt", out)
    return 0


if __name__ == "__main__":
    sys.exit(main())
