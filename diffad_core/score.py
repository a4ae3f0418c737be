"""Anomaly maps and image scores (METHOD.md §3, Eq. 11) and the per-category alpha ("Ours*").

For each scoring timestep t (an index into the respaced chain) the clean image x0 is noised
to x_t = q_sample(x0, t, eps) and the UNet is run once; all timesteps of a batch go through one
forward pass (B * |T|). Two maps come out of that pass:

- the KL map: ``KL(q(x_{t-1}|x_t,x0) || p_theta(x_{t-1}|x_t))`` per pixel and channel, in bits,
  normalised per image by its own mean and std over C x H x W;
- the feature map: ``mean_c (F_hat(x_t, t) - F(x0))^2`` at H/4, upsampled bilinearly.

Both are averaged over t (and the KL map over channels) and combined as
``A = alpha * KL_norm + (1 - alpha) * feature``. The image score is the mean of the top-k
pixels of A. No Gaussian smoothing.
"""

from __future__ import annotations

import math
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import numpy as np
import torch
import torch.nn.functional as F

if TYPE_CHECKING:
    from diffad_core.config import DiffadConfig
    from diffad_core.data import PreparedSplit
    from diffad_core.train import DiffadModel

ABLATIONS: tuple[str, ...] = ("kl", "feature", "rgb", "padim")
ALPHA_SOURCE = "synthetic anomalies on held-out train/good"


@dataclass
class ScoreBatch:
    """Maps of one batch, all (B, H, W) float32 on CPU; ``image_score`` is (B,).

    ``padim_map`` is only computed when the "padim" ablation is asked for (else None).
    """

    anomaly_map: torch.Tensor
    kl_map: torch.Tensor
    feature_map: torch.Tensor
    rgb_map: torch.Tensor
    image_score: torch.Tensor
    padim_map: torch.Tensor | None = None


@dataclass
class ScoreRecord:
    """One scored test image (what results.py writes as one parquet row)."""

    rel_path: str
    defect_type: str
    label: int
    image_score: float
    anomaly_map: np.ndarray  # (H, W) float32
    kl_map: np.ndarray  # (H, W) float32, normalised KL averaged over t and channels
    feature_map: np.ndarray  # (H, W) float32
    mask: np.ndarray  # (H, W) uint8 {0, 1}
    category: str = ""
    alpha: float = 0.5
    ablation_scores: dict[str, float] = field(default_factory=dict)  # scorer -> image score
    ablation_maps: dict[str, np.ndarray] = field(default_factory=dict)  # scorer -> (H, W) map


@dataclass
class AlphaChoice:
    """The alpha chosen for one category on the synthetic-anomaly validation split."""

    alpha: float
    grid: list[float]
    validation_pro: dict[float, float]
    validation_pixel_auroc: dict[float, float] = field(default_factory=dict)
    source: str = ALPHA_SOURCE
    n_validation_images: int = 0

    def to_dict(self) -> dict[str, Any]:
        return {
            "alpha": self.alpha,
            "grid": list(self.grid),
            "validation_pro": {str(a): v for a, v in self.validation_pro.items()},
            "validation_pixel_auroc": {str(a): v for a, v in self.validation_pixel_auroc.items()},
            "source": self.source,
            "n_validation_images": self.n_validation_images,
        }


# ----------------------------------------------------------------------------- small helpers
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


def _normalise_per_image(x: torch.Tensor) -> torch.Tensor:
    """(N, C, H, W) -> same, with mean 0 and std 1 over C x H x W of each item (§3, KL map)."""
    flat = x.reshape(x.shape[0], -1)
    mean = flat.mean(dim=1)
    std = flat.std(dim=1, unbiased=False).clamp_min(1e-12)
    shape = (-1,) + (1,) * (x.dim() - 1)
    return (x - mean.view(shape)) / std.view(shape)


def _resolve_top_k(cfg: DiffadConfig, hw: tuple[int, int]) -> int:
    return int(cfg.score.top_k) if cfg.score.top_k else default_top_k(hw)


def _timestep_map(model: DiffadModel) -> torch.Tensor:
    return torch.as_tensor(model.schedule.timestep_map, dtype=torch.long)


