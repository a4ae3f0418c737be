"""Round nineteen of issue #8: the photo tuning family, and the scoring re-chosen on it.

The rule was fixed and committed before this script (bench/tune_cpu_photo_rule.md). The photo
family (`diffad data synth` with the categories moon, tissue, cameraman, retina: other bundled
photographs, our own painters; seed 1, 256 px, 60 train, 24 good and 8 per defect kind in test)
is drawn as painted ("photo-full") and at 0.35 of its defects' contrast ("photo-faint"), and the
`cpu` preset is trained on it (`$TUNE_HOME/ck/photo`). The synthetic seed-1 family's models are
round eighteen's `long` ones (the preset's training). Each test image is scored once with the
preset's scoring; the candidates of the three steps only mix and read its two maps differently
(step 3 with its own calibrations, whose whitening is checked to be the preset's). Output:
bench/tune_cpu_photo.txt.

    TUNE_HOME=/tmp/diffad-tune-draws .venv/bin/python bench/tune_cpu_photo.py
"""

from __future__ import annotations

import os
import sys
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor

import numpy as np
import pandas as pd
import torch

import tune_cpu_faint as faint  # beside this script: the synthetic families, training, metrics

HOME = faint.HOME
PHOTO_CATEGORIES = ("moon", "tissue", "cameraman", "retina")
PHOTO_FAMILIES = {"photo-full": HOME / "photo-seed1", "photo-faint": HOME / "photo-seed1-faint"}
TRAINING = {"photo": "photo", "synth": "long"}  # $TUNE_HOME/ck/<training> per family kind
PRESET = {"alpha": 0.1, "top_k": 4, "sigma": 0.0, "position": 2.0}  # checked in main()
ALPHAS = (0.2, 0.3, 0.5)
TOP_KS, BLURS = (4, 16, 64), (0.0, 2.0, 4.0)
POSITIONS = (0.0, 4.0, None)  # score.position_mean_sigma; None: one mean per term


def _generate_photo() -> None:
    faint.generate_pair(PHOTO_FAMILIES["photo-full"], PHOTO_FAMILIES["photo-faint"],
                        ["--seed", "1", "--size", "256", "--n-train", "60", "--n-test-good", "24",
                         "--n-test-per-defect", "8", *[x for c in PHOTO_CATEGORIES for x in ("--category", c)]],
                        PHOTO_CATEGORIES)


def family_kind(category: str) -> str:
    """"photo" for a photo tuning category, "synth" for a synthetic one."""
    return "photo" if category in PHOTO_CATEGORIES else "synth"


def train_candidate(category: str, training: str, extra: tuple[str, ...] = ()) -> float:
    """The `cpu` preset trained on the category's tuning family (its full draw) with the
    30-minute budget and the ``--set`` overrides ``extra``, into `$TUNE_HOME/ck/<training>`
    unless it is there: the seconds it took (``tune_cpu_faint._train``)."""
    extra = ("auto.time_budget_minutes=30", *extra)
    if family_kind(category) == "photo":
        extra = (f"data.root={PHOTO_FAMILIES['photo-full']}", *extra)
    return faint._train(category, training, extra)


def _train_photo(category: str) -> float:
    return train_candidate(category, TRAINING["photo"])


def candidate_rows(category: str, training: str, candidate: str, settings_update: dict,
                   check: Callable[[object, object], None]) -> list[dict]:
    """One model (`$TUNE_HOME/ck/<training>`) with its score settings updated by
    ``settings_update`` and checked by ``check(evaluation, settings)``, calibrated on its own
    held-out normals, scores its family's two draws once: one row of metrics per draw."""
    from diffad_core.data import prepare_split
    from diffad_core.score import score_split
    from diffad_core.usecases import load_for_evaluation
    from diffad_core.validation import calibrate

    os.environ["DIFFAD_HOME"] = str(HOME)
    torch.set_num_threads(1)
    ev = load_for_evaluation(HOME / "ck" / training / category)
    settings = ev.cfg.score.model_copy(update=settings_update)
    check(ev, settings)
    cfg = ev.cfg.model_copy(update={"score": settings})
    start = time.perf_counter()
    calibration = calibrate(ev.model, cfg, category)
    families = PHOTO_FAMILIES if family_kind(category) == "photo" else {f"synth-{k}": v for k, v in faint.FAMILIES.items()}
    logged = faint.logged_training(training, category)
    rows = []
    for family, root in families.items():
        prepared = prepare_split(cfg.with_changes({"data": {"root": str(root)}}), category, "test")
        records = list(score_split(ev.model, prepared, settings, alpha=settings.alpha, calibration=calibration,
                                   seed=cfg.seed, progress=False))
        rows.append({"family": family, "category": category, "candidate": candidate,
                     **faint.record_metrics(records), "n_held_out": calibration.n_images,
                     "steps": logged["steps"], "train_s": logged["seconds"]})
    for row in rows:
        row["score_s"] = time.perf_counter() - start
    return rows


