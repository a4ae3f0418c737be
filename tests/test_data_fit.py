"""The cpu preset's settings fitted to the data (diffad_core/data_fit.py)."""

from __future__ import annotations

from pathlib import Path

import pytest

from diffad_core.config import load_config
from diffad_core.data.heldout import generate_heldout
from diffad_core.data_fit import fit_to_data, fitted_image_size, training_steps, unet_levels, unet_width


def test_image_size_keeps_thin_defects_within_the_cap() -> None:
    assert fitted_image_size(1024, 128) == 128
    assert fitted_image_size(100, 128) == 96  # a multiple of 16, never above the images
    assert fitted_image_size(20, 128) == 32  # never below 32
    assert unet_levels(64) == [1, 2, 2] and unet_levels(128) == [1, 2, 2, 2]
    assert unet_levels(256) == [1, 2, 2, 2, 2]


def test_width_halves_with_twice_the_side() -> None:
    """unet.base_channels is the width at 64 px: a larger input is narrower (multiples of 16,
    at least 16), a smaller one never wider than the preset's."""
    assert unet_width(32, 64) == 32 and unet_width(32, 48) == 32
    assert unet_width(32, 128) == 16 and unet_width(32, 256) == 16 and unet_width(32, 96) == 16
    assert unet_width(64, 128) == 32 and unet_width(16, 128) == 16 and unet_width(8, 128) == 8


def test_training_length_follows_the_budget() -> None:
    cfg = load_config("cpu")
    small, large = training_steps(cfg, 64, 4), training_steps(cfg, 128, 4)
    assert small > large >= 150  # four times the pixels, about a quarter of the steps
    more = cfg.model_copy(update={"auto": cfg.auto.model_copy(update={"time_budget_minutes": 50})})
    assert training_steps(more, 128, 4) > large
    assert training_steps(cfg, 128, 8) < large or training_steps(cfg, 128, 8) == 150
    narrow = training_steps(cfg, 128, 4, width=16)
    assert large < narrow < small  # half the width: cheaper, not as cheap as a quarter of the pixels


def test_cpu_preset_trains_what_round_eighteen_chose() -> None:
    """Four categories of 256 px images: 1310 steps at 64 px with the 256 px feature target, the
    30-minute budget bench/tune_cpu_finegrid.txt adopted (1092 for the 25 minutes before it)."""
    cfg = load_config("cpu")
    assert cfg.auto.time_budget_minutes == 30.0
    assert training_steps(cfg, 64, 4, 256) == 1310
    before = cfg.model_copy(update={"auto": cfg.auto.model_copy(update={"time_budget_minutes": 25.0})})
    assert training_steps(before, 64, 4, 256) == 1092


def test_fit_narrows_a_larger_network(tmp_path: Path) -> None:
    """A 128 px fit gets half the preset's width and the training length of that width; at the
    preset's 64 px cap the width stays the preset's."""
    root = generate_heldout(tmp_path / "d", size=128, n_train=3, n_test_good=1, n_test_per_defect=1,
                            categories=["brick"])
    cfg = load_config("cpu", overrides=[f"data.root={root}", "auto.max_image_size=128"])
    fitted = fit_to_data(cfg, root)
    assert fitted.data.image_size == 128 and fitted.unet.base_channels == 16
    assert fitted.unet.channel_mult == [1, 2, 2, 2]
    assert fitted.train.iterations == training_steps(cfg, 128, 1, None, 16)
    assert fitted.train.iterations > training_steps(cfg, 128, 1, None, 32)
    assert fit_to_data(load_config("cpu", overrides=[f"data.root={root}"]), root).unet.base_channels == 32


def test_fit_to_a_folder(tmp_path: Path) -> None:
    root = generate_heldout(tmp_path / "d", size=56, n_train=3, n_test_good=1, n_test_per_defect=1,
                            categories=["brick", "coffee"])
    cfg = load_config("cpu", overrides=[f"data.root={root}"])
    fitted = fit_to_data(cfg, root)
    assert fitted.data.image_size == 48 and fitted.unet.channel_mult == [1, 2, 2]  # 56 -> 48
    assert fitted.train.iterations >= 150 and fitted.categories() == ["brick", "coffee"]
    assert fitted.auto.fitted and fit_to_data(cfg, root) == fitted  # a rerun fits the same
    one = fitted.model_copy(update={"data": fitted.data.model_copy(update={"categories": ["brick"]})})
    assert fit_to_data(one, root) is one  # a category trained alone keeps the run's fit
    demo = load_config("cpu-demo")
    assert fit_to_data(demo, root) is demo  # only when auto.enabled


def test_fit_with_a_training_crop(tmp_path: Path) -> None:
    """auto.train_crop: the image size keeps the images' detail, depth and training length are
    those of the crop; images no larger than the crop train whole."""
    root = generate_heldout(tmp_path / "d", size=128, n_train=3, n_test_good=1, n_test_per_defect=1,
                            categories=["brick"])
    cfg = load_config("cpu", overrides=[f"data.root={root}", "auto.max_image_size=256",
                                        "auto.train_crop=64"])
    fitted = fit_to_data(cfg, root)
    assert fitted.data.image_size == 128 and fitted.data.train_crop == 64
    assert fitted.network_size == 64 and fitted.unet.channel_mult == unet_levels(64)
    assert fitted.train.iterations == training_steps(cfg, 64, 1)
    small = load_config("cpu", overrides=[f"data.root={root}", "auto.max_image_size=64",
                                          "auto.train_crop=64"])
    assert fit_to_data(small, root).data.train_crop is None


def test_no_training_images_is_a_clear_error(tmp_path: Path) -> None:
    (tmp_path / "d" / "empty" / "train" / "good").mkdir(parents=True)
    cfg = load_config("cpu", overrides=[f"data.root={tmp_path / 'd'}", "data.categories=[empty]"])
    with pytest.raises(ValueError, match="no training images"):
        fit_to_data(cfg, tmp_path / "d")


def test_fit_with_a_larger_feature_target(tmp_path: Path) -> None:
    """auto.max_feature_size: the target sees the images at min(native, cap) when that is larger
    than the image size, and its pass is paid for in training steps."""
    root = generate_heldout(tmp_path / "d", size=128, n_train=3, n_test_good=1, n_test_per_defect=1,
                            categories=["brick"])
    cfg = load_config("cpu", overrides=[f"data.root={root}"])  # the preset's cap: 256
    fitted = fit_to_data(cfg, root)
    assert fitted.data.image_size == 64 and fitted.features.image_size == 128  # capped by the images
    assert fitted.feature_image_size == 128 and fitted.network_size == 64
    assert fitted.train.iterations == training_steps(cfg, 64, 1, 128)
    # eight categories: with four, the 128 px target and none both reach the 1500-step cap
    assert training_steps(cfg, 64, 8, 256) < training_steps(cfg, 64, 8, 128) < training_steps(cfg, 64, 8)
    plain = fit_to_data(load_config("cpu", overrides=[f"data.root={root}", "auto.max_feature_size=null"]), root)
    assert plain.features.image_size is None and plain.feature_image_size is None
    same = load_config("cpu", overrides=[f"data.root={root}", "auto.max_feature_size=64"])
    assert fit_to_data(same, root).features.image_size is None  # not larger than the image
    ours = load_config("cpu", overrides=[f"data.root={root}", "score.alpha_per_category=true"])
    fitted_ours = fit_to_data(ours, root)
    assert fitted_ours.score.alpha_per_category and fitted_ours.feature_image_size == 128
