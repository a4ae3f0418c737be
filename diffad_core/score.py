"""Anomaly maps and image scores: Eq. 11 of the paper (METHOD.md §3), in one place.

For each scoring timestep t (an index into the respaced chain) the clean image x0 is noised to
x_t = q_sample(x0, t, eps). Two maps come out of the UNet:

- the KL map: ``KL(q(x_{t-1}|x_t,x0) || p_theta(x_{t-1}|x_t))`` per pixel and channel, in bits
  (``diffusion.kl_map_bits``), normalised per image by its own mean and std over C x H x W
  (``score.kl_scale`` "per_image", the paper; ``kl_term`` has the unnormalised variants);
- the feature map: ``mean_c (F_hat(x_t, t) - F(x0))^2`` on the comparison grid
  (``score.feature_map_size``, else the grid of the head's level), upsampled bilinearly to
  H x W. With ``features.image_size`` F sees x0 at that larger size (``feature_images``).

With ``score.noise_draws`` = K > 1 each image is noised K times per t: the head's prediction is
averaged over the draws before the residual, the KL map over them (ours; K = 1 is the paper).
Both are averaged over t (the KL map also over channels) and mixed as Eq. 11:
``A = alpha * KL + (1 - alpha) * feature``, each optionally standardised first by its statistics
on held-out normal images (``MapCalibration``, ``validation.py``). With
``score.feature_whitening`` the squared error over channels is weighed by the residual's second
moments on those images (``FeatureWhitening``; ours). The image score is the mean of
the top-k pixels of A (optionally blurred first).

``paper`` runs the official code's two UNet passes per t: the KL pass with the mapped step
(20/201/401) and a feature pass fed the unmapped index (5/50/100) on the same x_t
(``score.official_timestep_quirk``); ``refined`` runs one pass with the mapped step.
"""

from __future__ import annotations

from collections.abc import Collection, Iterator
from dataclasses import dataclass, field
from typing import Any, Literal

import numpy as np
import torch
import torch.nn.functional as F

from diffad_core.config import ScoreConfig
from diffad_core.data import PreparedSplit
from diffad_core.diffusion import kl_map_bits, model_timesteps, p_mean_variance, q_sample
from diffad_core.model import DiffadModel
from diffad_core.progress import progress_bar
from diffad_core.runtime import autocast_context, in_chunks, micro_batch

# The scoring variants among config.ABLATIONS: Eq. 11 with these settings changed.
_VARIANTS: dict[str, dict[str, object]] = {
    "grid_h4": {"feature_map_size": None},
    "single_pass": {"official_timestep_quirk": False},
}


@dataclass(frozen=True, eq=False)
class FeatureWhitening:
    """How Eq. 11's feature residual ``r = F_hat - F`` is weighed (ours, issue #8;
    docs/method.md "Whitened feature residual"): ``kind`` "diagonal" holds ``precision`` (|T|, C),
    the inverse mean square of each channel at each scoring step on held-out normals, and the
    term is ``mean_c r_c^2 * precision_{t,c}``; "full" holds (|T|, C, C), the inverse of the
    residual's second-moment matrix (shrunk towards its mean variance), and the term is
    ``r^T P_t r / C``; "joint" holds one (|T| C, |T| C) matrix, the same for the residuals of all
    steps concatenated per place (t-major), and the term is ``r^T P r / (|T| C)``, with no
    further mean over t (bench/tune_cpu_joint_rule.md)."""

    kind: Literal["diagonal", "full", "joint"]
    precision: torch.Tensor

    def __eq__(self, other: object) -> bool:
        return (isinstance(other, FeatureWhitening) and self.kind == other.kind
                and torch.equal(self.precision, other.precision))

    __hash__ = None  # mutable tensor inside: not hashable

    def to_dict(self) -> dict[str, Any]:
        return {"kind": self.kind, "precision": self.precision.tolist()}

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> FeatureWhitening:
        return cls(kind=data["kind"], precision=torch.tensor(data["precision"], dtype=torch.float32))


