"""Held-out normal training images: map calibration and the per-category alpha ("Ours*").

Both use only train/good images the trainer left out (``model.held_out``), never the test
set: the calibration standardises the KL and feature maps by their statistics on those normals
(ours, issue #8); "Ours*" (METHOD.md §3) also pastes a synthetic defect into a copy of each and
picks the alpha of Eq. 11 with the best PRO on that validation set.

Both are recorded with the model (``ScoringFit``, a JSON file per category and scoring
settings in the checkpoint folder), so a model scores new images without its training data.
"""

from __future__ import annotations

import hashlib
import io
import json
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from PIL import Image
from scipy import ndimage

from diffad_core._atomic import atomic_write_text
from diffad_core.config import DiffadConfig
from diffad_core.data import PreparedSplit, prepare_split
from diffad_core.data.io import load_mask, load_model_images
from diffad_core.data.synth.defects import paint_defects
from diffad_core.metrics import pixel_auroc, pro_score
from diffad_core.model import DiffadModel
from diffad_core.overlay import to_uint8_image
from diffad_core.score import (
    ComponentMaps,
    FeatureWhitening,
    MapCalibration,
    PositionMaps,
    anomaly_map,
    component_maps,
    feature_term,
    fit_feature_whitening,
)

ALPHA_SOURCE = "synthetic anomalies on held-out train/good"
SCORING_FIT_FOLDER = "scoring"
_MIN_SPREAD = 1e-12  # a spread of normal maps never divides by less


class ValidationError(ValueError):
    """The model holds no held-out normals to calibrate or choose alpha on."""


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

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> AlphaChoice:
        return cls(alpha=float(data["alpha"]), grid=[float(a) for a in data["grid"]],
                   validation_pro={float(a): float(v) for a, v in data["validation_pro"].items()},
                   validation_pixel_auroc={float(a): float(v)
                                           for a, v in data["validation_pixel_auroc"].items()},
                   source=str(data["source"]), n_validation_images=int(data["n_validation_images"]))


def held_out_normals(model: DiffadModel, cfg: DiffadConfig, category: str) -> PreparedSplit:
    """The category's held-out train/good images (with ``feature_images`` when the model's
    target is computed at its own size)."""
    idx = model.held_out(category)
    if not idx:
        raise ValidationError(
            f"the model of {category!r} was trained without held-out normal images; train it with "
            "score.calibrate_maps=true or score.alpha_per_category=true (score.validation_fraction > 0)")
    return prepare_split(cfg, category, "train").subset(np.asarray(idx))


def _maps_of(model: DiffadModel, cfg: DiffadConfig, category: str, images: np.ndarray,
             feature_images: np.ndarray | None = None, *, whitening: FeatureWhitening | None = None,
             with_residual: bool = False) -> ComponentMaps:
    generator = torch.Generator().manual_seed(int(cfg.seed))
    parts = []
    for start in range(0, len(images), cfg.score.batch_size):
        rows = slice(start, start + cfg.score.batch_size)
        batch = torch.from_numpy(np.ascontiguousarray(images[rows]))
        targets = None if feature_images is None else torch.from_numpy(np.ascontiguousarray(feature_images[rows]))
        parts.append(component_maps(model, batch, category, cfg.score, generator, feature_images=targets,
                                    whitening=whitening, with_residual=with_residual))
    return ComponentMaps.concatenated(parts)


def calibrate(model: DiffadModel, cfg: DiffadConfig, category: str) -> MapCalibration:
    """Mean and std of each Eq. 11 term over every pixel of the held-out normal images; with
    ``score.feature_whitening``, first the residual's weights from the same images and maps
    (the feature statistics are then those of the weighted term); per-position means with
    ``score.position_mean_sigma``, spreads per distance from the edge with
    ``score.edge_spread_width``."""
    normal = held_out_normals(model, cfg, category)
    kind = cfg.score.feature_whitening
    maps = _maps_of(model, cfg, category, normal.images, normal.feature_images,
                    with_residual=kind != "none")
    whitening, feature = None, maps.feature
    if kind != "none":
        whitening = fit_feature_whitening(maps.feature_residual, kind)
        feature = feature_term(maps.feature_residual, whitening, tuple(maps.feature.shape[-2:]))
    sigma, width = cfg.score.position_mean_sigma, cfg.score.edge_spread_width
    means = None if sigma is None else PositionMaps(kl=_position_mean(maps.kl, sigma),
                                                    feature=_position_mean(feature, sigma))
    kl_centred = maps.kl - (maps.kl.mean() if means is None else means.kl)
    feature_centred = feature - (feature.mean() if means is None else means.feature)
    spreads = None if width is None else PositionMaps(kl=_edge_spread(kl_centred, width),
                                                      feature=_edge_spread(feature_centred, width))
    return MapCalibration(
        kl_mean=float(maps.kl.mean()), kl_std=max(float(kl_centred.std()), _MIN_SPREAD),
        feature_mean=float(feature.mean()), feature_std=max(float(feature_centred.std()), _MIN_SPREAD),
        n_images=len(normal), whitening=whitening, position_means=means, position_spreads=spreads,
    )


