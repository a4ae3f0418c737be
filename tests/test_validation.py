"""Held-out normals: the map calibration and "Ours*" use the held-out train/good images only."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from PIL import Image

import diffad_core.validation as validation
from diffad_core.config import load_config
from diffad_core.data import PreparedSplit, split_train_validation
from diffad_core.data.io import load_image, load_mask
from diffad_core.data.synth.defects import paint_defects
from diffad_core.overlay import to_uint8_image
from diffad_core.score import ComponentMaps, MapCalibration, anomaly_map, fit_feature_whitening
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


def test_calibration_fits_the_whitening_and_standardises_the_whitened_map(train_only: list[str]) -> None:
    """score.feature_whitening: the residual's weights come from the held-out normals, and the
    feature statistics are those of the weighted term on the same images."""
    m, val_idx = _held_out_model(**{"score.validation_fraction": 0.3, "score.calibrate_maps": True,
                                    "score.feature_whitening": "full"})
    cal = validation.calibrate(m, m.cfg, "weave")
    n_t, c = len(m.cfg.diffusion.score_timesteps), m.feature_target.channels
    assert cal.whitening is not None and tuple(cal.whitening.precision.shape) == (n_t, c, c)
    images = _prepared(10).images[val_idx]
    maps = validation._maps_of(m, m.cfg, "weave", images, with_residual=True)
    assert cal.whitening == fit_feature_whitening(maps.feature_residual, "full")
    whitened = validation._maps_of(m, m.cfg, "weave", images, whitening=cal.whitening).feature
    assert cal.feature_mean == pytest.approx(float(whitened.mean()), rel=1e-5)
    assert cal.feature_std == pytest.approx(float(whitened.std()), rel=1e-5)
    assert cal.feature_mean != pytest.approx(float(maps.feature.mean()), rel=0.01)
    plain = validation.calibrate(m, m.cfg.with_changes({"score": {"feature_whitening": "none"}}), "weave")
    assert plain.whitening is None and plain.kl_mean == cal.kl_mean


def test_calibration_per_position_subtracts_the_normals_mean_at_each_pixel(train_only: list[str], tmp_path) -> None:
    """score.position_mean_sigma: each term's mean over the held-out normals per position (0:
    as it is; > 0: blurred), the std that of the term less it; recorded and read back."""
    m, val_idx = _held_out_model(**{"score.validation_fraction": 0.3, "score.calibrate_maps": True,
                                    "score.position_mean_sigma": 0})
    cal = validation.calibrate(m, m.cfg, "weave")
    maps = validation._maps_of(m, m.cfg, "weave", _prepared(10).images[val_idx])
    means = cal.position_means
    assert means is not None and tuple(means.kl.shape) == tuple(maps.kl.shape[-2:]) == (32, 32)
    torch.testing.assert_close(means.kl, maps.kl.double().mean(dim=0).float())
    torch.testing.assert_close(means.feature, maps.feature.double().mean(dim=0).float())
    assert cal.kl_std == pytest.approx(float((maps.kl - means.kl).std()), rel=1e-5)
    assert cal.feature_std == pytest.approx(float((maps.feature - means.feature).std()), rel=1e-5)
    calibrated = anomaly_map(maps, 1.0, cal)  # the KL term alone: zero mean at every pixel
    assert float(calibrated.mean(dim=0).abs().max()) < 1e-4
    plain = validation.calibrate(m, m.cfg.with_changes({"score": {"position_mean_sigma": None}}), "weave")
    assert plain.position_means is None and plain.kl_mean == pytest.approx(cal.kl_mean)
    assert float((anomaly_map(maps, 1.0, plain).mean(dim=0)).abs().max()) > 1e-2

    smooth_cfg = m.cfg.with_changes({"score": {"position_mean_sigma": 2.0}})
    smooth = validation.calibrate(m, smooth_cfg, "weave").position_means
    assert float(smooth.kl.std()) < float(means.kl.std())  # blurred: flatter
    assert float(smooth.kl.mean()) == pytest.approx(float(means.kl.mean()), abs=0.05 * cal.kl_std)
    m.folder = tmp_path
    fit = validation.fit_scoring(m, smooth_cfg, "weave")
    again = validation.recorded_scoring_fit(m, smooth_cfg, "weave")
    assert again == fit and again.calibration.position_means == fit.calibration.position_means
    assert validation.recorded_scoring_fit(m, m.cfg, "weave") is None  # sigma 0: another fit
    with pytest.raises(ValueError, match=r"per-position means are \(32, 32\), the maps \(16, 16\)"):
        anomaly_map(ComponentMaps(kl=maps.kl[:, :16, :16], feature=maps.feature[:, :16, :16]), 0.5, cal)


def test_edge_spreads_are_the_normals_std_per_distance_from_the_edge(train_only: list[str], tmp_path) -> None:
    """score.edge_spread_width: each centred term divided by its std over the held-out normals
    at each distance from the map's nearest edge inside the width (scaled from 64 px to the
    32 px maps here: 4 -> 2 rings), by one std further in; recorded and read back."""
    m, val_idx = _held_out_model(**{"score.validation_fraction": 0.3, "score.calibrate_maps": True,
                                    "score.position_mean_sigma": 0, "score.edge_spread_width": 4})
    cal = validation.calibrate(m, m.cfg, "weave")
    maps = validation._maps_of(m, m.cfg, "weave", _prepared(10).images[val_idx])
    centred = maps.kl - cal.position_means.kl
    spreads = cal.position_spreads
    assert spreads is not None and tuple(spreads.kl.shape) == (32, 32)
    outer = torch.cat([centred[:, [0, -1], :].reshape(3, -1), centred[:, 1:-1, [0, -1]].reshape(3, -1)], dim=1)
    ring1 = torch.cat([centred[:, [1, -2], 1:-1].reshape(3, -1), centred[:, 2:-2, [1, -2]].reshape(3, -1)], dim=1)
    inside = centred[:, 2:-2, 2:-2]
    assert float(spreads.kl[0, 5]) == pytest.approx(float(outer.std()), rel=1e-5)
    assert float(spreads.kl[-1, -1]) == pytest.approx(float(outer.std()), rel=1e-5)
    assert float(spreads.kl[1, 7]) == pytest.approx(float(ring1.std()), rel=1e-5)
    assert float(spreads.kl[2, 2]) == pytest.approx(float(inside.std()), rel=1e-5)
    assert torch.equal(spreads.kl[2:-2, 2:-2], torch.full((28, 28), float(spreads.kl[16, 16])))
    assert float(spreads.kl[0, 0]) != pytest.approx(float(spreads.kl[16, 16]))
    # The KL term alone: the normals' own maps have unit spread on every ring.
    calibrated = anomaly_map(maps, 1.0, cal)
    assert float(calibrated[:, [0, -1], :].std()) == pytest.approx(1.0, abs=0.02)
    assert float(calibrated[:, 2:-2, 2:-2].std()) == pytest.approx(1.0, abs=0.02)
    # The means and the one std per term are as without the option.
    plain = validation.calibrate(m, m.cfg.with_changes({"score": {"edge_spread_width": None}}), "weave")
    assert plain.position_spreads is None and plain.position_means == cal.position_means
    assert plain.kl_std == pytest.approx(cal.kl_std)
    m.folder = tmp_path
    fit = validation.fit_scoring(m, m.cfg, "weave")
    again = validation.recorded_scoring_fit(m, m.cfg, "weave")
    assert again == fit and again.calibration.position_spreads == spreads
    wider = m.cfg.with_changes({"score": {"edge_spread_width": 8}})
    assert validation.recorded_scoring_fit(m, wider, "weave") is None  # another fit
    with pytest.raises(ValueError, match=r"per-position spreads are \(32, 32\), the maps \(16, 16\)"):
        anomaly_map(ComponentMaps(kl=maps.kl[:, :16, :16], feature=maps.feature[:, :16, :16]), 0.5,
                    MapCalibration(kl_mean=0, kl_std=1, feature_mean=0, feature_std=1, position_spreads=spreads))


def test_recorded_scoring_fit_keeps_the_whitening(train_only: list[str], tmp_path) -> None:
    m, _ = _held_out_model(**{"score.validation_fraction": 0.3, "score.calibrate_maps": True,
                              "score.feature_whitening": "diagonal"})
    m.folder = tmp_path
    fit = validation.fit_scoring(m, m.cfg, "weave")
    again = validation.recorded_scoring_fit(m, m.cfg, "weave")
    assert again == fit and again.calibration.whitening.kind == "diagonal"
    other = m.cfg.with_changes({"score": {"feature_whitening": "full"}})
    assert validation.recorded_scoring_fit(m, other, "weave") is None


def test_ours_star_paints_at_the_target_size_and_derives_the_image_as_from_a_file(
        monkeypatch: pytest.MonkeyPatch, tmp_path) -> None:
    """With features.image_size, "Ours*" paints its defects on the 48 px images the target sees
    and gives the UNet the 32 px image prepare_split would decode from the painted file."""
    m, val_idx = _held_out_model(**{"features.image_size": 48, "score.validation_fraction": 0.3,
                                    "score.alpha_per_category": True, "score.alpha_grid": "[0.0, 0.5, 1.0]"})
    rng = np.random.default_rng(0)
    files = []
    for i in range(10):  # 8-bit 48 px files, as a user's folder holds them
        path = tmp_path / f"{i}.png"
        Image.fromarray(rng.integers(0, 256, (48, 48, 3), dtype=np.uint8)).save(path)
        files.append(path)
    split = PreparedSplit("weave", "train", np.stack([load_image(f, 32).transpose(2, 0, 1) * 2 - 1 for f in files]),
                          np.zeros((10, 32, 32), np.uint8), np.zeros(10, np.int64), ["good"] * 10,
                          [f.name for f in files],
                          feature_images=np.stack([load_image(f).transpose(2, 0, 1) * 2 - 1 for f in files]))
    monkeypatch.setattr(validation, "prepare_split", lambda cfg, category, name: split)
    seen = {}
    real_maps_of = validation._maps_of

    def recording_maps_of(model, cfg, category, images, feature_images=None, **kw):  # noqa: ANN001, ANN003, ANN202
        seen.update(images=images, feature_images=feature_images)
        return real_maps_of(model, cfg, category, images, feature_images, **kw)

    monkeypatch.setattr(validation, "_maps_of", recording_maps_of)
    choice = validation.choose_alpha(m, m.cfg, "weave")
    n = len(val_idx)
    assert choice.alpha in (0.0, 0.5, 1.0) and choice.n_validation_images == 2 * n
    assert seen["images"].shape == (2 * n, 3, 32, 32) and seen["feature_images"].shape == (2 * n, 3, 48, 48)
    np.testing.assert_array_equal(seen["images"][:n], split.images[val_idx])
    np.testing.assert_array_equal(seen["feature_images"][:n], split.feature_images[val_idx])
    painted, painted_masks = paint_defects(split.feature_images[val_idx], seed=int(m.cfg.seed) + 7919)
    _, _, small_masks = validation._as_read_from_files(painted, painted_masks, 32)
    assert not np.allclose(seen["feature_images"][n:], split.feature_images[val_idx])
    # The painted 48 px image saved as a file and read back by load_image at 48 and at 32 px.
    for j in range(n):
        path = tmp_path / f"painted{j}.png"
        Image.fromarray(to_uint8_image(painted[j])).save(path)
        np.testing.assert_allclose(seen["feature_images"][n + j], load_image(path).transpose(2, 0, 1) * 2 - 1,
                                   atol=1e-6)
        np.testing.assert_allclose(seen["images"][n + j], load_image(path, 32).transpose(2, 0, 1) * 2 - 1,
                                   atol=1e-6)
        Image.fromarray(painted_masks[j] * np.uint8(255)).save(mask_path := tmp_path / f"mask{j}.png")
        np.testing.assert_array_equal(small_masks[j], load_mask(mask_path, 32))


def test_fits_recorded_before_the_newer_scoring_settings_keep_their_keys(tmp_path) -> None:
    """A model trained (and registered) before ``score.feature_whitening`` and
    ``score.noise_draws`` existed recorded its fit under a key that hashes neither; at their
    old values they leave the key as it was (golden keys computed by the landed code of
    2026-12-02, commit ff1c7bb), set otherwise they change it."""
    # The cpu preset of that day (alpha 0.5 then, round nine set 0.1; the top-4 image score then,
    # round nineteen set top-64; the key hashes both; one spread per term, round twenty-one set
    # spreads per distance from the edge).
    old = ["score.calibrate_maps=true", "score.feature_whitening=none", "score.noise_draws=1",
           "score.alpha=0.5", "score.position_mean_sigma=null", "score.kl_scale=per_image",
           "score.top_k=null", "score.edge_spread_width=null"]
    assert validation._scoring_fit_path(tmp_path, load_config("cpu", overrides=old), "weave").name \
        == "weave-340ac03d6e3bf8f3.json"
    ours = load_config("cpu", overrides=[*old, "score.alpha_per_category=true"])
    assert validation._scoring_fit_path(tmp_path, ours, "weave").name == "weave-78379ec045ecfdc5.json"
    for change in ("score.feature_whitening=full", "score.noise_draws=4", "score.position_mean_sigma=2",
                   "score.kl_scale=log_bits", "score.edge_spread_width=4", "score.two_sided_terms=[feature]"):
        cfg = load_config("cpu", overrides=[*old, change])
        assert validation._scoring_fit_path(tmp_path, cfg, "weave").name != "weave-340ac03d6e3bf8f3.json"