# "full": the second-moment matrix plus this fraction of its mean variance on the diagonal, so a
# few held-out images give an invertible, well-conditioned matrix (as PaDiM's eps * I).
_FULL_SHRINKAGE = 0.01


def _joint_vectors(residual: torch.Tensor) -> torch.Tensor:
    """(|T|, B, C, g, g) -> (B, g, g, |T| C): the residuals of all steps of a place, t-major."""
    n_t, b, c, g1, g2 = residual.shape
    return residual.permute(1, 3, 4, 0, 2).reshape(b, g1, g2, n_t * c)


def fit_feature_whitening(residual: torch.Tensor, kind: Literal["diagonal", "full", "joint"]) -> FeatureWhitening:
    """The weights of :class:`FeatureWhitening` from the residuals of normal images,
    (|T|, N, C, g, g) as ``ComponentMaps.feature_residual``."""
    n_t, _, c = residual.shape[:3]
    if kind == "joint":  # one matrix over all steps: (1, N*g*g, |T| C)
        vectors = _joint_vectors(residual.double()).reshape(1, -1, n_t * c)
    else:
        vectors = residual.double().permute(0, 1, 3, 4, 2).reshape(n_t, -1, c)  # (|T|, N*g*g, C)
    if kind == "diagonal":
        precision = 1.0 / vectors.pow(2).mean(dim=1).clamp_min(1e-12)
    else:
        moments = vectors.transpose(1, 2) @ vectors / vectors.shape[1]  # (M, D, D)
        ridge = _FULL_SHRINKAGE * moments.diagonal(dim1=1, dim2=2).mean(dim=1).clamp_min(1e-12)
        eye = torch.eye(moments.shape[-1], dtype=torch.float64)
        precision = torch.linalg.inv(moments + ridge.view(-1, 1, 1) * eye)
        precision = precision[0] if kind == "joint" else precision
    return FeatureWhitening(kind=kind, precision=precision.float())


@dataclass(frozen=True)
class PositionMaps:
    """A value per position of each of the two terms of Eq. 11, (H, W) each at the scored size,
    from held-out normal images: their means (``score.position_mean_sigma``; ours,
    bench/tune_cpu_position_rule.md) or their spreads (``score.edge_spread_width``; ours,
    bench/tune_cpu_edge_rule.md)."""

    kl: torch.Tensor
    feature: torch.Tensor

    def __eq__(self, other: object) -> bool:
        return (isinstance(other, PositionMaps) and torch.equal(self.kl, other.kl)
                and torch.equal(self.feature, other.feature))

    __hash__ = None  # mutable tensors inside: not hashable

    def to_dict(self) -> dict[str, Any]:
        return {"kl": self.kl.tolist(), "feature": self.feature.tolist()}

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> PositionMaps:
        return cls(kl=torch.tensor(data["kl"], dtype=torch.float32),
                   feature=torch.tensor(data["feature"], dtype=torch.float32))

    def checked(self, what: str, shape: tuple[int, int]) -> tuple[torch.Tensor, torch.Tensor]:
        """(KL, feature) for maps of spatial ``shape``; a clear error at another size."""
        if tuple(self.kl.shape) != tuple(shape):
            raise ValueError(f"the calibration's per-position {what} are {tuple(self.kl.shape)}, "
                             f"the maps {tuple(shape)}: calibrate again at the scored size")
        return self.kl, self.feature


