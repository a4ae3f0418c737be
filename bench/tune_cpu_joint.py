"""Round seventeen of issue #8: the feature residual whitened jointly over the scoring steps.

The rule was fixed and committed before this script (bench/tune_cpu_joint_rule.md). Round
nine's models of the synthetic seed-1 family (``feat256``, as bench/tune_cpu_faint.py trains
them where missing) score both families (as painted, "full", and at 0.35 of the defects'
contrast, "faint") with the ``cpu`` preset's scoring, once per whitening (``full``: the preset;
``joint``), each with its own calibration and the same noise. Output: bench/tune_cpu_joint.txt.

    TUNE_HOME=/tmp/diffad-tune-draws .venv/bin/python bench/tune_cpu_joint.py
"""

from __future__ import annotations

import sys
import time

import tune_cpu_faint as faint  # beside this script: the families, their models, round nine's scoring

ALPHA = 0.1  # the cpu preset's (checked in main())
CANDIDATES = ("full", "joint")


def _rows(category: str) -> list[dict]:
    rows = []
    for kind in CANDIDATES:
        settings, calibration, records = faint.scored_families(category, ALPHA, score={"feature_whitening": kind})
        assert calibration.whitening.kind == kind and settings.position_mean_sigma == 2.0
        rows += [{"family": family, "category": category, "whitening": kind, **faint.record_metrics(recs)}
                 for family, recs in records.items()]
    return rows


def main() -> int:
    from diffad_core.config import load_config

    preset = load_config(preset="cpu").score
    assert preset.feature_whitening == "full" and preset.alpha == ALPHA, "the cpu preset moved"
    assert all(getattr(preset, k) == v for k, v in faint.PRESET_SCORING.items())
    t0 = time.perf_counter()
    train_s = faint.prepared_models()
    df = faint.per_category(_rows)
    means = df.groupby(["family", "whitening"]).mean3.mean()
    chosen, base_faint, base_full, lines = faint.one_step_rule(means, "full", ["joint"], str)

    cols = ["pixel_auroc", "pro", "image_auroc", "mean3"]
    out = [
        "round seventeen (bench/tune_cpu_joint_rule.md): round nine's models of the synthetic seed-1 "
        "family, scored on it (full) and on its faint draw (defect contrast 0.35), the cpu preset's "
        "scoring (alpha 0.1) with the feature residual whitened per step (full) or jointly (joint)",
        f"total wall time {time.perf_counter() - t0:.0f} s (two categories at once, one thread each); "
        f"training s per category (0: the model was there): {train_s}",
        "", "means over categories:", df.groupby(["family", "whitening"])[cols].mean().round(3).to_string(),
        "", f"rule (from full: M_faint {base_faint:.3f}, M_full {base_full:.3f}):",
        *lines, f"  -> {chosen}",
        "", "per category:", df.groupby(["family", "category", "whitening"])[cols].mean().round(3).to_string(),
    ]
    faint.write_output("tune_cpu_joint.txt", out)
    return 0


if __name__ == "__main__":
    sys.exit(main())