def _class_labels(model: DiffadModel, category: str, n: int) -> torch.Tensor | None:
    """Class index per item when the UNet is class-conditional, else None."""
    if not model.cfg.unet.class_cond:
        return None
    if category not in model.class_index:
        known = ", ".join(sorted(model.class_index)) or "none"
        raise ValueError(
            f"category {category!r} is not one the model was trained on (known: {known})"
        )
    return torch.full((n,), int(model.class_index[category]), dtype=torch.long, device=model.device)


def _autocast(model: DiffadModel) -> Any:
    from diffad_core.train import autocast_context

    return autocast_context(model.device, model.cfg.train.amp)


def _check_images(images: torch.Tensor, what: str = "images") -> None:
    if images.dim() != 4 or images.shape[1] != 3:
        raise ValueError(f"{what} must be (B, 3, H, W), got shape {tuple(images.shape)}")


# ----------------------------------------------------------------------------- Eq. 11
@torch.no_grad()
def _component_maps(
    model: DiffadModel, images: torch.Tensor, category: str, generator: torch.Generator | None
) -> dict[str, torch.Tensor]:
    """KL (normalised), feature and RGB maps of a batch, averaged over T; (B, H, W) float32."""
    from diffad_core.diffusion import normal_kl, p_mean_variance, q_posterior, q_sample

    _check_images(images)
    cfg = model.cfg
    device = model.device
    b, _, h, w = images.shape
    steps = [int(t) for t in cfg.diffusion.score_timesteps]
    n_t = len(steps)
    if n_t == 0:
        raise ValueError("diffusion.score_timesteps is empty")
    n_chain = len(model.schedule.timestep_map)
    for t in steps:
        if not 0 <= t < n_chain:
            raise ValueError(f"score timestep {t} is outside the respaced chain (0..{n_chain - 1})")

    x0 = images.to(device=device, dtype=torch.float32)
    # Batch layout: t-major, so rows [i*B:(i+1)*B] are all images at steps[i].
    x0_rep = x0.repeat(n_t, 1, 1, 1)
    t_idx = torch.tensor(steps, dtype=torch.long).repeat_interleave(b).to(device)
    # Noise from a CPU generator so a seed gives the same maps on every device.
    noise = torch.randn(x0_rep.shape, generator=generator, dtype=torch.float32).to(device)
    x_t = q_sample(model.schedule, x0_rep, t_idx, noise)
    # ours: the UNet gets the ORIGINAL step everywhere; the quirk feeds the unmapped index.
    t_model = t_idx if cfg.score.official_timestep_quirk else _timestep_map(model).to(device)[t_idx]
    y = _class_labels(model, category, x_t.shape[0])

    with _autocast(model):
        model_out, feat_hat = model.unet(x_t, t_model, y)
        feat_target = model.feature_target(x0)
    model_out = model_out.float()
    feat_hat = feat_hat.float()
    feat_target = feat_target.float()

    # KL(q(x_{t-1}|x_t,x0) || p(x_{t-1}|x_t)) in bits, model mean from the clipped x0 prediction.
    out = p_mean_variance(model.schedule, model_out, x_t, t_idx, clip=True)
    q_mean, _, q_log_var = q_posterior(model.schedule, x0_rep, x_t, t_idx)
    kl = normal_kl(q_mean, q_log_var, out["mean"], out["log_var"]) / math.log(2.0)
    kl = _normalise_per_image(kl.float())  # over C x H x W of each (image, t)
    kl_map = kl.mean(dim=1).view(n_t, b, h, w).mean(dim=0)

    # Feature map: squared error over the C_f channels at H/4, bilinear up to H x W.
    if feat_hat.shape[1:] != feat_target.shape[1:]:
        raise ValueError(
            f"UNet feature head gives {tuple(feat_hat.shape[1:])} but the feature target "
            f"gives {tuple(feat_target.shape[1:])}"
        )
    err = (feat_hat - feat_target.repeat(n_t, 1, 1, 1)).pow(2).mean(dim=1, keepdim=True)
    err = F.interpolate(err, size=(h, w), mode="bilinear", align_corners=False)
    feature_map = err[:, 0].view(n_t, b, h, w).mean(dim=0)

    # RGB reconstruction error |x0_hat - x0| (ablation scorer).
    rgb = (out["pred_x0"].float() - x0_rep).abs().mean(dim=1)
    rgb_map = rgb.view(n_t, b, h, w).mean(dim=0)
    return {"kl": kl_map.cpu(), "feature": feature_map.cpu(), "rgb": rgb_map.cpu()}


