"""The synthetic categories: renderers of clean normal scenes and their foreign material.

Two textures ("weave": a procedural plain weave; "gravel": crops of scikit-image's bundled
CC0 gravel photo) and two objects ("washer": an RGB hex nut on a dark background; "bolt": a
GRAYSCALE screw on a light background, saved as 1-channel PNG like MVTec's screw): the default
four. Four more are cut from other photographs (``photos``: moon, tissue, cameraman, retina),
the photo tuning family, generated only when asked for by name.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass
from functools import lru_cache

import numpy as np
import skimage.data
from PIL import Image

from diffad_core.data.synth.canvas import Scene, dark_backing, grid, smooth_noise
from diffad_core.data.synth.defects import ANY_IMAGE_DEFECTS
from diffad_core.data.synth.photos import PHOTO_CATEGORIES

# Defect types per category (MVTec does not give every category every type either).
CATEGORY_DEFECTS: dict[str, tuple[str, ...]] = {
    "weave": ("bend", "hole", "patch", "scratch", "stain"),
    "gravel": ("hole", "patch", "scratch", "stain"),
    "washer": ("bend", "hole", "patch", "scratch", "stain"),
    "bolt": ("bend", "cut", "scratch", "stain"),
    **{name: tuple(sorted(ANY_IMAGE_DEFECTS)) for name in PHOTO_CATEGORIES},
}
CATEGORY_CHANNELS: dict[str, int] = {"weave": 3, "gravel": 3, "washer": 3, "bolt": 1,
                                     **{name: spec[2] for name, spec in PHOTO_CATEGORIES.items()}}


@dataclass(frozen=True)
class Category:
    """How to draw one category: a clean scene, and foreign material for patches."""

    render: Callable[[np.random.Generator, int], Scene]
    foreign: Callable[[np.random.Generator, int], np.ndarray]  # patch material, (S, S, C)


def category_spec(category: str) -> Category:
    """The renderers of a category; ValueError for an unknown name."""
    if category not in CATEGORIES:
        raise ValueError(f"unknown synthetic category {category!r}; "
                         f"choose from {', '.join(CATEGORIES)}")
    return CATEGORIES[category]


def _resize(gray: np.ndarray, size: int) -> np.ndarray:
    """Resize a float image in [0, 1] via PIL: area averaging down, bicubic up."""
    if gray.shape[0] == size and gray.shape[1] == size:
        return gray.astype(np.float32)
    img = Image.fromarray(np.ascontiguousarray(gray, dtype=np.float32))
    resample = Image.Resampling.BOX if gray.shape[0] > size else Image.Resampling.BICUBIC
    return np.clip(np.asarray(img.resize((size, size), resample), dtype=np.float32), 0, 1)


# ----------------------------------------------------------------------------- weave
_WARP = np.array([0.80, 0.72, 0.55], np.float32)
_WEFT = np.array([0.66, 0.55, 0.40], np.float32)


def _weave_image(rng: np.random.Generator, size: int, period_scale: float = 1.0,
                 angle_deg: float = 0.0) -> np.ndarray:
    """A plain weave: threads with cylinder shading, under/over alternation, jitter."""
    period = max(4.0, 0.09 * size) * period_scale
    yy, xx = grid((size, size))
    angle = math.radians(angle_deg + rng.uniform(-2.0, 2.0))
    jitter = 0.08 * period
    u = (xx * math.cos(angle) - yy * math.sin(angle) + rng.uniform(0, period)
         + jitter * smooth_noise(rng, (size, size), 2 * period))
    v = (xx * math.sin(angle) + yy * math.cos(angle) + rng.uniform(0, period)
         + jitter * smooth_noise(rng, (size, size), 2 * period))
    cu, fu = np.divmod(u / period, 1.0)
    cv, fv = np.divmod(v / period, 1.0)
    warp_on_top = ((cu + cv) % 2) == 0
    # Per thread-segment brightness variation from a small random table.
    table = rng.normal(0.0, 0.035, size=(16, 16)).astype(np.float32)
    seg = table[cu.astype(np.int64) % 16, cv.astype(np.int64) % 16]
    across = np.where(warp_on_top, fu, fv)
    along = np.where(warp_on_top, fv, fu)
    # round thread, dark gaps between threads (clipped: float rounding can make sin(pi x) < 0)
    profile = np.clip(np.sin(np.pi * across), 0.0, None) ** 0.6
    dive = 0.78 + 0.22 * np.sin(np.pi * along)  # darker where the thread dives under
    fibre = 0.03 * np.sin(2 * np.pi * (3.0 * across + 0.3 * along))
    shade = (0.30 + 0.70 * profile) * dive + fibre + seg
    gain = rng.uniform(0.96, 1.04)
    warp_col = _WARP * gain + rng.normal(0, 0.012, 3).astype(np.float32)
    weft_col = _WEFT * gain + rng.normal(0, 0.012, 3).astype(np.float32)
    colour = np.where(warp_on_top[..., None], warp_col, weft_col)
    img = shade[..., None] * colour + rng.normal(0, 0.015, (size, size, 3))
    return np.clip(img, 0, 1).astype(np.float32)


def _render_weave(rng: np.random.Generator, size: int) -> Scene:
    return Scene(_weave_image(rng, size), np.ones((size, size), bool),
                  dark_backing(rng, size, 3))


def _foreign_weave(rng: np.random.Generator, size: int) -> np.ndarray:
    # Misaligned or mis-sized weave: from subtle (same period, turned 45 degrees) to obvious.
    return _weave_image(rng, size, period_scale=float(rng.choice([0.6, 1.0, 1.7])),
                        angle_deg=float(rng.choice([45.0, 90.0 + 20.0, 30.0])))


# ----------------------------------------------------------------------------- gravel
@lru_cache(maxsize=4)
def _skimage_texture(name: str) -> np.ndarray:
    return getattr(skimage.data, name)().astype(np.float32) / 255.0


def _texture_crop(rng: np.random.Generator, name: str, size: int, crop_frac: float) -> np.ndarray:
    """A random crop with flips, a quarter-turn and brightness jitter, resized to size."""
    src = _skimage_texture(name)
    side = int(round(src.shape[0] * crop_frac * rng.uniform(0.94, 1.06)))
    side = min(side, src.shape[0])
    y0 = int(rng.integers(0, src.shape[0] - side + 1))
    x0 = int(rng.integers(0, src.shape[1] - side + 1))
    crop = src[y0:y0 + side, x0:x0 + side]
    if rng.random() < 0.5:
        crop = crop[:, ::-1]
    crop = np.rot90(crop, int(rng.integers(0, 4)))
    crop = _resize(np.ascontiguousarray(crop), size)
    return np.clip(crop * rng.uniform(0.95, 1.05), 0, 1)


_GRAVEL_TINT = np.array([1.0, 0.90, 0.76], np.float32)


def _render_gravel(rng: np.random.Generator, size: int) -> Scene:
    gray = _texture_crop(rng, "gravel", size, 0.5)
    tint = _GRAVEL_TINT + rng.normal(0, 0.01, 3).astype(np.float32)
    img = gray[..., None] * tint + rng.normal(0, 0.01, (size, size, 3))
    return Scene(np.clip(img, 0, 1).astype(np.float32), np.ones((size, size), bool),
                  dark_backing(rng, size, 3))


def _foreign_gravel(rng: np.random.Generator, size: int) -> np.ndarray:
    if rng.random() < 0.5:  # much coarser gravel: a subtle patch
        gray = _texture_crop(rng, "gravel", size, 0.2)
        tint = _GRAVEL_TINT
    else:  # grass, greenish
        gray = _texture_crop(rng, "grass", size, 0.5)
        tint = np.array([0.70, 0.95, 0.55], np.float32)
    return np.clip(gray[..., None] * tint, 0, 1).astype(np.float32)


# ----------------------------------------------------------------------------- washer
def _coverage(sdf: np.ndarray) -> np.ndarray:
    """Anti-aliased coverage of a shape from its signed distance (pixels, < 0 inside)."""
    return np.clip(0.5 - sdf, 0.0, 1.0).astype(np.float32)


def _render_washer(rng: np.random.Generator, size: int) -> Scene:
    """A hex nut (flat top face, chamfered corners, threaded bore) on a dark background."""
    yy, xx = grid((size, size))
    cy = size / 2 + rng.normal(0, 0.012 * size)
    cx = size / 2 + rng.normal(0, 0.012 * size)
    py, px = yy - cy, xx - cx
    r = np.hypot(py, px)
    theta = np.arctan2(py, px)
    circum = 0.40 * size * rng.uniform(0.97, 1.03)
    apothem = circum * math.cos(math.pi / 6)
    rot = math.radians(rng.uniform(-10.0, 10.0))
    d_hex = np.max(np.stack([np.abs(px * math.cos(rot + math.pi / 6 + k * math.pi / 3)
                                    + py * math.sin(rot + math.pi / 6 + k * math.pi / 3))
                             for k in range(3)]), axis=0) - apothem
    r_chamfer = 0.95 * circum
    r_bore = 0.40 * circum * rng.uniform(0.98, 1.02)
    outer = np.maximum(d_hex, r - r_chamfer)
    sdf = np.maximum(outer, r_bore - r)
    alpha = _coverage(sdf)

    light = math.radians(135.0 + rng.uniform(-15.0, 15.0))
    base = 0.60 * rng.uniform(0.95, 1.05)
    tint = np.array([1.0, 0.97, 0.92], np.float32) + rng.normal(0, 0.012, 3).astype(np.float32)
    directional = np.cos(theta - light)
    face = base + 0.08 * directional + 0.03 * np.sin(2 * np.pi * r / (0.018 * size))
    # Chamfer ring near the outer edge catches the light more strongly.
    chamfer = np.clip((r - 0.80 * circum) / (0.12 * circum), 0, 1)
    face = face * (1 - chamfer) + (base + 0.22 * directional) * chamfer
    # Threaded bore rim: darker, with helical stripes.
    rim = np.clip(1.0 - (r - r_bore) / (0.18 * circum), 0, 1)
    thread = 0.30 + 0.06 * np.sin(2 * np.pi * r / (0.03 * size) + 3 * theta)
    face = face * (1 - rim) + thread * rim
    metal = face[..., None] * tint + rng.normal(0, 0.012, (size, size, 3))

    bg_level = rng.uniform(0.09, 0.12)
    background = (bg_level + 0.02 * (yy / size - 0.5)[..., None]
                  + 0.008 * smooth_noise(rng, (size, size), 4.0)[..., None]
                  + rng.normal(0, 0.008, (size, size, 3)))
    background = np.clip(background, 0, 1).astype(np.float32)
    img = alpha[..., None] * metal + (1 - alpha[..., None]) * background
    return Scene(np.clip(img, 0, 1).astype(np.float32), alpha > 0.5, background)


def _foreign_washer(rng: np.random.Generator, size: int) -> np.ndarray:
    # Foreign material stuck on the metal: dirt (gravel) or fibres (grass), tinted.
    name = "gravel" if rng.random() < 0.5 else "grass"
    gray = _texture_crop(rng, name, size, 0.35)
    tint = np.array([0.9, 0.75, 0.55], np.float32) * rng.uniform(0.7, 1.1)
    return np.clip(gray[..., None] * tint, 0, 1).astype(np.float32)


# ----------------------------------------------------------------------------- bolt
def _triangle(x: np.ndarray) -> np.ndarray:
    """Triangle wave in [0, 1] with period 1."""
    return 2.0 * np.abs(x - np.floor(x + 0.5))


def _render_bolt(rng: np.random.Generator, size: int) -> Scene:
    """A screw seen from the side: head, threaded shank, pointed tip; grayscale."""
    yy, xx = grid((size, size))
    cy = size / 2 + rng.normal(0, 0.015 * size)
    cx = size / 2 + rng.normal(0, 0.015 * size)
    ang = math.radians(rng.uniform(-12.0, 12.0))
    a = (xx - cx) * math.cos(ang) + (yy - cy) * math.sin(ang)  # along the axis
    b = -(xx - cx) * math.sin(ang) + (yy - cy) * math.cos(ang)  # across
    s = size * rng.uniform(0.98, 1.02)
    head0, head1, tip0, tip1 = -0.39 * s, -0.27 * s, 0.30 * s, 0.39 * s
    head_w, shank_w, pitch = 0.12 * s, 0.062 * s, 0.036 * s
    thread_start = -0.10 * s
    head_sdf = np.maximum(np.maximum(head0 - a, a - head1), np.abs(b) - head_w)
    threaded = a > thread_start
    phase = (a - 0.25 * b) / pitch  # slanted (helical) thread
    width = np.where(threaded, shank_w * (1.0 - 0.16 * _triangle(phase)), shank_w)
    taper = np.clip((a - tip0) / (tip1 - tip0), 0, 1)
    width = width * (1.0 - 0.85 * taper)
    shank_sdf = np.maximum(np.maximum(head1 - 1.0 - a, a - tip1), np.abs(b) - width)
    sdf = np.minimum(head_sdf, shank_sdf)
    alpha = _coverage(sdf)

    level = 0.30 * rng.uniform(0.93, 1.07)
    light = rng.uniform(-0.3, 0.3)
    across = np.clip(b / np.where(head_sdf < shank_sdf, head_w, np.maximum(width, 1e-3)), -1, 1)
    cylinder = np.sqrt(np.clip(1 - across ** 2, 0, 1))
    highlight = np.exp(-((across - light) ** 2) / 0.05)
    metal = level + 0.12 * cylinder + 0.22 * highlight
    ridges = np.where(threaded & (head_sdf >= shank_sdf), 0.07 * np.cos(2 * np.pi * phase), 0.0)
    metal = metal + ridges + rng.normal(0, 0.012, (size, size))

    bg_level = rng.uniform(0.76, 0.80)
    vignette = 0.06 * (((yy - size / 2) ** 2 + (xx - size / 2) ** 2) / (size / 2) ** 2)
    background = (bg_level - vignette + 0.01 * smooth_noise(rng, (size, size), 4.0)
                  + rng.normal(0, 0.008, (size, size)))
    background = np.clip(background, 0, 1).astype(np.float32)[..., None]
    img = alpha[..., None] * metal[..., None] + (1 - alpha[..., None]) * background
    return Scene(np.clip(img, 0, 1).astype(np.float32), alpha > 0.5, background)


def _foreign_bolt(rng: np.random.Generator, size: int) -> np.ndarray:
    gray = _texture_crop(rng, "gravel", size, 0.3)
    return np.clip(0.15 + 0.6 * gray, 0, 1)[..., None].astype(np.float32)


CATEGORIES: dict[str, Category] = {
    "weave": Category(_render_weave, _foreign_weave),
    "gravel": Category(_render_gravel, _foreign_gravel),
    "washer": Category(_render_washer, _foreign_washer),
    "bolt": Category(_render_bolt, _foreign_bolt),
    **{name: Category(render, foreign) for name, (render, foreign, _) in PHOTO_CATEGORIES.items()},
}
