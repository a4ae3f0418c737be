"""The defect painters (scratch, hole, cut, stain, patch, bend, blur), on synthetic scenes or any image.

A painter takes a clean ``Scene`` and returns (painted image, region). Defects are placed
inside ``scene.fg`` (the object; the whole image for textures and arbitrary images).
``paint_defects`` paints them on a batch of arbitrary images, e.g. held-out normal training
images for choosing alpha ("Ours*"), with masks that mark exactly the changed pixels.
"""

from __future__ import annotations

import math
from collections.abc import Callable

import numpy as np
from scipy import ndimage

from diffad_core.data.synth.canvas import Scene, grid, smooth_noise

Painter = Callable[[Scene, np.random.Generator, float, Callable[[], np.ndarray]],
                   tuple[np.ndarray, np.ndarray]]

# Defects that make sense on any image ("cut" needs an object outline).
ANY_IMAGE_DEFECTS: tuple[str, ...] = ("patch", "stain", "scratch", "hole", "bend", "blur")
MAX_TRIES = 50  # draws before giving up on placing a defect


def draw_severity(rng: np.random.Generator) -> float:
    """A defect's severity in [0, 1]: about a quarter subtle (< 0.3), the rest clearly visible."""
    return float(rng.uniform(0.0, 0.3) if rng.random() < 0.25 else rng.uniform(0.3, 1.0))


def min_defect_area(size: int) -> int:
    """The fewest pixels a defect may mark on an image whose shorter side is ``size``."""
    return max(4, int(round((2.5 * size / 64) ** 2)))


# ----------------------------------------------------------------------------- shared helpers
def _pick(rng: np.random.Generator, where: np.ndarray) -> tuple[float, float]:
    """A random pixel centre (y, x) among the True pixels of ``where``."""
    ys, xs = np.nonzero(where)
    i = int(rng.integers(0, len(ys)))
    return float(ys[i]) + 0.5, float(xs[i]) + 0.5


def _log_uniform(rng: np.random.Generator, lo: float, hi: float) -> float:
    return float(math.exp(rng.uniform(math.log(lo), math.log(hi))))


def _blob(rng: np.random.Generator, shape: tuple[int, int], centre: tuple[float, float],
          radius: float) -> np.ndarray:
    """Soft irregular blob: 1 at the centre, falling to 0 on a wobbly outline, < 0 outside."""
    yy, xx = grid(shape)
    dy, dx = yy - centre[0], xx - centre[1]
    theta = np.arctan2(dy, dx)
    outline = np.ones_like(theta)
    for k in (2, 3, 5):
        outline = outline + rng.uniform(0.0, 0.18) * np.cos(k * theta + rng.uniform(0, 2 * np.pi))
    return 1.0 - np.hypot(dy, dx) / (radius * outline)


def _polyline_distance(shape: tuple[int, int], points: np.ndarray) -> np.ndarray:
    """Distance (pixels) from every pixel centre to a polyline given as (N, 2) (y, x)."""
    yy, xx = grid(shape)
    best = np.full(shape, np.inf, np.float32)
    for (y0, x0), (y1, x1) in zip(points[:-1], points[1:], strict=True):
        vy, vx = y1 - y0, x1 - x0
        t = np.clip(((yy - y0) * vy + (xx - x0) * vx) / max(vy * vy + vx * vx, 1e-9), 0, 1)
        best = np.minimum(best, np.hypot(yy - (y0 + t * vy), xx - (x0 + t * vx)))
    return best


def _away_from(image: np.ndarray, region: np.ndarray, amount: float) -> np.ndarray:
    """A per-channel shift of ``amount`` darker if the region is bright, else brighter."""
    mean = float(image[region].mean())
    return np.float32(-amount if mean > 0.45 else amount)


def _centre_and_radius(scene: Scene, rng: np.random.Generator, max_frac: float,
                       on_edge: bool = False) -> tuple[tuple[float, float], float]:
    size = min(scene.image.shape[:2])
    where = scene.fg
    if on_edge:
        where = scene.fg & ~ndimage.binary_erosion(scene.fg, iterations=2)
    lo = max(1.2, 1.6 * size / 64)
    return _pick(rng, where), _log_uniform(rng, lo, max(lo, max_frac * size))


def _is_object(scene: Scene) -> bool:
    return not bool(scene.fg.all())