def _edge_spread(centred: torch.Tensor, width: int) -> torch.Tensor:
    """(H, W): the std over images and pixels of centred (N, H, W) maps at each distance d from
    the nearest edge for d < ``width`` px at a 64 px map (scaled with the maps' side), and one
    std over every pixel further in."""
    h, w = centred.shape[-2:]
    rings = max(1, int(round(width * w / 64)))
    ys, xs = torch.arange(h).view(-1, 1), torch.arange(w).view(1, -1)
    ring = torch.minimum(torch.minimum(ys, h - 1 - ys), torch.minimum(xs, w - 1 - xs)).clamp_max(rings)
    spread = torch.empty(h, w)
    for r in ring.unique().tolist():
        at = ring == r
        spread[at] = max(float(centred[:, at].std()), _MIN_SPREAD)
    return spread


def _position_mean(maps: torch.Tensor, sigma: float) -> torch.Tensor:
    """The mean over images of (N, H, W) maps per position, blurred by a Gaussian of ``sigma``
    px at a 64 px map, scaled with the maps' side (0: not blurred)."""
    mean = maps.double().mean(dim=0).numpy()
    if sigma > 0:
        mean = ndimage.gaussian_filter(mean, sigma * mean.shape[-1] / 64, mode="nearest")
    return torch.from_numpy(np.ascontiguousarray(mean)).float()


