"""Round twenty-five of issue #8: half the training samples at the steps Eq. 11 reads.

The rule was fixed and committed before this script (bench/tune_cpu_scoredsteps_rule.md). Both
tuning families (the photo family with round twenty-four's blur defects, the synthetic seed-1
family) get a fresh training of the `cpu` preset with `train.scored_step_fraction=0.5`
(`$TUNE_HOME/ck/scored50`), and each model, with round twenty-two's as the baseline
(`ck/tcap401`), scores its family as painted and at 0.35 contrast with the preset's scoring and
its own calibration. Output: bench/tune_cpu_scoredsteps.txt.

    TUNE_HOME=/tmp/diffad-tune-draws .venv/bin/python bench/tune_cpu_scoredsteps.py
"""

from __future__ import annotations

import sys

import tune_cpu_photo as photo  # the photo families, their models, round nineteen's rule, the retraining round

FRACTION = 0.5
TRAININGS = {"preset": "tcap401", "scored50": "scored50"}  # candidate -> $TUNE_HOME/ck/<training>
SCORING_KEYS = ("alpha", "calibrate_maps", "feature_whitening", "noise_draws", "position_mean_sigma",
                "edge_spread_width", "top_k", "image_score_sigma", "validation_fraction", "two_sided_terms")


def _train(category: str) -> float:
    return photo.train_candidate(category, TRAININGS["scored50"], (f"train.scored_step_fraction={FRACTION}",))


def _rows(job: tuple[str, str]) -> list[dict]:
    from diffad_core.config import load_config

    candidate, category = job
    preset = load_config("cpu")

    def check(ev, settings) -> None:
        assert ev.cfg.train.max_timestep == preset.train.max_timestep, f"{job}: not the preset's cap"
        assert ev.cfg.train.scored_step_fraction == (FRACTION if candidate == "scored50" else 0.0), \
            f"{job}: not its training"
        assert all(getattr(settings, k) == getattr(preset.score, k) for k in SCORING_KEYS), \
            f"{job}: not the preset's scoring"

    # The baseline models were trained before round twenty-one changed the scoring.
    update = {"top_k": preset.score.top_k, "edge_spread_width": preset.score.edge_spread_width}
    return photo.candidate_rows(category, TRAININGS[candidate], candidate, update, check)


def main() -> int:
    from diffad_core.config import load_config

    preset = load_config(preset="cpu")
    assert preset.train.scored_step_fraction == 0.0 and preset.train.max_timestep == 401, "the cpu preset moved"
    assert preset.auto.time_budget_minutes == 30.0
    photo.retraining_round(
        _train, _rows, tuple(TRAININGS),
        f"round twenty-five (bench/tune_cpu_scoredsteps_rule.md): train.scored_step_fraction={FRACTION} "
        "(scored50, trained afresh; Eq. 11's steps are 20, 201 and 401 of the original chain) against the "
        "preset (round twenty-two's models, ck/tcap401), both tuning families (the photo family with its "
        "blur defects), the preset's scoring, each model with its own calibration",
        "tune_cpu_scoredsteps.txt")
    return 0


if __name__ == "__main__":
    sys.exit(main())
