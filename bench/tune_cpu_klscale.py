"""Round fifteen of issue #8: Eq. 11's KL term without the per-image normalisation.

The rule was fixed and committed before this script (bench/tune_cpu_klscale_rule.md). Round
nine's models and its two families of the synthetic seed 1 (bench/tune_cpu_faint.py: as painted,
"full", and every test defect at 0.35 of its contrast, "faint"; generated and trained there when
missing) are scored once per KL variant (``score.kl_scale``) with the ``cpu`` preset's scoring as
round fourteen leaves it, the same noise for every variant, one calibration per model and
variant; the maps are then mixed at every alpha of the rule. Output: bench/tune_cpu_klscale.txt.

    TUNE_HOME=/tmp/diffad-tune-draws .venv/bin/python bench/tune_cpu_klscale.py
"""

from __future__ import annotations

import sys
import time

import numpy as np
import torch

import tune_cpu_faint as faint  # beside this script: the families, their models, round nine's scoring

VARIANTS = ("per_image", "bits", "log_bits")
ALPHAS = (0.1, 0.2, 0.3, 0.5, 0.7)
BASELINE = ("per_image", 0.1)  # the cpu preset as round fourteen leaves it (checked in main())


def _rows(category: str) -> list[dict]:
    """Both families' maps of one model under each KL variant, then every alpha (1.0: the KL
    term alone, 0.0: the feature term alone)."""
    from diffad_core.metrics import image_auroc, pixel_auroc, pro_score
    from diffad_core.score import ComponentMaps, anomaly_map, image_scores

    rows, features = [], {}
    for variant in VARIANTS:
        settings, calibration, records = faint.scored_families(category, BASELINE[1],
                                                               score={"kl_scale": variant})
        assert settings.kl_scale == variant and settings.position_mean_sigma == 2.0
        for family, recs in records.items():
            maps = ComponentMaps(kl=torch.from_numpy(np.stack([r.kl_map for r in recs])),
                                 feature=torch.from_numpy(np.stack([r.feature_map for r in recs])))
            # The variants change the KL term only: the same noise gives the same feature maps.
            features.setdefault(family, maps.feature)
            assert torch.equal(features[family], maps.feature), (category, family, variant)
            recorded = torch.from_numpy(np.stack([r.anomaly_map for r in recs]))
            assert torch.allclose(anomaly_map(maps, BASELINE[1], calibration), recorded, atol=1e-5)
            masks = np.stack([r.mask for r in recs])
            labels = np.array([r.label for r in recs])
            for alpha in (*ALPHAS, 1.0, 0.0):
                anomaly = anomaly_map(maps, alpha, calibration)
                rows.append({"family": family, "category": category, "kl_scale": variant, "alpha": alpha,
                             "pixel_auroc": pixel_auroc(anomaly.numpy(), masks),
                             "pro": pro_score(anomaly.numpy(), masks, fpr_limit=0.3),
                             "image_auroc": image_auroc(image_scores(anomaly, settings).numpy(), labels)})
    return rows


def main() -> int:
    from diffad_core.config import load_config

    preset = load_config(preset="cpu").score
    assert all(getattr(preset, k) == v for k, v in faint.PRESET_SCORING.items()), "the cpu preset moved"
    assert (preset.kl_scale, preset.alpha) == BASELINE and preset.position_mean_sigma == 2.0
    t0 = time.perf_counter()
    train_s = faint.prepared_models()
    print(f"trained (s, 0 where the model was there): {train_s}", flush=True)
    df = faint.per_category(_rows)
    mixes = df[df.alpha.isin(ALPHAS)]
    means = mixes.groupby(["family", "kl_scale", "alpha"]).mean3.mean()

    candidates = [(v, a) for v in VARIANTS for a in ALPHAS if (v, a) != BASELINE]
    chosen, base_faint, base_full, lines = faint.one_step_rule(
        means, BASELINE, candidates, lambda c: f"{c[0]:>9} alpha {c[1]:.1f}")

    cols = ["pixel_auroc", "pro", "image_auroc", "mean3"]
    terms = df[df.alpha.isin((0.0, 1.0))].assign(
        term=lambda d: np.where(d.alpha == 1.0, "KL alone (" + d.kl_scale + ")", "feature alone"))
    terms = terms[(terms.alpha == 1.0) | (terms.kl_scale == BASELINE[0])]
    pick = df[(df.kl_scale == chosen[0]) & (df.alpha == chosen[1])]
    out = [
        "round fifteen (bench/tune_cpu_klscale_rule.md): round nine's models of the synthetic seed-1 "
        "family, scored on it (full) and on its faint draw (defect contrast 0.35)",
        f"scoring: {faint.PRESET_SCORING}, per-position means (sigma 2); total wall time "
        f"{time.perf_counter() - t0:.0f} s (two categories at once, one thread each)",
        f"training s per category (0: the model was there): {train_s}",
        "", "every setting, means over categories:",
        mixes.groupby(["family", "kl_scale", "alpha"])[cols].mean().round(3).to_string(),
        "", "each term alone (chooses nothing), means over categories:",
        terms.groupby(["family", "term"])[cols].mean().round(3).to_string(),
        "", f"rule (from {BASELINE[0]} alpha {BASELINE[1]}: M_faint {base_faint:.3f}, M_full {base_full:.3f}):",
        *lines, f"  -> kl_scale {chosen[0]}, alpha {chosen[1]}",
        "", "chosen per category:", pick.groupby(["family", "category"])[cols].mean().round(3).to_string(),
        "", "each term alone per category:", terms.groupby(["family", "category", "term"])[cols].mean().round(3).to_string(),
    ]
    faint.write_output("tune_cpu_klscale.txt", out)
    return 0


if __name__ == "__main__":
    sys.exit(main())