def _as_read_from_files(images: np.ndarray, masks: np.ndarray,
                        size: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Painted images in [-1, 1] (N, 3, S, S) and their masks as ``prepare_split`` would read
    them from 8-bit PNG files: the images as they are and at ``size``, the masks at ``size``."""
    image_files = [_png(to_uint8_image(image)) for image in images]
    small_masks = np.stack([load_mask(f"synthetic defect mask {i}", size, data=_png(mask * np.uint8(255)))
                            for i, mask in enumerate(masks)])
    return load_model_images(image_files, None), load_model_images(image_files, size), small_masks


def _png(array: np.ndarray) -> bytes:
    buffer = io.BytesIO()
    Image.fromarray(array).save(buffer, format="PNG")
    return buffer.getvalue()


def _better(cand: tuple[float, float, float], best: tuple[float, float, float]) -> bool:
    """Order (pro, auroc, -|alpha - 0.5|) with a small tolerance on the metrics."""
    tol = 1e-9
    for c, b in zip(cand, best, strict=True):
        if c > b + tol:
            return True
        if c < b - tol:
            return False
    return False


def choose_alpha(model: DiffadModel, cfg: DiffadConfig, category: str,
                 calibration: MapCalibration | None = None) -> AlphaChoice:
    """"Ours*": the alpha of ``cfg.score.alpha_grid`` with the best PRO on the held-out normals
    plus a copy of each with a synthetic defect (painted at ``features.image_size`` when the
    target is computed there); ties go to pixel AUROC, then to the alpha nearest 0.5. Each
    image is scored once; the maps are recombined for every alpha."""
    grid = [float(a) for a in cfg.score.alpha_grid]
    if not grid:
        raise ValueError("score.alpha_grid is empty")
    held_out = held_out_normals(model, cfg, category)
    normal, seed = held_out.images, int(cfg.seed) + 7919
    if held_out.feature_images is None:
        anomalous, anomaly_masks = paint_defects(normal, seed=seed)
        feature_images = None
    else:
        # The defects are painted where the target looks (features.image_size); the UNet's
        # image is derived from the painted one as prepare_split derives it from a file.
        painted, painted_masks = paint_defects(held_out.feature_images, seed=seed)
        large, anomalous, anomaly_masks = _as_read_from_files(painted, painted_masks, cfg.data.image_size)
        feature_images = np.concatenate([held_out.feature_images, large], axis=0)
    images = np.concatenate([normal, anomalous], axis=0)
    masks = np.concatenate([np.zeros_like(anomaly_masks), anomaly_masks], axis=0)
    maps = _maps_of(model, cfg, category, images, feature_images,
                    whitening=calibration.whitening if calibration else None)

    pro: dict[float, float] = {}
    auroc: dict[float, float] = {}
    best_alpha, best_key = grid[0], (-math.inf, -math.inf, -math.inf)
    for a in grid:
        a_map = anomaly_map(maps, a, calibration, cfg.score.two_sided_terms).numpy().astype(np.float32)
        pro[a] = float(pro_score(a_map, masks, fpr_limit=cfg.metrics.pro_fpr_limit))
        auroc[a] = float(pixel_auroc(a_map, masks))
        key = (pro[a], auroc[a], -abs(a - 0.5))
        if _better(key, best_key):
            best_alpha, best_key = a, key
    return AlphaChoice(
        alpha=best_alpha, grid=grid, validation_pro=pro, validation_pixel_auroc=auroc,
        source=f"{ALPHA_SOURCE} ({len(normal)} normal + {len(normal)} synthetic images)",
        n_validation_images=len(images),
    )


@dataclass(frozen=True)
class ScoringFit:
    """What one category's scoring learned from its held-out normals: the map calibration
    (with ``score.calibrate_maps``) and the "Ours*" alpha (with ``score.alpha_per_category``);
    either is None when not asked for."""

    calibration: MapCalibration | None = None
    alpha_choice: AlphaChoice | None = None

    def to_dict(self) -> dict[str, Any]:
        return {"calibration": self.calibration.to_dict() if self.calibration else None,
                "alpha_choice": self.alpha_choice.to_dict() if self.alpha_choice else None}

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> ScoringFit:
        cal, choice = data.get("calibration"), data.get("alpha_choice")
        return cls(calibration=MapCalibration.from_dict(cal) if cal else None,
                   alpha_choice=AlphaChoice.from_dict(choice) if choice else None)


def needs_scoring_fit(cfg: DiffadConfig) -> bool:
    return bool(cfg.score.calibrate_maps or cfg.score.alpha_per_category)


# Scoring settings added after fits were first recorded, with the value every earlier fit was
# made under: hashed only when set otherwise, so the fits of models trained and registered
# before they existed keep their keys.
_SETTINGS_AFTER_THE_FIRST_FITS = {"feature_whitening": "none", "noise_draws": 1, "image_score_center": "none",
                                  "position_mean_sigma": None, "kl_scale": "per_image",
                                  "edge_spread_width": None, "two_sided_terms": []}


def _scoring_fit_path(folder: Path, cfg: DiffadConfig, category: str) -> Path:
    """``<checkpoint>/scoring/<category>-<key>.json``: the key hashes every scoring setting and
    the seed, so a fit is reused only under the settings it was made with."""
    score = {key: value for key, value in cfg.score.model_dump(mode="json").items()
             if _SETTINGS_AFTER_THE_FIRST_FITS.get(key, object()) != value}
    blob = json.dumps({"score": score, "seed": cfg.seed}, sort_keys=True, separators=(",", ":"))
    key = hashlib.sha256(blob.encode()).hexdigest()[:16]
    return Path(folder) / SCORING_FIT_FOLDER / f"{category}-{key}.json"


def recorded_scoring_fit(model: DiffadModel, cfg: DiffadConfig, category: str) -> ScoringFit | None:
    """The fit recorded with the model for ``cfg.score``; None when there is none."""
    if not needs_scoring_fit(cfg):
        return ScoringFit()
    if model.folder is None:
        return None
    path = _scoring_fit_path(model.folder, cfg, category)
    if not path.is_file():
        return None
    try:
        return ScoringFit.from_dict(json.loads(path.read_text()))
    except (ValueError, KeyError, TypeError) as exc:
        raise ValidationError(f"scoring fit {path} is unreadable ({exc}); delete it to refit") from exc


def fit_scoring(model: DiffadModel, cfg: DiffadConfig, category: str) -> ScoringFit:
    """Calibrate the maps and choose alpha as ``cfg.score`` asks, and record the result in the
    model's checkpoint folder. Needs the category's training images."""
    calibration = calibrate(model, cfg, category) if cfg.score.calibrate_maps else None
    choice = choose_alpha(model, cfg, category, calibration) if cfg.score.alpha_per_category else None
    fit = ScoringFit(calibration=calibration, alpha_choice=choice)
    if model.folder is not None and needs_scoring_fit(cfg):
        atomic_write_text(_scoring_fit_path(model.folder, cfg, category),
                          json.dumps(fit.to_dict(), indent=2, sort_keys=True))
    return fit