def trained_and_scored(train: Callable[[str], float], rows: Callable[[tuple[str, str]], list[dict]],
                       candidates: tuple[str, ...]) -> tuple[dict[str, float], pd.DataFrame]:
    """A retraining round on both tuning families: both generated, ``train(category)`` for every
    category, then ``rows((candidate, category))`` for every pair, two jobs at a time: (training
    seconds per category, the rows as one frame with ``mean3``)."""
    categories = (*PHOTO_CATEGORIES, *faint.CATEGORIES)
    t0 = time.perf_counter()
    _generate_photo()
    faint._generate()
    with ThreadPoolExecutor(max_workers=2) as pool:
        train_s = dict(zip(categories, pool.map(train, categories)))
    print(f"trained ({time.perf_counter() - t0:.0f} s): {train_s}", flush=True)
    jobs = [(c, category) for c in candidates for category in categories]
    with ThreadPoolExecutor(max_workers=2) as pool:
        df = pd.DataFrame([r for part in pool.map(rows, jobs) for r in part])
    df["mean3"] = (df.pixel_auroc + df.pro + df.image_auroc) / 3
    return train_s, df


def retraining_round(train: Callable[[str], float], rows: Callable[[tuple[str, str]], list[dict]],
                     candidates: tuple[str, ...], header: str, output: str,
                     extra_columns: tuple[str, ...] = ("steps", "train_s", "score_s")) -> None:
    """A retraining round of one candidate against "preset" (``candidates``, both in
    :func:`trained_and_scored`'s order): trained and scored, judged by :func:`rule_step`, and
    written to ``bench/<output>`` under ``header``; ``extra_columns`` beside the metrics' means."""
    (candidate,) = [c for c in candidates if c != "preset"]
    t0 = time.perf_counter()
    train_s, df = trained_and_scored(train, rows, candidates)
    means = df.groupby(["family", "candidate"]).mean3.mean()
    chosen, lines = rule_step(means, ("preset",), [(candidate,)], lambda c: c[0])
    cols = ["pixel_auroc", "pro", "image_auroc", "mean3"]
    faint.write_output(output, [
        header,
        f"total wall time {time.perf_counter() - t0:.0f} s (two jobs at once, one thread each); {candidate} "
        f"training s per category in this run (0: the model was there): {train_s}",
        "", "means over categories (train_s: from each training's own log):",
        df.groupby(["family", "candidate"])[cols + list(extra_columns)].mean().round(3).to_string(),
        "", "rule (baseline: the preset):", *lines, f"  -> {chosen[0]}",
        "", "per category:",
        df.groupby(["family", "category", "candidate"])[cols].mean().round(3).to_string(),
    ])


def _scored(category: str):
    """One model scores its family's two test splits once with the preset's scoring; the
    calibrations of step 3's candidates from the same held-out normals."""
    from diffad_core.data import prepare_split
    from diffad_core.score import score_split
    from diffad_core.usecases import load_for_evaluation
    from diffad_core.validation import calibrate

    os.environ["DIFFAD_HOME"] = str(HOME)
    torch.set_num_threads(1)
    photo = category in PHOTO_CATEGORIES
    families = PHOTO_FAMILIES if photo else {f"synth-{k}": v for k, v in faint.FAMILIES.items()}
    ev = load_for_evaluation(HOME / "ck" / TRAINING["photo" if photo else "synth"] / category)
    cfg, settings = ev.cfg, ev.cfg.score
    assert (settings.alpha, settings.top_k or 4, settings.image_score_sigma,
            settings.position_mean_sigma) == tuple(PRESET.values()), f"{category}: not the preset's scoring"
    calibrations = {PRESET["position"]: calibrate(ev.model, cfg, category)}
    for sigma in POSITIONS:
        variant = cfg.model_copy(update={"score": settings.model_copy(update={"position_mean_sigma": sigma})})
        calibrations[sigma] = calibrate(ev.model, variant, category)
        assert calibrations[sigma].whitening == calibrations[PRESET["position"]].whitening
    records = {}
    for family, root in families.items():
        prepared = prepare_split(cfg.with_changes({"data": {"root": str(root)}}), category, "test")
        records[family] = list(score_split(ev.model, prepared, settings, alpha=settings.alpha,
                                           calibration=calibrations[PRESET["position"]], seed=cfg.seed,
                                           progress=False))
    return settings, calibrations, records


def _position_label(sigma: float | None) -> str:
    return "none" if sigma is None else f"{sigma:g}"