@dataclass(frozen=True)
class MapCalibration:
    """Statistics of the KL and feature maps on held-out normal images (ours, issue #8):
    Eq. 11 mixes ``(KL - kl_mean) / kl_std`` and ``(feature - feature_mean) / feature_std``,
    so alpha weighs two maps of one scale on every dataset. ``whitening``: the weights of the
    feature residual (``score.feature_whitening``); the feature statistics are of the map it
    gives. ``position_means``: when set, each term's mean is taken per position (its std is
    then that of the term less those means). ``position_spreads``: when set, each term is divided
    by these per-position spreads instead of its one std."""

    kl_mean: float
    kl_std: float
    feature_mean: float
    feature_std: float
    n_images: int = 0
    whitening: FeatureWhitening | None = None
    position_means: PositionMaps | None = None
    position_spreads: PositionMaps | None = None

    def to_dict(self) -> dict[str, Any]:
        return {"kl_mean": self.kl_mean, "kl_std": self.kl_std, "feature_mean": self.feature_mean,
                "feature_std": self.feature_std, "n_images": self.n_images,
                "whitening": self.whitening.to_dict() if self.whitening else None,
                "position_means": self.position_means.to_dict() if self.position_means else None,
                "position_spreads": self.position_spreads.to_dict() if self.position_spreads else None}

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> MapCalibration:
        whitening, means = data.get("whitening"), data.get("position_means")
        spreads = data.get("position_spreads")
        return cls(kl_mean=float(data["kl_mean"]), kl_std=float(data["kl_std"]),
                   feature_mean=float(data["feature_mean"]), feature_std=float(data["feature_std"]),
                   n_images=int(data.get("n_images", 0)),
                   whitening=FeatureWhitening.from_dict(whitening) if whitening else None,
                   position_means=PositionMaps.from_dict(means) if means else None,
                   position_spreads=PositionMaps.from_dict(spreads) if spreads else None)

    def centres(self, shape: tuple[int, int]) -> tuple[float | torch.Tensor, float | torch.Tensor]:
        """The (KL, feature) means to subtract from maps of spatial ``shape``."""
        if self.position_means is None:
            return self.kl_mean, self.feature_mean
        return self.position_means.checked("means", shape)

    def spreads(self, shape: tuple[int, int]) -> tuple[float | torch.Tensor, float | torch.Tensor]:
        """The (KL, feature) spreads to divide maps of spatial ``shape`` by, once centred."""
        if self.position_spreads is None:
            return self.kl_std, self.feature_std
        return self.position_spreads.checked("spreads", shape)


@dataclass
class ComponentMaps:
    """The two terms of Eq. 11 and the RGB error of a batch, each (B, H, W) float32 on CPU.
    ``rgb`` is None unless asked for; ``feature_residual`` ``F_hat - F`` on the comparison grid,
    (|T|, B, C, g, g), likewise."""

    kl: torch.Tensor
    feature: torch.Tensor
    rgb: torch.Tensor | None = None
    feature_residual: torch.Tensor | None = None

    @classmethod
    def concatenated(cls, parts: list[ComponentMaps]) -> ComponentMaps:
        """The maps of consecutive batches as one (the residual's batch axis is its second)."""
        def joined(name: str, dim: int = 0) -> torch.Tensor | None:
            values = [getattr(p, name) for p in parts]
            return None if values[0] is None else torch.cat(values, dim=dim)

        return cls(kl=joined("kl"), feature=joined("feature"), rgb=joined("rgb"),
                   feature_residual=joined("feature_residual", dim=1))


@dataclass
class ScoredBatch:
    """Eq. 11 of one batch: ``anomaly`` (B, H, W), ``image_score`` (B,), the component maps and
    the ablation maps asked for in ``score.ablations`` ({name: (B, H, W)})."""

    anomaly: torch.Tensor
    image_score: torch.Tensor
    components: ComponentMaps
    ablation_maps: dict[str, torch.Tensor] = field(default_factory=dict)


@dataclass
class ScoreRecord:
    """One scored test image (one parquet row, ``results.storage``)."""

    rel_path: str
    defect_type: str
    label: int
    image_score: float
    anomaly_map: np.ndarray  # (H, W) float32, Eq. 11
    kl_map: np.ndarray  # (H, W) float32, Eq. 11's KL term (``kl_term``), before any calibration
    feature_map: np.ndarray  # (H, W) float32
    mask: np.ndarray  # (H, W) uint8 {0, 1}
    category: str = ""
    alpha: float = 0.5
    ablation_scores: dict[str, float] = field(default_factory=dict)  # scorer -> image score
    ablation_maps: dict[str, np.ndarray] = field(default_factory=dict)  # scorer -> (H, W) map