# ----------------------------------------------------------------------------- the painters
def _defect_scratch(scene: Scene, rng: np.random.Generator, severity: float,
                    _foreign: Callable[[], np.ndarray]) -> tuple[np.ndarray, np.ndarray]:
    """A thin curved line (scratch, crack, pulled thread): brighter or darker than its surround."""
    shape = scene.image.shape[:2]
    size = min(shape)
    start = np.array(_pick(rng, scene.fg))
    length = _log_uniform(rng, 0.08 * size, 0.5 * size)
    heading = rng.uniform(0, 2 * np.pi)
    n_seg = 5
    points = [start]
    for _ in range(n_seg):
        heading += rng.normal(0, 0.35)
        points.append(points[-1] + length / n_seg * np.array([math.sin(heading), math.cos(heading)]))
    width = max(1.0, rng.uniform(1.0, 2.6) * size / 64)
    region = (_polyline_distance(shape, np.array(points)) <= width / 2) & scene.fg
    if not region.any():
        return scene.image, region
    shift = _away_from(scene.image, region, 0.12 + 0.33 * severity)
    out = np.clip(scene.image + shift + rng.normal(0, 0.02, scene.image.shape), 0, 1)
    return np.where(region[..., None], out, scene.image).astype(np.float32), region


def _defect_hole(scene: Scene, rng: np.random.Generator, severity: float,
                 _foreign: Callable[[], np.ndarray], on_edge: bool = False,
                 ) -> tuple[np.ndarray, np.ndarray]:
    """Missing material: an irregular region replaced by what lies behind it."""
    max_frac = 0.10 if _is_object(scene) else 0.16
    centre, radius = _centre_and_radius(scene, rng, max_frac, on_edge=on_edge)
    region = (_blob(rng, scene.image.shape[:2], centre, radius) > 0) & scene.fg
    return np.where(region[..., None], scene.backing, scene.image).astype(np.float32), region


def _defect_cut(scene: Scene, rng: np.random.Generator, severity: float,
                foreign: Callable[[], np.ndarray]) -> tuple[np.ndarray, np.ndarray]:
    """A piece cut out of the object's outline, showing the background."""
    return _defect_hole(scene, rng, severity, foreign, on_edge=True)


_STAIN_COLOURS = np.array([
    [0.55, 0.27, 0.10],  # rust
    [0.12, 0.10, 0.08],  # oil
    [0.15, 0.25, 0.62],  # ink
    [0.35, 0.55, 0.20],  # green
    [0.95, 0.92, 0.85],  # white residue
], np.float32)


def _defect_stain(scene: Scene, rng: np.random.Generator, severity: float,
                  _foreign: Callable[[], np.ndarray]) -> tuple[np.ndarray, np.ndarray]:
    """A coloured (or, on gray images, dark/bright) stain alpha-blended into the surface."""
    shape, channels = scene.image.shape[:2], scene.image.shape[2]
    max_frac = 0.10 if _is_object(scene) else 0.16
    centre, radius = _centre_and_radius(scene, rng, max_frac)
    field = _blob(rng, shape, centre, radius) + 0.15 * smooth_noise(rng, shape, radius / 3 + 1)
    region = (field > 0) & scene.fg
    if not region.any():
        return scene.image, region
    local = scene.image[region].mean(axis=0)
    if channels == 1:
        colour = np.array([0.08 if local[0] > 0.45 else 0.95], np.float32)
    else:
        dist = np.abs(_STAIN_COLOURS - local).sum(axis=1)
        candidates = np.nonzero(dist > 0.45)[0]
        colour = _STAIN_COLOURS[int(rng.choice(candidates)) if len(candidates) else int(dist.argmax())]
        colour = np.clip(colour + rng.normal(0, 0.03, 3), 0, 1).astype(np.float32)
    strength = 0.35 + 0.55 * severity
    # Soft inside, but never below half strength so every masked pixel really changes.
    alpha = strength * (0.5 + 0.5 * np.clip(field / 0.3, 0, 1))
    out = scene.image * (1 - alpha[..., None]) + colour * alpha[..., None]
    return np.where(region[..., None], out, scene.image).astype(np.float32), region


