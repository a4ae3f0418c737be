"""Held-out normals: the map calibration and "Ours*" use the held-out train/good images only."""

from __future__ import annotations

import json

import numpy as np
import pytest

import diffad_core.validation as validation
from diffad_core.data import split_train_validation
from tests.test_score import _prepared, _smoke_model

pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture()
def train_only(monkeypatch: pytest.MonkeyPatch) -> list[str]:
    """prepare_split that serves a fake train split and fails on any other split."""
    train_split = _prepared(10)
    train_split.labels = np.zeros(10, dtype=np.int64)
    seen: list[str] = []

    def fake_prepare_split(cfg, category, split):  # noqa: ANN001, ANN202
        seen.append(split)
        if split != "train":
            raise AssertionError(f"validation read the {split!r} split")
        return train_split

    monkeypatch.setattr(validation, "prepare_split", fake_prepare_split)
    return seen


def _held_out_model(**overrides: object):
    m = _smoke_model(**overrides)
    _, val_idx = split_train_validation(10, m.cfg.score.validation_fraction, m.cfg.seed)
    m.held_out = lambda category: [int(i) for i in val_idx]
    return m, val_idx


def test_choose_alpha_never_reads_the_test_split(train_only: list[str]) -> None:
    m, val_idx = _held_out_model(**{"score.alpha_grid": "[0.0, 0.5, 1.0]", "score.validation_fraction": 0.3})
    choice = validation.choose_alpha(m, m.cfg, "weave")
    assert train_only == ["train"]
    assert choice.alpha in (0.0, 0.5, 1.0)
    assert set(choice.validation_pro) == {0.0, 0.5, 1.0}
    assert choice.validation_pro[choice.alpha] == max(choice.validation_pro.values())
    assert choice.n_validation_images == 2 * len(val_idx)
    assert "held-out train/good" in choice.source


def test_calibration_is_the_statistics_of_the_held_out_maps(train_only: list[str]) -> None:
    m, val_idx = _held_out_model(**{"score.validation_fraction": 0.3})
    cal = validation.calibrate(m, m.cfg, "weave")
    assert train_only == ["train"] and cal.n_images == len(val_idx) == 3
    maps = validation._maps_of(m, m.cfg, "weave", _prepared(10).images[val_idx])
    assert cal.kl_mean == pytest.approx(float(maps.kl.mean()))
    assert cal.feature_std == pytest.approx(float(maps.feature.std()))
    assert cal.kl_std > 0 and cal.feature_std > 0


def test_no_held_out_images_is_a_clear_error(train_only: list[str]) -> None:
    m = _smoke_model()
    m.held_out = lambda category: []
    with pytest.raises(validation.ValidationError, match="without held-out normal images"):
        validation.calibrate(m, m.cfg, "weave")


def test_scoring_fit_is_recorded_with_the_model_and_reused_without_data(
        train_only: list[str], tmp_path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Issue #8: the calibration and the "Ours*" alpha are recorded in the checkpoint folder, so
    scoring new images later needs no training data; other settings get their own record."""
    m, _ = _held_out_model(**{"score.validation_fraction": 0.3, "score.calibrate_maps": True,
                              "score.alpha_per_category": True, "score.alpha_grid": "[0.0, 0.5, 1.0]"})
    m.folder = tmp_path
    assert validation.recorded_scoring_fit(m, m.cfg, "weave") is None
    fit = validation.fit_scoring(m, m.cfg, "weave")
    assert fit.calibration is not None and fit.alpha_choice is not None
    (record,) = (tmp_path / "scoring").glob("weave-*.json")

    monkeypatch.setattr(validation, "prepare_split", lambda *a: pytest.fail("read the data"))
    again = validation.recorded_scoring_fit(m, m.cfg, "weave")
    assert again == fit
    other = m.cfg.with_changes({"score": {"alpha_grid": [0.25, 0.75]}})
    assert validation.recorded_scoring_fit(m, other, "weave") is None
    assert validation.recorded_scoring_fit(m, m.cfg, "other") is None

    record.write_text("{not json")
    with pytest.raises(validation.ValidationError, match=str(record)):
        validation.recorded_scoring_fit(m, m.cfg, "weave")


def test_no_scoring_fit_is_needed_without_calibration_or_ours_star(train_only: list[str]) -> None:
    m = _smoke_model(**{"score.calibrate_maps": False, "score.alpha_per_category": False})
    assert validation.recorded_scoring_fit(m, m.cfg, "weave") == validation.ScoringFit()
    assert train_only == []


def test_predict_uses_the_recorded_ours_star_alpha(tmp_path, monkeypatch: pytest.MonkeyPatch) -> None:
    """``diffad predict`` and the MLflow model score with the alpha "Ours*" chose for the
    category (as the benchmark does), unless told otherwise."""
    import io

    from PIL import Image

    from diffad_core.usecases import EvaluationModel, predict_images

    m, _ = _held_out_model(**{"score.validation_fraction": 0.3, "score.alpha_per_category": True,
                              "score.calibrate_maps": False})
    m.folder = tmp_path
    choice = validation.AlphaChoice(alpha=0.125, grid=[0.125, 0.5], validation_pro={0.125: 0.9, 0.5: 0.1})
    path = validation._scoring_fit_path(tmp_path, m.cfg, "weave")
    path.parent.mkdir(parents=True)
    path.write_text(json.dumps(validation.ScoringFit(alpha_choice=choice).to_dict()))
    monkeypatch.setattr(validation, "prepare_split", lambda *a: pytest.fail("refitted"))
    buf = io.BytesIO()
    Image.fromarray(np.full((20, 20, 3), 128, dtype=np.uint8)).save(buf, format="PNG")
    ev = EvaluationModel(model=m, cfg=m.cfg, checkpoint=tmp_path)
    assert predict_images(ev, "weave", [buf.getvalue()]).alpha == 0.125
    assert predict_images(ev, "weave", [buf.getvalue()], alpha=0.75).alpha == 0.75
