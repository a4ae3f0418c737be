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

import sys

import tune_cpu_photo as photo  # the photo families, their models, round nineteen's rule, the retraining round

CAP = 401  # the original step of the largest scoring step (index 100 of the 250-step chain)
# candidate -> training folder per family kind
TRAININGS = {"preset": {"photo": "photo", "synth": "long"}, "tcap401": {"photo": "tcap401", "synth": "tcap401"}}
SCORING_KEYS = ("alpha", "calibrate_maps", "feature_whitening", "noise_draws", "position_mean_sigma",
                "edge_spread_width", "top_k", "image_score_sigma", "validation_fraction")


def _train(category: str) -> float:
    return photo.train_candidate(category, TRAININGS["tcap401"][photo.family_kind(category)],
                                 (f"train.max_timestep={CAP}",))


def _rows(job: tuple[str, str]) -> list[dict]:
    from diffad_core.config import load_config

    candidate, category = job
    preset = load_config("cpu").score

    def check(ev, settings) -> None:
        assert ev.cfg.train.max_timestep == (CAP if candidate == "tcap401" else None), f"{job}: not its training"
        assert all(getattr(settings, k) == getattr(preset, k) for k in SCORING_KEYS), f"{job}: not the preset's scoring"

    # The baseline models were trained before rounds nineteen and twenty-one changed the scoring.
    update = {"top_k": preset.top_k, "edge_spread_width": preset.edge_spread_width}
    return photo.candidate_rows(category, TRAININGS[candidate][photo.family_kind(category)], candidate, update, check)


def main() -> int:
    from diffad_core.config import load_config

    preset = load_config(preset="cpu")
    assert preset.train.max_timestep is None and preset.score.edge_spread_width == 4, "the cpu preset moved"
    assert preset.auto.time_budget_minutes == 30.0
    photo.retraining_round(
        _train, _rows, tuple(TRAININGS),
        f"round twenty-two (bench/tune_cpu_tcap_rule.md): train.max_timestep={CAP} (tcap401, trained afresh) "
        "against the preset (round nineteen's models, ck/photo and ck/long), both tuning families, the "
        "preset's scoring (round twenty-one's), each model with its own calibration",
        "tune_cpu_tcap.txt")
    return 0


if __name__ == "__main__":
    sys.exit(main())
