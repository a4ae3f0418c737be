"""Round sixteen of issue #8: flips and quarter turns where a category's training images allow them.

The rule was fixed and committed before this script (bench/tune_cpu_dihedral_rule.md, with its
amendment made before any training). Round nine's models of the synthetic seed-1 family
(bench/tune_cpu_faint.py's ``feat256``: the ``none`` candidate) and the same training with
``data.augment_dihedral=auto`` (``dihedral``; trained only for the categories whose test allows
some transform, the others train the same model and reuse ``feat256``) score both families (as
painted, "full", and at 0.35 of the defects' contrast, "faint") with the ``cpu`` preset's
scoring. Output: bench/tune_cpu_dihedral.txt.

    TUNE_HOME=/tmp/diffad-tune-draws .venv/bin/python bench/tune_cpu_dihedral.py
"""

from __future__ import annotations

import json
import os
import sys
import time
from concurrent.futures import ThreadPoolExecutor

import tune_cpu_faint as faint  # beside this script: the families, their models, round nine's scoring

ALPHA = 0.1  # the cpu preset's (checked in main())
AUTO = ("data.augment_dihedral=auto",)


def _allowed(category: str) -> tuple[str, ...]:
    """What the test allows on the category's training images (held-out normals excluded), as
    the training computes it."""
    os.environ["DIFFAD_HOME"] = str(faint.HOME)
    from diffad_core.data import allowed_transforms
    from diffad_core.train import _training_splits
    from diffad_core.usecases import load_for_evaluation

    cfg = load_for_evaluation(faint.HOME / "ck" / "feat256" / category).cfg
    splits, _ = _training_splits(cfg, [category])
    return allowed_transforms(splits[0].images)


def _train(category: str, allowed: tuple[str, ...]) -> float:
    return faint._train(category, "dihedral", AUTO) if allowed else 0.0


def _rows(category: str, allowed: tuple[str, ...]) -> list[dict]:
    rows = []
    for candidate, training in (("none", "feat256"), ("auto", "dihedral" if allowed else "feat256")):
        if training == "dihedral":  # the model records what its training applied
            meta = json.loads((faint.HOME / "ck" / training / category / "meta.json").read_text())
            assert meta["dihedral_transforms"] == {category: list(allowed)}, meta["dihedral_transforms"]
        settings, _, records = faint.scored_families(category, ALPHA, training=training)
        assert settings.alpha == ALPHA and settings.position_mean_sigma == 2.0
        rows += [{"family": family, "category": category, "candidate": candidate, **faint.record_metrics(recs)}
                 for family, recs in records.items()]
    return rows


def main() -> int:
    from diffad_core.config import load_config

    preset = load_config(preset="cpu")
    assert preset.data.augment_dihedral == "none" and preset.score.alpha == ALPHA, "the cpu preset moved"
    assert all(getattr(preset.score, k) == v for k, v in faint.PRESET_SCORING.items())
    t0 = time.perf_counter()
    faint_train_s = faint.prepared_models()
    allowed = {c: _allowed(c) for c in faint.CATEGORIES}
    print(f"allowed: {allowed}", flush=True)
    with ThreadPoolExecutor(max_workers=2) as pool:
        train_s = dict(zip(faint.CATEGORIES, pool.map(_train, faint.CATEGORIES, allowed.values())))
    print(f"trained (s, 0 where the model was there or nothing is allowed): {train_s}", flush=True)
    df = faint.per_category(_rows, allowed.values())
    means = df.groupby(["family", "candidate"]).mean3.mean()
    chosen, base_faint, base_full, lines = faint.one_step_rule(means, "none", ["auto"], str)

    cols = ["pixel_auroc", "pro", "image_auroc", "mean3"]
    out = [
        "round sixteen (bench/tune_cpu_dihedral_rule.md): round nine's models of the synthetic seed-1 "
        "family (none) and the same training with data.augment_dihedral=auto, scored on it (full) "
        "and on its faint draw (defect contrast 0.35), the cpu preset's scoring (alpha 0.1)",
        f"total wall time {time.perf_counter() - t0:.0f} s (two categories at once, one thread each); "
        f"training s of the none models (0: there): {faint_train_s}; of the auto models: {train_s}",
        "", "transforms the test allows per category (training images, held-out normals excluded):",
        *[f"  {c}: {', '.join(names) or 'none'}" for c, names in allowed.items()],
        "", "means over categories:", df.groupby(["family", "candidate"])[cols].mean().round(3).to_string(),
        "", f"rule (from none: M_faint {base_faint:.3f}, M_full {base_full:.3f}):",
        *lines, f"  -> {chosen}",
        "", "per category:", df.groupby(["family", "category", "candidate"])[cols].mean().round(3).to_string(),
    ]
    faint.write_output("tune_cpu_dihedral.txt", out)
    return 0


if __name__ == "__main__":
    sys.exit(main())
