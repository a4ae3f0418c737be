"""Round twenty of issue #8: twice the held-out normals for the calibration.

The rule was fixed and committed before this script (bench/tune_cpu_holdout_rule.md). Both tuning
families (the photo family of round nineteen, the synthetic seed-1 family) get a fresh training
of the `cpu` preset with `score.validation_fraction=0.2` (`$TUNE_HOME/ck/holdout20`), and each
model, with round nineteen's as the baseline (`ck/photo`, `ck/long`), scores its family as
painted and at 0.35 contrast with the preset's scoring (top-64 image score) and its own
calibration. Output: bench/tune_cpu_holdout.txt.

    TUNE_HOME=/tmp/diffad-tune-draws .venv/bin/python bench/tune_cpu_holdout.py
"""

from __future__ import annotations

import sys

import tune_cpu_photo as photo  # the photo families, their models, the retraining round

FRACTION = 0.2
TOP_K = 64  # the preset's image score since round nineteen (checked in main())
# candidate -> training folder per family kind
TRAININGS = {"preset": {"photo": "photo", "synth": "long"}, "holdout20": {"photo": "holdout20", "synth": "holdout20"}}


def _train(category: str) -> float:
    return photo.train_candidate(category, TRAININGS["holdout20"][photo.family_kind(category)],
                                 (f"score.validation_fraction={FRACTION}",))


def _rows(job: tuple[str, str]) -> list[dict]:
    from diffad_core.config import load_config

    candidate, category = job
    preset = load_config("cpu").score
    scoring_keys = ("alpha", "calibrate_maps", "feature_whitening", "noise_draws", "position_mean_sigma",
                    "top_k", "image_score_sigma")

    def check(ev, settings) -> None:
        assert all(getattr(settings, k) == getattr(preset, k) for k in scoring_keys), f"{job}: not the preset's scoring"
        fraction = settings.validation_fraction
        assert fraction == (FRACTION if candidate == "holdout20" else 0.1), f"{job}: validation_fraction {fraction}"

    return photo.candidate_rows(category, TRAININGS[candidate][photo.family_kind(category)], candidate,
                                {"top_k": TOP_K}, check)


def main() -> int:
    from diffad_core.config import load_config

    preset = load_config(preset="cpu")
    assert preset.score.top_k == TOP_K and preset.score.validation_fraction == 0.1, "the cpu preset moved"
    assert preset.auto.time_budget_minutes == 30.0
    photo.retraining_round(
        _train, _rows, tuple(TRAININGS),
        "round twenty (bench/tune_cpu_holdout_rule.md): score.validation_fraction=0.2 (holdout20, trained "
        "afresh) against the preset (round nineteen's models, ck/photo and ck/long), both tuning families, "
        "the preset's scoring (top-64 image score), each model with its own calibration",
        "tune_cpu_holdout.txt", ("n_held_out", "steps", "train_s", "score_s"))
    return 0


if __name__ == "__main__":
    sys.exit(main())