def _defect_patch(scene: Scene, rng: np.random.Generator, severity: float,
                  foreign: Callable[[], np.ndarray]) -> tuple[np.ndarray, np.ndarray]:
    """Foreign material pasted in: a blob or a turned rectangle from another image."""
    shape = scene.image.shape[:2]
    max_frac = 0.10 if _is_object(scene) else 0.16
    centre, radius = _centre_and_radius(scene, rng, max_frac)
    if rng.random() < 0.5:
        inside = _blob(rng, shape, centre, radius) > 0
    else:
        yy, xx = grid(shape)
        ang = rng.uniform(0, np.pi)
        u = (xx - centre[1]) * math.cos(ang) + (yy - centre[0]) * math.sin(ang)
        v = -(xx - centre[1]) * math.sin(ang) + (yy - centre[0]) * math.cos(ang)
        aspect = rng.uniform(0.5, 1.0)
        inside = (np.abs(u) <= radius) & (np.abs(v) <= radius * aspect)
    region = inside & scene.fg
    return np.where(region[..., None], foreign(), scene.image).astype(np.float32), region


def _defect_bend(scene: Scene, rng: np.random.Generator, severity: float,
                 _foreign: Callable[[], np.ndarray]) -> tuple[np.ndarray, np.ndarray]:
    """A local smooth deformation; on objects it is centred on the outline (a bent edge)."""
    shape, channels = scene.image.shape[:2], scene.image.shape[2]
    size = min(shape)
    if _is_object(scene):
        centre = _pick(rng, scene.fg & ~ndimage.binary_erosion(scene.fg, iterations=2))
        spread = rng.uniform(0.05, 0.10) * size
    else:
        centre = _pick(rng, scene.fg)
        spread = rng.uniform(0.05, 0.14) * size
    amplitude = max(1.5, (1.5 + 3.0 * severity) * size / 64)
    heading = rng.uniform(0, 2 * np.pi)
    yy, xx = grid(shape)
    bump = np.exp(-((yy - centre[0]) ** 2 + (xx - centre[1]) ** 2) / (2 * spread ** 2))
    bump = np.where(bump > 0.02, bump, 0.0)
    src_y = yy - 0.5 - amplitude * math.sin(heading) * bump
    src_x = xx - 0.5 - amplitude * math.cos(heading) * bump
    warped = np.stack([ndimage.map_coordinates(scene.image[..., c], [src_y, src_x], order=1,
                                               mode="nearest") for c in range(channels)], axis=-1)
    # The mask is the visibly changed region, closed and filled; outside it nothing changes.
    changed = (np.abs(warped - scene.image).max(axis=-1) > 0.08) & (bump > 0)
    close = max(2, round(2 * size / 128))
    region = ndimage.binary_fill_holes(ndimage.binary_closing(changed, iterations=close)) & (bump > 0)
    region = ndimage.binary_opening(region, iterations=1) if region.sum() > 40 else region
    return np.where(region[..., None], warped, scene.image).astype(np.float32), region


def _defect_blur(scene: Scene, rng: np.random.Generator, severity: float,
                 _foreign: Callable[[], np.ndarray]) -> tuple[np.ndarray, np.ndarray]:
    """Texture smoothed away (a smear, a worn or polished spot): an irregular region replaced by
    a Gaussian blur of the image, sigma 1-3 px at 64 px by severity (bench/tune_cpu_twosided_rule.md)."""
    shape = scene.image.shape[:2]
    size = min(shape)
    max_frac = 0.10 if _is_object(scene) else 0.16
    centre, radius = _centre_and_radius(scene, rng, max_frac)
    sigma = max(1.0, (1.0 + 2.0 * severity) * size / 64)
    blurred = ndimage.gaussian_filter(scene.image, sigma=(sigma, sigma, 0), mode="reflect")
    inside = (_blob(rng, shape, centre, radius) > 0) & scene.fg
    # The mask is the visibly changed region, closed and filled, as the bend's.
    changed = (np.abs(blurred - scene.image).max(axis=-1) > 0.03) & inside
    close = max(1, round(size / 128))
    region = ndimage.binary_fill_holes(ndimage.binary_closing(changed, iterations=close)) & inside
    return np.where(region[..., None], blurred, scene.image).astype(np.float32), region


PAINTERS: dict[str, Painter] = {
    "scratch": _defect_scratch,
    "hole": _defect_hole,
    "cut": _defect_cut,
    "stain": _defect_stain,
    "patch": _defect_patch,
    "bend": _defect_bend,
    "blur": _defect_blur,
}