@torch.no_grad()
def _padim_map(model: DiffadModel, images: torch.Tensor) -> torch.Tensor:
    """PaDiM Mahalanobis map upsampled to H x W (ablation scorer); (B, H, W) on CPU."""
    x0 = images.to(device=model.device, dtype=torch.float32)
    m = model.padim.score_map(x0).float().unsqueeze(1)
    m = F.interpolate(m, size=images.shape[-2:], mode="bilinear", align_corners=False)
    return m[:, 0].cpu()


def _combine(kl_map: torch.Tensor, feature_map: torch.Tensor, alpha: float) -> torch.Tensor:
    """Eq. 11: A = alpha * KL_norm + (1 - alpha) * feature."""
    return alpha * kl_map + (1.0 - alpha) * feature_map


def score_batch(
    model: DiffadModel,
    images: torch.Tensor,
    category: str,
    alpha: float | None = None,
    generator: torch.Generator | None = None,
) -> ScoreBatch:
    """Score a batch of images in [-1, 1] (B, 3, H, W) with Eq. 11 (METHOD.md §3).

    ``alpha`` None takes ``cfg.score.alpha``. ``generator`` (a CPU torch.Generator) seeds the
    forward-process noise, so the same seed gives identical maps.
    """
    cfg = model.cfg
    a = float(cfg.score.alpha if alpha is None else alpha)
    if not 0.0 <= a <= 1.0:
        raise ValueError(f"alpha must be in [0, 1], got {a}")
    maps = _component_maps(model, images, category, generator)
    anomaly = _combine(maps["kl"], maps["feature"], a)
    k = _resolve_top_k(cfg, tuple(anomaly.shape[-2:]))
    padim = _padim_map(model, images) if "padim" in cfg.score.ablations else None
    return ScoreBatch(
        anomaly_map=anomaly,
        kl_map=maps["kl"],
        feature_map=maps["feature"],
        rgb_map=maps["rgb"],
        image_score=top_k_mean(anomaly, k),
        padim_map=padim,
    )


def _ablation_map(batch: ScoreBatch, name: str) -> torch.Tensor:
    if name == "kl":
        return batch.kl_map
    if name == "feature":
        return batch.feature_map
    if name == "rgb":
        return batch.rgb_map
    if name == "padim" and batch.padim_map is not None:
        return batch.padim_map
    raise ValueError(f"unknown or missing ablation scorer {name!r}; choose from {ABLATIONS}")


def score_split(
    model: DiffadModel,
    prepared: PreparedSplit,
    *,
    alpha: float | None = None,
    batch_size: int | None = None,
    seed: int | None = None,
    progress: bool = True,
) -> Iterator[ScoreRecord]:
    """Score every image of a prepared split, yielding one ScoreRecord at a time (streaming).

    Only one batch of maps is held in memory. ``batch_size`` and ``seed`` default to
    ``cfg.score.batch_size`` and ``cfg.seed``.
    """
    from tqdm.auto import tqdm

    cfg = model.cfg
    a = float(cfg.score.alpha if alpha is None else alpha)
    bs = int(batch_size or cfg.score.batch_size)
    if bs < 1:
        raise ValueError(f"batch_size must be >= 1, got {bs}")
    generator = torch.Generator().manual_seed(int(cfg.seed if seed is None else seed))
    n = len(prepared.labels)
    ablations = list(cfg.score.ablations)
    k = None
    bar = tqdm(total=n, desc=f"score {prepared.category}", unit="img", disable=not progress)
    try:
        for start in range(0, n, bs):
            stop = min(n, start + bs)
            images = torch.from_numpy(np.ascontiguousarray(prepared.images[start:stop]))
            batch = score_batch(model, images, prepared.category, a, generator)
            if k is None:
                k = _resolve_top_k(cfg, tuple(batch.anomaly_map.shape[-2:]))
            extra_maps = {name: _ablation_map(batch, name) for name in ablations}
            extra_scores = {name: top_k_mean(m, k) for name, m in extra_maps.items()}
            for j in range(stop - start):
                i = start + j
                yield ScoreRecord(
                    rel_path=prepared.rel_paths[i],
                    defect_type=prepared.defect_types[i],
                    label=int(prepared.labels[i]),
                    image_score=float(batch.image_score[j]),
                    anomaly_map=batch.anomaly_map[j].numpy().astype(np.float32),
                    kl_map=batch.kl_map[j].numpy().astype(np.float32),
                    feature_map=batch.feature_map[j].numpy().astype(np.float32),
                    mask=np.asarray(prepared.masks[i], dtype=np.uint8),
                    category=prepared.category,
                    alpha=a,
                    ablation_scores={name: float(s[j]) for name, s in extra_scores.items()},
                    ablation_maps={name: m[j].numpy().astype(np.float32)
                                   for name, m in extra_maps.items()},
                )
            bar.update(stop - start)
    finally:
        bar.close()