def _pixel_metrics(anomaly: torch.Tensor, masks: np.ndarray) -> dict:
    from diffad_core.metrics import pixel_auroc, pro_score

    return {"pixel_auroc": pixel_auroc(anomaly.numpy(), masks),
            "pro": pro_score(anomaly.numpy(), masks, fpr_limit=0.3)}


def _rows(category: str) -> list[dict]:
    """Every candidate's metrics on both of the category's families: pixel AUROC and PRO per
    (alpha, per-position means), image AUROC per (alpha, means, top-k, blur)."""
    from diffad_core.metrics import image_auroc
    from diffad_core.score import ComponentMaps, anomaly_map, image_scores

    start = time.perf_counter()
    settings, calibrations, records = _scored(category)
    rows = []
    for family, recs in records.items():
        maps = ComponentMaps(kl=torch.from_numpy(np.stack([r.kl_map for r in recs])),
                             feature=torch.from_numpy(np.stack([r.feature_map for r in recs])))
        masks, labels = np.stack([r.mask for r in recs]), np.array([r.label for r in recs])
        kinds = np.array([r.defect_type for r in recs])
        preset_map = anomaly_map(maps, PRESET["alpha"], calibrations[PRESET["position"]])
        assert np.allclose(preset_map.numpy(), np.stack([r.anomaly_map for r in recs]), atol=1e-5)
        for alpha in (PRESET["alpha"], *ALPHAS):
            for position, calibration in calibrations.items():
                anomaly = anomaly_map(maps, alpha, calibration)
                pixel = _pixel_metrics(anomaly, masks)
                for k in TOP_KS:
                    for blur in BLURS:
                        read = settings.model_copy(update={"top_k": k, "image_score_sigma": blur})
                        scores = image_scores(anomaly, read).numpy()
                        row = {"family": family, "category": category, "scorer": "ensemble",
                               "alpha": alpha, "top_k": k, "sigma": blur,
                               "position": _position_label(position)}
                        rows.append({**row, **pixel, "image_auroc": image_auroc(scores, labels)})
                        if (alpha, k, blur, position) != tuple(PRESET.values()):
                            continue
                        for kind in sorted(set(kinds) - {"good"}):  # the preset per defect kind
                            keep = (kinds == kind) | (kinds == "good")
                            rows.append({**row, "scorer": f"ensemble:{kind}",
                                         **_pixel_metrics(anomaly[keep], masks[keep]),
                                         "image_auroc": image_auroc(scores[keep], labels[keep])})
        preset_calibration = calibrations[PRESET["position"]]
        terms = {"kl only": anomaly_map(maps, 1.0, preset_calibration),
                 "feature only": anomaly_map(maps, 0.0, preset_calibration),
                 "padim 64 px": torch.from_numpy(np.stack([r.ablation_maps["padim"] for r in recs]))}
        for scorer, anomaly in terms.items():
            rows.append({"family": family, "category": category, "scorer": scorer, "alpha": np.nan,
                         "top_k": 4, "sigma": 0.0, "position": _position_label(PRESET["position"]),
                         **_pixel_metrics(anomaly, masks),
                         "image_auroc": image_auroc(image_scores(anomaly, settings).numpy(), labels)})
    for row in rows:
        row["eval_s"] = time.perf_counter() - start
    return rows


def rule_step(means: pd.Series, current: tuple, candidates: list[tuple], label) -> tuple[tuple, list[str]]:
    """The rule: M_photo_faint above the baseline's by more than 0.005, M_photo_full and both
    synthetic measures not more than 0.005 below; the qualifying one with the best M_photo_faint."""
    def value(family: str, setting: tuple) -> float:
        return float(means[(family, *setting)])

    families = ("photo-faint", "photo-full", "synth-faint", "synth-full")
    base = {f: value(f, current) for f in families}
    lines, qualifying = [], []
    for cand in candidates:
        got = {f: value(f, cand) for f in families}
        ok = (got["photo-faint"] > base["photo-faint"] + 0.005
              and all(got[f] >= base[f] - 0.005 for f in families[1:]))
        lines.append(f"  {label(cand)}: " + "  ".join(f"{f} {got[f]:.3f}" for f in families)
                     + ("  qualifies" if ok else ""))
        if ok:
            qualifying.append((got["photo-faint"], cand))
    chosen = max(qualifying, key=lambda fc: fc[0])[1] if qualifying else current
    return chosen, ["  baseline: " + "  ".join(f"{f} {base[f]:.3f}" for f in families), *lines]


