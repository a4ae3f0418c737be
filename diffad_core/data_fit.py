"""Settings fitted to a user's own images (the ``cpu`` preset, issue #8): image size, network
depth, training length and the feature grid, chosen from the data and a CPU time budget.

The rule is deterministic (the same data gives the same config, so a rerun reuses its trained
models) and is applied once, right after the dataset is resolved:

- **image size:** as large as the images allow (their shortest side), capped at
  ``auto.max_image_size``, rounded down to a multiple of 16. The cap trades detail for training
  steps within the budget: a defect 1-3 px wide in a 256 px photograph stays half a pixel wide at
  128 px but blurs away at 64 px, while 128 px gets a quarter of the steps. The ``cpu`` preset's
  cap (64) was chosen on the synthetic family (bench/tune_cpu.txt), and kept over 128 and
  256 px images trained on 64 px crops (bench/tune_cpu_crop.txt);
- **training crop:** with ``auto.train_crop`` and a fitted size above it, training sees random
  crops of that size (``data.train_crop``) and scoring the whole image, so the image size keeps
  thin defects without making a training step dearer;
- **network depth:** one UNet level per halving of the network's input (the crop, else the
  image) down to 16 px (attention at 16 px); the feature head reads H/4;
- **network width:** ``unet.base_channels`` is the width at 64 px; a larger input gets it
  scaled by 64 / side, rounded down to a multiple of 16 and at least 16, so that a 128 px
  network costs about 1.3 times a 64 px one per step instead of 3.3 times
  (bench/tune_cpu_narrow_rule.md); never wider than ``unet.base_channels``;
- **training length:** as many steps as fit ``auto.train_share`` of ``auto.time_budget_minutes``
  for all categories on ``runtime.local_workers`` workers, from a cost per training image (crop)
  measured on this project's 2-core machine (``_SECONDS_PER_IMAGE_AT_64``), at least 150 and at
  most 1500;
- **feature target:** EfficientNet-Lite0 at strides 4 and 8, compared on the H/4 grid; with
  ``auto.max_feature_size``, computed on the image at min(native side, that cap) when this is
  larger than the image size (``features.image_size``, docs/method.md), its cost per step
  counted in the training length (``_SECONDS_PER_TARGET_IMAGE_AT_256``).
"""

from __future__ import annotations

import math
from pathlib import Path
from diffad_core.config import DiffadConfig
from diffad_core.data.io import image_size
from diffad_core.data.layouts import list_samples

# One training step per image at 64 px with the cpu UNet (base 32), one thread, two categories
# side by side: 995 steps of 4 images took 312-337 s per category after issue #11's speed work
# (bench/heldout_seed1_benchmark.txt; the 0.113 s measured before it was stale;
# bench/tune_cpu_length_rule.md).
_SECONDS_PER_IMAGE_AT_64 = 0.082
# One Lite0 pass (strides 4 and 8) per training image at 256 px, one thread: 0.083 s for a batch
# of 4 on this project's 2-core machine (session 5); scaled with the area at other sizes.
_SECONDS_PER_TARGET_IMAGE_AT_256 = 0.021
# The UNet's cost per image against its width, as (width / 32) ** this: 0.151 s at 16 channels
# against 0.410 s at 32, 128 px, one process (bench/tune_cpu_narrow_rule.md's table, the
# target's share taken off).
_WIDTH_COST_EXPONENT = 1.44
_WIDTH_STEP, _MIN_WIDTH = 16, 16
_MIN_STEPS, _MAX_STEPS = 150, 1500
_SIZES_CHECKED = 8  # train images per category whose header is read


def native_size(cfg: DiffadConfig, root: Path, categories: list[str]) -> int:
    """The shortest image side among the first training images of every category."""
    sides = []
    for category in categories:
        for sample in list_samples(root, cfg.data.dataset, category, "train")[:_SIZES_CHECKED]:
            w, h = image_size(sample.image_path)
            sides.append(min(w, h))
    if not sides:
        raise ValueError(f"no training images under {root} to fit the settings to")
    return min(sides)


def fitted_image_size(native: int, cap: int) -> int:
    """min(native, cap) rounded down to a multiple of 16, at least 32."""
    return max(32, (min(native, cap) // 16) * 16)


def unet_levels(size: int) -> list[int]:
    """Channel multipliers: one level per halving from ``size`` down to about 16 px."""
    n = max(3, int(math.log2(max(size, 16) / 16)) + 1)
    return [1] + [2] * (n - 1)


def unet_width(base_channels: int, size: int) -> int:
    """The base width for a ``size`` px input: ``base_channels`` (the width at 64 px) scaled by
    64 / size, rounded down to a multiple of 16, between 16 and ``base_channels``."""
    scaled = (base_channels * 64 // max(size, 1)) // _WIDTH_STEP * _WIDTH_STEP
    return max(min(_MIN_WIDTH, base_channels), min(base_channels, scaled))


def training_steps(cfg: DiffadConfig, size: int, n_categories: int, feature_size: int | None = None,
                   width: int = 32) -> int:
    """Steps that fit the training share of the time budget (see the module docstring);
    ``feature_size``: the side of the feature target's own input, when it has one; ``width``:
    the UNet's base channels."""
    per_image = _SECONDS_PER_IMAGE_AT_64 * (size / 64) ** 2 * (width / 32) ** _WIDTH_COST_EXPONENT
    if feature_size is not None:
        per_image += _SECONDS_PER_TARGET_IMAGE_AT_256 * (feature_size / 256) ** 2
    per_step = per_image * cfg.train.batch_size
    rounds = math.ceil(n_categories / max(1, cfg.runtime.local_workers))
    seconds = cfg.auto.time_budget_minutes * 60.0 * cfg.auto.train_share / rounds
    return int(min(_MAX_STEPS, max(_MIN_STEPS, seconds // per_step)))


def fit_to_data(cfg: DiffadConfig, root: Path) -> DiffadConfig:
    """``cfg`` with the fitted settings when ``auto.enabled``, else ``cfg`` unchanged. A fitted
    config is returned as it is (so a category trained on its own keeps the run's fit)."""
    if not cfg.auto.enabled or cfg.auto.fitted:
        return cfg
    categories = cfg.categories()
    native = native_size(cfg, root, categories)
    size = fitted_image_size(native, cfg.auto.max_image_size)
    crop = cfg.auto.train_crop if cfg.auto.train_crop and cfg.auto.train_crop < size else None
    feature_size = None
    if cfg.auto.max_feature_size and crop is None:
        feature_size = fitted_image_size(native, cfg.auto.max_feature_size)
        feature_size = feature_size if feature_size > size else None
    mult = unet_levels(crop or size)
    width = unet_width(cfg.unet.base_channels, crop or size)
    steps = training_steps(cfg, crop or size, len(categories), feature_size, width)
    update = {
        "data": {"image_size": size, "train_crop": crop},
        "features": {"image_size": feature_size},
        "unet": {"channel_mult": mult, "attention_resolutions": [16], "base_channels": width},
        "train": {"iterations": steps, "checkpoint_every": max(1, steps // 2)},
        "auto": {"fitted": True},
    }
    return cfg.with_changes(update)