# ----------------------------------------------------------------------------- "Ours*"
def _ellipse_mask(h: int, w: int, rng: np.random.Generator) -> np.ndarray:
    cy, cx = rng.uniform(0.2, 0.8) * h, rng.uniform(0.2, 0.8) * w
    ry, rx = rng.uniform(0.06, 0.18) * h, rng.uniform(0.06, 0.18) * w
    theta = rng.uniform(0, np.pi)
    yy, xx = np.mgrid[0:h, 0:w].astype(np.float64)
    dy, dx = yy - cy, xx - cx
    u = dx * np.cos(theta) + dy * np.sin(theta)
    v = -dx * np.sin(theta) + dy * np.cos(theta)
    return ((u / rx) ** 2 + (v / ry) ** 2) <= 1.0


def _scratch_mask(h: int, w: int, rng: np.random.Generator) -> np.ndarray:
    y0, x0 = rng.uniform(0.15, 0.85) * h, rng.uniform(0.15, 0.85) * w
    angle = rng.uniform(0, np.pi)
    length = rng.uniform(0.3, 0.6) * min(h, w)
    width = max(1.0, rng.uniform(0.015, 0.04) * min(h, w))
    yy, xx = np.mgrid[0:h, 0:w].astype(np.float64)
    d = np.array([np.sin(angle), np.cos(angle)])
    along = (yy - y0) * d[0] + (xx - x0) * d[1]
    across = -(yy - y0) * d[1] + (xx - x0) * d[0]
    return (np.abs(along) <= length / 2) & (np.abs(across) <= width / 2)


def _rect_mask(h: int, w: int, rng: np.random.Generator) -> tuple[np.ndarray, tuple[int, int, int, int]]:
    ph, pw = int(rng.uniform(0.12, 0.3) * h) or 1, int(rng.uniform(0.12, 0.3) * w) or 1
    y, x = int(rng.integers(0, h - ph + 1)), int(rng.integers(0, w - pw + 1))
    m = np.zeros((h, w), dtype=bool)
    m[y:y + ph, x:x + pw] = True
    return m, (y, x, ph, pw)


def synthesize_anomalies(
    images: np.ndarray, seed: int
) -> tuple[np.ndarray, np.ndarray]:
    """Paste one synthetic defect into every image; returns (images, masks) with exact masks.

    ``images``: (N, 3, H, W) float32 in [-1, 1]. Defect kinds, chosen in turn: a cut-paste
    patch taken from another image (flipped, from a different place), a colour stain and a
    scratch. Deterministic for a given seed. Masks are uint8 {0, 1} (N, H, W) and mark exactly
    the changed pixels.
    """
    if images.ndim != 4 or images.shape[1] != 3:
        raise ValueError(f"images must be (N, 3, H, W), got shape {images.shape}")
    rng = np.random.default_rng(seed)
    n, _, h, w = images.shape
    out = images.astype(np.float32, copy=True)
    masks = np.zeros((n, h, w), dtype=np.uint8)
    for i in range(n):
        kind = i % 3
        if kind == 0:
            m, (y, x, ph, pw) = _rect_mask(h, w, rng)
            src = int(rng.integers(0, n)) if n > 1 else i
            sy, sx = int(rng.integers(0, h - ph + 1)), int(rng.integers(0, w - pw + 1))
            patch = images[src, :, sy:sy + ph, sx:sx + pw][:, ::-1, ::-1]
            # Shift the patch's intensity so it is a defect even on a periodic texture.
            patch = np.clip(patch * rng.uniform(0.5, 0.8) + rng.uniform(-0.5, 0.5), -1, 1)
            out[i, :, y:y + ph, x:x + pw] = patch
        elif kind == 1:
            m = _ellipse_mask(h, w, rng)
            colour = rng.uniform(-1, 1, size=(3, 1)).astype(np.float32)
            strength = rng.uniform(0.6, 0.9)
            region = out[i][:, m]
            out[i][:, m] = (1 - strength) * region + strength * colour
        else:
            m = _scratch_mask(h, w, rng)
            value = np.float32(rng.choice([-1.0, 1.0]) * rng.uniform(0.7, 1.0))
            out[i][:, m] = value
        # Keep the mask exact: only pixels that really changed are anomalous.
        changed = np.abs(out[i] - images[i]).max(axis=0) > 1e-6
        masks[i] = (m & changed).astype(np.uint8)
    return out, masks