# ----------------------------------------------------------------------------- helpers
def default_top_k(image_size: int | tuple[int, int]) -> int:
    """64 pixels at 256x256 (METHOD.md §3), scaled with the image area; at least 1."""
    h, w = (image_size, image_size) if isinstance(image_size, int) else image_size
    return max(1, int(round(64 * (h * w) / (256 * 256))))


def top_k_mean(maps: torch.Tensor, k: int) -> torch.Tensor:
    """Mean of the ``k`` largest values of each map: (B, H, W) -> (B,)."""
    if maps.dim() < 2:
        raise ValueError(f"top_k_mean expects (B, ...) maps, got shape {tuple(maps.shape)}")
    flat = maps.reshape(maps.shape[0], -1)
    k = max(1, min(int(k), flat.shape[1]))
    return flat.topk(k, dim=1).values.mean(dim=1)


def _gaussian_blur(maps: torch.Tensor, sigma: float) -> torch.Tensor:
    """(B, H, W) maps blurred by a separable Gaussian (truncated at 3 sigma, reflect padding)."""
    radius = max(1, int(round(3.0 * sigma)))
    x = torch.arange(-radius, radius + 1, dtype=torch.float32)
    kernel = torch.exp(-0.5 * (x / sigma) ** 2)
    kernel = kernel / kernel.sum()
    out = maps.unsqueeze(1)
    out = F.conv2d(F.pad(out, (radius, radius, 0, 0), mode="reflect"), kernel.view(1, 1, 1, -1))
    out = F.conv2d(F.pad(out, (0, 0, radius, radius), mode="reflect"), kernel.view(1, 1, -1, 1))
    return out[:, 0]


def image_scores(anomaly: torch.Tensor, settings: ScoreConfig) -> torch.Tensor:
    """Image score: the top-k mean of A (METHOD.md §3), after an optional Gaussian blur and,
    with ``score.image_score_center``, against the image's own median (and interquartile range)."""
    maps = _gaussian_blur(anomaly, settings.image_score_sigma) if settings.image_score_sigma > 0 else anomaly
    if settings.image_score_center != "none":
        maps = _centred(maps, robust=settings.image_score_center == "robust")
    k = int(settings.top_k) if settings.top_k else default_top_k(tuple(anomaly.shape[-2:]))
    return top_k_mean(maps, k)


def _centred(maps: torch.Tensor, robust: bool) -> torch.Tensor:
    """(B, H, W) maps minus each one's median over its pixels; divided by its interquartile
    range (at least 1e-6) too when ``robust``."""
    flat = maps.reshape(maps.shape[0], -1)
    q25, q50, q75 = torch.quantile(flat, torch.tensor([0.25, 0.5, 0.75], dtype=flat.dtype), dim=1)
    shape = (-1,) + (1,) * (maps.dim() - 1)
    out = maps - q50.view(shape)
    return out / (q75 - q25).clamp_min(1e-6).view(shape) if robust else out


def _normalise_per_image(x: torch.Tensor, unbiased: bool) -> torch.Tensor:
    """(N, C, H, W) -> same, with mean 0 and std 1 over C x H x W of each item (KL map, §3)."""
    flat = x.reshape(x.shape[0], -1)
    mean = flat.mean(dim=1)
    std = flat.std(dim=1, unbiased=unbiased).clamp_min(1e-12)
    shape = (-1,) + (1,) * (x.dim() - 1)
    return (x - mean.view(shape)) / std.view(shape)


def _check_inputs(model: DiffadModel, images: torch.Tensor, steps: list[int]) -> None:
    if images.dim() != 4 or images.shape[1] != 3:
        raise ValueError(f"images must be (B, 3, H, W), got shape {tuple(images.shape)}")
    if not steps:
        raise ValueError("diffusion.score_timesteps is empty")
    n_chain = model.schedule.num_timesteps
    for t in steps:
        if not 0 <= t < n_chain:
            raise ValueError(f"score timestep {t} is outside the respaced chain (0..{n_chain - 1})")


