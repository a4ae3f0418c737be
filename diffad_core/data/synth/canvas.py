"""The scene model and pixel-grid helpers shared by the scene renderers and defect painters."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
from scipy import ndimage


@dataclass
class Scene:
    """A clean normal image plus what defects need to know about it."""

    image: np.ndarray  # (H, W, C) float32 in [0, 1]
    fg: np.ndarray  # (H, W) bool: where defects may be placed (the object; all for textures)
    backing: np.ndarray  # (H, W, C): what shows through a hole or cut


def grid(shape: tuple[int, int]) -> tuple[np.ndarray, np.ndarray]:
    """Pixel-centre coordinates (y, x) in pixels, float32."""
    yy, xx = np.mgrid[0:shape[0], 0:shape[1]].astype(np.float32)
    return yy + 0.5, xx + 0.5


def smooth_noise(rng: np.random.Generator, shape: tuple[int, int], sigma: float) -> np.ndarray:
    """Gaussian-filtered white noise with unit standard deviation (periodic)."""
    field = ndimage.gaussian_filter(rng.standard_normal(shape).astype(np.float32),
                                    sigma=max(sigma, 0.5), mode="wrap")
    return (field / (field.std() + 1e-8)).astype(np.float32)


def dark_backing(rng: np.random.Generator, size: int, channels: int) -> np.ndarray:
    """What shows through a hole in a texture or photo: a dark, faintly mottled surface."""
    base = rng.uniform(0.05, 0.10)
    img = base + 0.02 * smooth_noise(rng, (size, size), 3.0)[..., None] \
        + rng.normal(0, 0.01, (size, size, channels))
    return np.clip(img, 0, 1).astype(np.float32)