def named_rule_step(means: pd.Series, candidates: list[str], prefer: Callable[[list[str]], str]) -> tuple[str, list[str]]:
    """:func:`rule_step` for candidates named by one string against "preset": of the qualifying
    ones within 0.002 of the best M_photo_faint, the one ``prefer`` picks, else "preset"; and
    the rule's lines."""
    _, lines = rule_step(means, ("preset",), [(c,) for c in candidates], lambda c: c[0])
    # rule_step with one candidate returns it exactly when it qualifies.
    qualifying = [c for c in candidates if rule_step(means, ("preset",), [(c,)], lambda c: c[0])[0] == (c,)]
    if not qualifying:
        return "preset", lines
    best = max(means[("photo-faint", c)] for c in qualifying)
    return prefer([c for c in qualifying if means[("photo-faint", c)] >= best - 0.002]), lines


def _label(setting: tuple) -> str:
    alpha, k, blur, position = setting
    return f"alpha {alpha:.1f}  top_k {k:>2}  blur {blur:.0f}  position_mean_sigma {position}"


def main() -> int:
    from diffad_core.config import load_config

    preset = load_config(preset="cpu")
    s = preset.score
    assert (s.alpha, s.top_k or 4, s.image_score_sigma, s.position_mean_sigma) == tuple(PRESET.values())
    assert preset.auto.time_budget_minutes == 30.0, "the cpu preset moved"
    t0 = time.perf_counter()
    _generate_photo()
    with ThreadPoolExecutor(max_workers=2) as pool:
        train_s = dict(zip(PHOTO_CATEGORIES, pool.map(_train_photo, PHOTO_CATEGORIES)))
    print(f"trained (s, 0 where the model was there): {train_s}", flush=True)
    categories = (*PHOTO_CATEGORIES, *faint.CATEGORIES)
    with ThreadPoolExecutor(max_workers=2) as pool:
        df = pd.DataFrame([r for part in pool.map(_rows, categories) for r in part])
    df["mean3"] = (df.pixel_auroc + df.pro + df.image_auroc) / 3
    keys = ["family", "alpha", "top_k", "sigma", "position"]
    ens = df[df.scorer == "ensemble"]
    means = ens.groupby(keys).mean3.mean()

    preset_setting = (PRESET["alpha"], PRESET["top_k"], PRESET["sigma"], _position_label(PRESET["position"]))
    step1, lines1 = rule_step(means, preset_setting, [(a, *preset_setting[1:]) for a in ALPHAS], _label)
    c2 = [(step1[0], k, b, step1[3]) for k in TOP_KS for b in BLURS if (k, b) != step1[1:3]]
    step2, lines2 = rule_step(means, step1, c2, _label)
    c3 = [(*step2[:3], _position_label(p)) for p in POSITIONS]
    chosen, lines3 = rule_step(means, step2, c3, _label)

    cols = ["pixel_auroc", "pro", "image_auroc", "mean3"]
    def at(setting: tuple, frame: pd.DataFrame) -> pd.DataFrame:
        alpha, k, blur, position = setting
        return frame[(frame.top_k == k) & (frame.sigma == blur) & (frame.position == position)
                     & ((frame.alpha == alpha) | frame.alpha.isna())]

    preset_rows = at(preset_setting, df)
    per_kind = preset_rows.scorer.str.startswith("ensemble:")
    out = [
        "round nineteen (bench/tune_cpu_photo_rule.md): the cpu preset trained on the photo tuning "
        "family (moon, tissue, cameraman, retina; ck/photo) and on the synthetic seed-1 family "
        "(round eighteen's ck/long), each scored on its family as painted and at 0.35 contrast",
        f"total wall time {time.perf_counter() - t0:.0f} s (two jobs at once, one thread each); photo "
        f"training s per category (0: the model was there): {train_s}",
        "", "the preset's scoring, each of its terms and the preset's 64 px PaDiM, means over categories:",
        preset_rows[~per_kind].groupby(["family", "scorer"])[cols].mean().round(3).to_string(),
        "", "step 1, alpha:", *lines1, f"  -> {_label(step1)}",
        "", "step 2, the image score:", *lines2, f"  -> {_label(step2)}",
        "", "step 3, the per-position means:", *lines3, f"  -> {_label(chosen)}",
        "", f"chosen: {_label(chosen)}" + ("  (the preset as it stands)" if chosen == preset_setting else ""),
        "", "the preset's scoring per category:",
        preset_rows[preset_rows.scorer == "ensemble"].groupby(["family", "category"])[cols].mean()
        .round(3).to_string(),
        "", "the preset's scoring per defect kind (each kind with all normal test images of its category):",
        preset_rows[per_kind].groupby(["family", "category", "scorer"])[cols].mean().round(3).to_string(),
        "", "the chosen scoring per category:",
        at(chosen, ens).groupby(["family", "category"])[cols].mean().round(3).to_string(),
        "", "every candidate, means over categories:",
        ens.groupby(keys)[cols].mean().round(3).to_string(),
    ]
    faint.write_output("tune_cpu_photo.txt", out)
    return 0


if __name__ == "__main__":
    sys.exit(main())