# ----------------------------------------------------------------------------- Eq. 11
@torch.no_grad()
def component_maps(
    model: DiffadModel,
    images: torch.Tensor,
    category: str,
    settings: ScoreConfig,
    generator: torch.Generator | None = None,
    *,
    noise: torch.Tensor | None = None,
    with_rgb: bool = False,
    feature_images: torch.Tensor | None = None,
    whitening: FeatureWhitening | None = None,
    with_residual: bool = False,
) -> ComponentMaps:
    """The two terms of Eq. 11 for a batch of images in [-1, 1] (B, 3, H, W), averaged over t.

    ``noise`` (K*|T|, B, 3, H, W), the eps of each of the ``score.noise_draws`` = K draws at each
    scoring step (draw-major: rows [k*|T|, (k+1)*|T|) are draw k), else drawn in that order from
    the CPU ``generator`` (the same seed gives the same maps on every device). ``with_rgb`` also returns
    ``|x0_hat - x0|`` from the KL pass (an ablation scorer). ``feature_images``: the same images
    at ``features.image_size`` (B, 3, F, F), required when the model's target is computed there.
    ``whitening`` weighs the feature residual (:func:`feature_term`); ``with_residual`` also
    returns the residual itself (to fit a whitening on normal images).
    """
    steps = [int(t) for t in model.cfg.diffusion.score_timesteps]
    _check_inputs(model, images, steps)
    target_size = model.cfg.feature_image_size
    if target_size is not None and (feature_images is None
                                    or tuple(feature_images.shape) != (images.shape[0], 3, target_size, target_size)):
        raise ValueError(f"this model computes its feature target at {target_size} px "
                         f"(features.image_size): pass feature_images of shape "
                         f"{(images.shape[0], 3, target_size, target_size)}")
    b, _, h, w = images.shape
    shape = (settings.noise_draws * len(steps), *images.shape)
    if noise is None:
        noise = torch.randn(shape, generator=generator, dtype=torch.float32)
    elif tuple(noise.shape) != shape:
        raise ValueError(f"noise must be {shape}, got {tuple(noise.shape)}")
    # Images are independent: on a CPU every step below runs for a few images at a time, so the
    # UNet's activations and the maps' temporaries stay in cache (issue #11); the whole batch
    # at once elsewhere.
    chunk = micro_batch(model.device, h, w)
    group = b if chunk is None else max(1, chunk // shape[0])
    target_input = images if target_size is None else feature_images
    parts = [_group_maps(model, images[i:i + group], target_input[i:i + group], category, settings, steps,
                         noise[:, i:i + group], with_rgb, whitening, with_residual)
             for i in range(0, b, group)]
    return ComponentMaps.concatenated(parts)


def _group_maps(model: DiffadModel, images: torch.Tensor, target_input: torch.Tensor, category: str,
                settings: ScoreConfig, steps: list[int], noise: torch.Tensor, with_rgb: bool,
                whitening: FeatureWhitening | None, with_residual: bool) -> ComponentMaps:
    """``component_maps`` of one group of images, all draws and scoring steps batched in
    draw-major, then t-major order; ``target_input`` is what the feature target sees (the
    images, or them at its own size)."""
    s, device = model.schedule, model.device
    b, _, h, w = images.shape
    n_t, n_draws = len(steps), settings.noise_draws
    x0 = images.to(device=device, dtype=torch.float32)
    # Batch layout: rows [(k*|T| + i)*B : (k*|T| + i + 1)*B] are all images at steps[i] in draw
    # k; every draw and t in one pass.
    x0_rep = x0.repeat(n_draws * n_t, 1, 1, 1)
    t_idx = torch.tensor(steps, dtype=torch.long).repeat_interleave(b).repeat(n_draws).to(device)
    x_t = q_sample(s, x0_rep, t_idx, noise.reshape(x0_rep.shape).to(device))
    y = model.class_labels(category, x_t.shape[0])
    size = settings.feature_map_size
    # The official feature pass: the same x_t, the unmapped index (5/50/100).
    t_feature = t_idx if settings.official_timestep_quirk else None

    def unet_passes(x: torch.Tensor, t_kl: torch.Tensor, t_feat: torch.Tensor | None,
                    labels: torch.Tensor | None) -> tuple[torch.Tensor, torch.Tensor]:
        # The KL pass: the UNet sees the original-chain step of each respaced index (§3).
        out, feat = model.unet(x, t_kl, labels, feature_size=size)
        if t_feat is not None:
            _, feat = model.unet(x, t_feat, labels, feature_size=size)
        return out, feat

    with autocast_context(device, settings.amp):
        model_out, feat_hat = in_chunks(unet_passes, [x_t, model_timesteps(s, t_idx), t_feature, y],
                                        micro_batch(device, h, w))
        # The comparison grid: score.feature_map_size, else the grid of the head's level.
        target_x = x0 if target_input is images else target_input.to(device=device, dtype=torch.float32)
        feat_target = model.feature_target(target_x, size=size or h // model.cfg.unet.feature_stride)
    model_out, feat_hat, feat_target = model_out.float(), feat_hat.float(), feat_target.float()

    # Eq. 11, first term, from the KL in bits of every draw and t.
    kl_map = kl_term(kl_map_bits(s, model_out, x0_rep, x_t, t_idx, clip=True), settings, n_draws, n_t)

    # Eq. 11, second term, from the residual of the feature head.
    if feat_hat.shape[1:] != feat_target.shape[1:]:
        raise ValueError(f"UNet feature head gives {tuple(feat_hat.shape[1:])} but the feature "
                         f"target gives {tuple(feat_target.shape[1:])}")
    # The head's prediction averaged over the draws, then compared with the target.
    residual = feat_hat.view(n_draws, n_t, b, *feat_hat.shape[1:]).mean(dim=0) - feat_target
    feature_map = feature_term(residual, whitening, (h, w))

    rgb_map = None
    if with_rgb:
        pred_x0 = p_mean_variance(s, model_out, x_t, t_idx, clip=True)["pred_x0"]
        rgb = (pred_x0.float() - x0_rep).abs().mean(dim=1)
        rgb_map = rgb.view(n_draws * n_t, b, h, w).mean(dim=0).cpu()
    return ComponentMaps(kl=kl_map.cpu(), feature=feature_map.cpu(), rgb=rgb_map,
                         feature_residual=residual.cpu() if with_residual else None)


# "log_bits": the floor under each step's KL map before its log2 (bits; the KL is >= 0 but
# rounds to 0 where the model matches the posterior).
_LOG_FLOOR_BITS = 1e-6


def kl_term(bits: torch.Tensor, settings: ScoreConfig, n_draws: int, n_t: int) -> torch.Tensor:
    """Eq. 11's first term from the KL in bits (K*|T|*B, C, H, W), rows draw-major then t-major:
    (B, H, W). ``score.kl_scale`` "per_image" (the paper, METHOD.md §3): each row normalised by its
    own mean and std over C x H x W, then the mean over channels, draws and t. "bits": the mean
    over channels and draws at each t, then over t; "log_bits": the mean over t of the log2 of
    those per-t maps (ours, bench/tune_cpu_klscale_rule.md)."""
    h, w = bits.shape[-2:]
    if settings.kl_scale == "per_image":
        kl = _normalise_per_image(bits, settings.kl_unbiased_std).mean(dim=1)
        return kl.view(n_draws * n_t, -1, h, w).mean(dim=0)
    per_step = bits.mean(dim=1).view(n_draws, n_t, -1, h, w).mean(dim=0)  # (|T|, B, H, W)
    if settings.kl_scale == "log_bits":
        per_step = per_step.clamp_min(_LOG_FLOOR_BITS).log2()
    return per_step.mean(dim=0)


def feature_term(residual: torch.Tensor, whitening: FeatureWhitening | None,
                 size: tuple[int, int]) -> torch.Tensor:
    """Eq. 11's second term from the residual ``F_hat - F`` (|T|, B, C, g, g): the squared error
    over channels at each t (the paper's mean over channels, or weighted by ``whitening``),
    upsampled bilinearly to ``size``, then the mean over t: (B, H, W). A "joint" whitening
    weighs all steps' residuals of a place at once instead (no mean over t)."""
    n_t, b, c = residual.shape[:3]
    if whitening is not None and whitening.kind == "joint":
        precision = whitening.precision.to(device=residual.device, dtype=residual.dtype)
        if tuple(precision.shape) != (n_t * c, n_t * c):
            raise ValueError(f"the joint feature whitening was fitted for {precision.shape[0]} values "
                             f"per place (scoring steps x channels), the residual has {n_t} x {c}")
        vectors = _joint_vectors(residual)
        err = torch.einsum("bxyk,kl,bxyl->bxy", vectors, precision, vectors) / (n_t * c)
        err = F.interpolate(err.unsqueeze(1), size=size, mode="bilinear", align_corners=False)
        return err[:, 0]
    if whitening is None:
        err = residual.pow(2).mean(dim=2)
    else:
        precision = whitening.precision.to(device=residual.device, dtype=residual.dtype)
        if tuple(precision.shape[:2]) != (n_t, c):
            raise ValueError(f"the feature whitening was fitted for {tuple(precision.shape[:2])} "
                             f"(scoring steps, channels), the residual has {(n_t, c)}")
        if whitening.kind == "diagonal":
            err = (residual.pow(2) * precision[:, None, :, None, None]).mean(dim=2)
        else:
            err = torch.einsum("tbcxy,tcd,tbdxy->tbxy", residual, precision, residual) / c
    err = F.interpolate(err.reshape(n_t * b, 1, *err.shape[2:]), size=size, mode="bilinear",
                        align_corners=False)
    return err[:, 0].view(n_t, b, *size).mean(dim=0)


def anomaly_map(maps: ComponentMaps, alpha: float, calibration: MapCalibration | None = None,
                two_sided: Collection[str] = ()) -> torch.Tensor:
    """Eq. 11: ``A = alpha * KL + (1 - alpha) * feature``, each term standardised by
    ``calibration`` first when given (centred, then divided by its spread); the terms named in
    ``two_sided`` ("kl", "feature"; ``score.two_sided_terms``) are then read as their absolute
    value (ours, bench/tune_cpu_twosided_rule.md)."""
    if not 0.0 <= alpha <= 1.0:
        raise ValueError(f"alpha must be in [0, 1], got {alpha}")
    if two_sided and calibration is None:
        raise ValueError("a two-sided reading of Eq. 11's terms needs a calibration: the side is "
                         "taken from the held-out normal images' level")
    kl, feature = maps.kl, maps.feature
    if calibration is not None:
        shape = tuple(kl.shape[-2:])
        kl_centre, feature_centre = calibration.centres(shape)
        kl_spread, feature_spread = calibration.spreads(shape)
        kl = (kl - kl_centre) / kl_spread
        feature = (feature - feature_centre) / feature_spread
        kl = kl.abs() if "kl" in two_sided else kl
        feature = feature.abs() if "feature" in two_sided else feature
    return alpha * kl + (1.0 - alpha) * feature


@torch.no_grad()
def _padim_map(model: DiffadModel, images: torch.Tensor) -> torch.Tensor:
    """PaDiM Mahalanobis map upsampled to H x W (the baseline scorer); (B, H, W) on CPU."""
    x0 = images.to(device=model.device, dtype=torch.float32)
    m = model.padim.score_map(x0).float().unsqueeze(1)
    m = F.interpolate(m, size=images.shape[-2:], mode="bilinear", align_corners=False)
    return m[:, 0].cpu()


def score_batch(
    model: DiffadModel,
    images: torch.Tensor,
    category: str,
    settings: ScoreConfig,
    *,
    alpha: float,
    calibration: MapCalibration | None = None,
    generator: torch.Generator | None = None,
    feature_images: torch.Tensor | None = None,
) -> ScoredBatch:
    """Eq. 11 and the image scores of a batch in [-1, 1] (B, 3, H, W), plus the ablation maps
    ``settings.ablations`` asks for. ``feature_images``: as in :func:`component_maps`."""
    n_rows = settings.noise_draws * len(model.cfg.diffusion.score_timesteps)
    # One draw of the forward noise for Eq. 11 and for every variant of it (same x_t).
    noise = torch.randn((n_rows, *images.shape), generator=generator, dtype=torch.float32)
    whitening = calibration.whitening if calibration is not None else None
    maps = component_maps(model, images, category, settings, noise=noise,
                          with_rgb="rgb" in settings.ablations, feature_images=feature_images,
                          whitening=whitening)
    two_sided = settings.two_sided_terms
    anomaly = anomaly_map(maps, alpha, calibration, two_sided)
    ablations: dict[str, torch.Tensor] = {}
    for name in settings.ablations:
        if name == "padim":
            ablations[name] = _padim_map(model, images)
        elif name == "rgb" and maps.rgb is not None:
            ablations[name] = maps.rgb
        elif name in _VARIANTS:
            variant = settings.model_copy(update=_VARIANTS[name])
            ablations[name] = anomaly_map(component_maps(model, images, category, variant, noise=noise,
                                                         feature_images=feature_images, whitening=whitening),
                                          alpha, calibration, two_sided)
        else:  # one term of Eq. 11 alone, calibrated and read as Eq. 11 reads it (alpha 1 or 0)
            ablations[name] = anomaly_map(maps, 1.0 if name == "kl" else 0.0, calibration, two_sided)
    return ScoredBatch(anomaly=anomaly, image_score=image_scores(anomaly, settings),
                       components=maps, ablation_maps=ablations)


def score_split(
    model: DiffadModel,
    prepared: PreparedSplit,
    settings: ScoreConfig,
    *,
    alpha: float,
    calibration: MapCalibration | None = None,
    seed: int = 0,
    progress: bool = True,
) -> Iterator[ScoreRecord]:
    """Score every image of a prepared split, yielding one ScoreRecord at a time (only one
    batch of maps is held in memory)."""
    if settings.batch_size < 1:
        raise ValueError(f"score.batch_size must be >= 1, got {settings.batch_size}")
    generator = torch.Generator().manual_seed(int(seed))
    n = len(prepared.labels)
    bar = progress_bar(total=n, desc=f"score {prepared.category}", unit="img", enabled=progress)
    try:
        for start in range(0, n, settings.batch_size):
            stop = min(n, start + settings.batch_size)
            images = torch.from_numpy(np.ascontiguousarray(prepared.images[start:stop]))
            feature_images = (None if prepared.feature_images is None
                              else torch.from_numpy(np.ascontiguousarray(prepared.feature_images[start:stop])))
            batch = score_batch(model, images, prepared.category, settings, alpha=alpha,
                                calibration=calibration, generator=generator, feature_images=feature_images)
            extra_scores = {name: image_scores(m, settings) for name, m in batch.ablation_maps.items()}
            for j in range(stop - start):
                i = start + j
                yield ScoreRecord(
                    rel_path=prepared.rel_paths[i],
                    defect_type=prepared.defect_types[i],
                    label=int(prepared.labels[i]),
                    image_score=float(batch.image_score[j]),
                    anomaly_map=batch.anomaly[j].numpy().astype(np.float32),
                    kl_map=batch.components.kl[j].numpy().astype(np.float32),
                    feature_map=batch.components.feature[j].numpy().astype(np.float32),
                    mask=np.asarray(prepared.masks[i], dtype=np.uint8),
                    category=prepared.category,
                    alpha=alpha,
                    ablation_scores={name: float(sc[j]) for name, sc in extra_scores.items()},
                    ablation_maps={name: m[j].numpy().astype(np.float32)
                                   for name, m in batch.ablation_maps.items()},
                )
            bar.update(stop - start)
    finally:
        bar.close()