# ----------------------------------------------------------------------------- any image
def paint_defects(images: np.ndarray, seed: int, kinds: tuple[str, ...] | None = None,
                  ) -> tuple[np.ndarray, np.ndarray]:
    """Paint one synthetic defect into every image; return (images, masks) with exact masks.

    ``images``: (N, C, H, W) float32 in [-1, 1] with C = 3 (or 1 for grayscale); it is not
    modified. Image ``i`` gets the defect ``kinds[i % len(kinds)]`` (default
    ``ANY_IMAGE_DEFECTS``; any of ``PAINTERS``), drawn from its own random stream of
    (seed, i), so the result is deterministic for a seed. The whole image is the part region;
    a hole shows a plain backing (dark under a bright image, light under a dark one) and a
    patch is material from another image of the batch, flipped, moved and dimmed or brightened.
    Masks are uint8 {0, 1} (N, H, W) and mark exactly the changed pixels: a pixel changes only
    if the defect moved it by at least one grey level, and a defect marking fewer than
    ``min_defect_area`` pixels is redrawn (RuntimeError after ``MAX_TRIES`` draws, e.g. for
    a bend on a uniform image).
    """
    if images.ndim != 4 or images.shape[1] not in (1, 3):
        raise ValueError(f"images must be (N, 3, H, W) or (N, 1, H, W), got shape {images.shape}")
    kinds = ANY_IMAGE_DEFECTS if kinds is None else tuple(kinds)
    if not kinds or any(kind not in PAINTERS for kind in kinds):
        raise ValueError(f"kinds must be a non-empty tuple of {', '.join(PAINTERS)}; got {kinds!r}")
    if seed < 0:
        raise ValueError(f"seed must be non-negative, got {seed}")
    originals = np.asarray(images, dtype=np.float32)
    # The painters work on channels-last images in [0, 1].
    unit = np.clip((originals.transpose(0, 2, 3, 1) + 1.0) / 2.0, 0.0, 1.0)
    out = originals.copy()
    masks = np.zeros((len(out),) + out.shape[2:], np.uint8)
    for i in range(len(out)):
        rng = np.random.default_rng(np.random.SeedSequence([seed, i]))
        out[i], masks[i] = _paint_one(unit, i, kinds[i % len(kinds)], rng, originals[i])
    return out, masks


def _paint_one(unit: np.ndarray, index: int, kind: str, rng: np.random.Generator,
               original: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """One defect on ``unit[index]``: (image (C, H, W) in [-1, 1], mask uint8 (H, W))."""
    image = unit[index]
    scene = Scene(image, np.ones(image.shape[:2], bool), _plain_backing(rng, image))
    severity = draw_severity(rng)
    min_area = min_defect_area(min(image.shape[:2]))
    for _ in range(MAX_TRIES):
        painted, region = PAINTERS[kind](scene, rng, severity,
                                         lambda: _foreign_material(rng, unit, index))
        region = region & (np.abs(painted - image).max(axis=-1) >= 1.0 / 255.0)
        result = np.where(region, painted.transpose(2, 0, 1) * 2.0 - 1.0, original)
        changed = (result != original).any(axis=0)
        if changed.sum() >= min_area:
            return result.astype(np.float32), changed.astype(np.uint8)
    raise RuntimeError(f"could not paint a {kind!r} defect of at least {min_area} px on "
                       f"image {index} after {MAX_TRIES} tries")


def _plain_backing(rng: np.random.Generator, image: np.ndarray) -> np.ndarray:
    """What shows through a hole: dark under a bright image, light under a dark one."""
    level = rng.uniform(0.05, 0.10) if image.mean() > 0.45 else rng.uniform(0.85, 0.95)
    backing = (level + 0.02 * smooth_noise(rng, image.shape[:2], 3.0)[..., None]
               + rng.normal(0, 0.01, image.shape))
    return np.clip(backing, 0, 1).astype(np.float32)


def _foreign_material(rng: np.random.Generator, unit: np.ndarray, index: int) -> np.ndarray:
    """Patch material: another image of the batch, flipped, moved and with shifted intensity."""
    n, height, width = unit.shape[:3]
    source = unit[(index + int(rng.integers(1, n))) % n] if n > 1 else unit[index]
    shift = (int(rng.integers(0, height)), int(rng.integers(0, width)))
    material = np.roll(source[::-1, ::-1], shift, axis=(0, 1))
    # Lower contrast and a brightness shift: a defect even where the material matches.
    gain = rng.uniform(0.5, 0.8)
    return np.clip(material * gain + (1 - gain) / 2 + rng.uniform(-0.25, 0.25), 0, 1)