def _better(cand: tuple[float, float, float], best: tuple[float, float, float]) -> bool:
    """Order (pro, auroc, -|alpha - 0.5|) with a small tolerance on the metrics."""
    tol = 1e-9
    for c, b in zip(cand, best, strict=True):
        if c > b + tol:
            return True
        if c < b - tol:
            return False
    return False


def choose_alpha(
    model: DiffadModel,
    cfg: DiffadConfig | None = None,
    category: str | None = None,
    *,
    progress: bool = False,
) -> AlphaChoice:
    """"Ours*": choose alpha from ``cfg.score.alpha_grid`` on a validation split (never test).

    The validation split is the held-out normal training images (the indices the trainer
    excluded, ``train.split_train_validation``) plus a copy of each with a synthetic defect
    pasted in. Each image is scored once; the maps are recombined for every alpha. The alpha
    with the best validation PRO wins; ties go to pixel AUROC, then to the alpha nearest 0.5.
    """
    from diffad_core.data import prepare_split
    from diffad_core.metrics import pixel_auroc, pro_score
    from diffad_core.train import split_train_validation

    cfg = cfg or model.cfg
    if category is None:
        raise ValueError("choose_alpha needs a category")
    grid = [float(a) for a in cfg.score.alpha_grid]
    if not grid:
        raise ValueError("score.alpha_grid is empty")
    train = prepare_split(cfg, category, "train")
    held_out = (model.meta or {}).get("held_out", {}) if isinstance(model.meta, dict) else {}
    if held_out.get(category):
        # The exact indices the trainer excluded (recorded in the checkpoint's meta.json).
        val_idx = [int(i) for i in held_out[category]]
        note = ""
    else:
        val_idx = [int(i) for i in split_train_validation(len(train.labels), cfg)[1]]
        note = "; the model was trained without holding them out (train with score.alpha_per_category)"
    if not val_idx:
        raise ValueError(
            f"no held-out training images for category {category!r} "
            f"(score.validation_fraction={cfg.score.validation_fraction}); cannot choose alpha"
        )
    normal = np.asarray(train.images[val_idx], dtype=np.float32)
    anomalous, anomaly_masks = synthesize_anomalies(normal, seed=int(cfg.seed) + 7919)
    images = np.concatenate([normal, anomalous], axis=0)
    masks = np.concatenate([np.zeros_like(anomaly_masks), anomaly_masks], axis=0)

    generator = torch.Generator().manual_seed(int(cfg.seed))
    bs = int(cfg.score.batch_size)
    kl_parts, feat_parts = [], []
    for start in range(0, len(images), bs):
        batch = torch.from_numpy(np.ascontiguousarray(images[start:start + bs]))
        maps = _component_maps(model, batch, category, generator)
        kl_parts.append(maps["kl"])
        feat_parts.append(maps["feature"])
    kl = torch.cat(kl_parts).numpy()
    feat = torch.cat(feat_parts).numpy()

    pro: dict[float, float] = {}
    auroc: dict[float, float] = {}
    best_alpha, best_key = grid[0], (-math.inf, -math.inf, -math.inf)
    for a in grid:
        a_map = (a * kl + (1.0 - a) * feat).astype(np.float32)
        pro[a] = float(pro_score(a_map, masks, fpr_limit=cfg.metrics.pro_fpr_limit))
        auroc[a] = float(pixel_auroc(a_map, masks))
        key = (pro[a], auroc[a], -abs(a - 0.5))
        if _better(key, best_key):
            best_alpha, best_key = a, key
    return AlphaChoice(
        alpha=best_alpha,
        grid=grid,
        validation_pro=pro,
        validation_pixel_auroc=auroc,
        source=f"{ALPHA_SOURCE} ({len(val_idx)} normal + {len(val_idx)} synthetic images{note})",
        n_validation_images=len(images),
    )
