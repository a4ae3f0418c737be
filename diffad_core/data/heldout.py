"""The held-out benchmark family: real photographs with their own defect renderers, never tuned on.

``generate_heldout`` writes an MVTec-AD layout of four categories cut from photographs that ship
inside the scikit-image wheel (bundled files, loaded offline):

| category | kind | photograph | normal images |
|---|---|---|---|
| brick | texture, 1-channel | ``brick`` | random crops (scale, position, flips, +-3 deg) |
| grass | texture, 1-channel | ``grass`` | random crops (scale, position, flips, +-180 deg) |
| coins | object, 1-channel | ``coins`` | the same 4x3 block of coins, shifted +-3 %, +-2 deg |
| coffee | object, RGB | ``coffee`` | the cup on its saucer, shifted +-2.5 %, +-3 deg |

All normal images also get a small gain/offset jitter. Every category has the five defect kinds
``crack`` (thin branching dark line), ``spot`` (soft low-contrast blotch), ``missing`` (textures:
a region turned into a dark void or flattened to its surroundings; objects: a bite out of the
object's edge showing the background), ``foreign`` (a blob cut from another photograph, sometimes
with a shadow) and ``smear`` (a long faint motion-blurred streak). Even test indices get small
defects (< 0.5 % of the image at 256 px), odd ones medium ones (about 0.3-7 %).

Masks are exact: a pixel is 255 in the mask iff its written uint8 value differs from the clean
uint8 image. Renderer changes of at most ``CHANGE_THRESHOLD`` grey levels (in every channel) are
reverted before writing, so invisible soft tails never count as defect pixels.

Every image has its own random stream (seed, category, split/defect, index), so the output is
byte-identical for a seed and any subset of categories reproduces the same files;
``_render_sample`` also returns the clean image a defect was drawn on (used by the tests).

Nothing here comes from ``synth/``: other code, other photographs, other renderers, so that
numbers on this family tell whether settings tuned on the synthetic family generalise.
"""

from __future__ import annotations

import functools
import json
import shutil
import zlib
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw
from scipy import ndimage
from tqdm.auto import tqdm

from diffad_core._atomic import replace_dir, staging_dir
from diffad_core.progress import progress_bar

MARKER_NAME = ".diffad_heldout.json"
DEFECTS: tuple[str, ...] = ("crack", "spot", "missing", "foreign", "smear")
CHANGE_THRESHOLD = 2  # grey levels (of 255); a larger change in some channel is a defect pixel
_VERSION = 1  # bump when the output changes, so reruns regenerate instead of no-op
_MIN_DEFECT_PX = 6  # a defect with fewer changed pixels is redrawn (never an empty mask)
_ATTEMPTS = 20
_SS = 4  # supersampling factor for drawn strokes (anti-aliased cracks and streaks)


@dataclass(frozen=True)
class _Spec:
    photo: str  # a skimage.data function whose file is bundled in the wheel
    crop: tuple[float, float]  # crop side range, fraction of the photo's shorter side
    center: tuple[float, float] | None  # object centre (row, col) in pixels; None: anywhere
    shift: float  # objects: max centre shift, fraction of the crop side
    rotate: float  # max rotation, degrees
    flip: bool
    rgb: bool


CATEGORIES: dict[str, _Spec] = {
    "brick": _Spec("brick", (0.45, 0.6), None, 0.0, 3.0, True, False),
    "grass": _Spec("grass", (0.4, 0.55), None, 0.0, 180.0, True, False),
    "coins": _Spec("coins", (0.72, 0.75), (120.0, 125.0), 0.03, 2.0, False, False),
    "coffee": _Spec("coffee", (0.8, 0.83), (212.0, 282.0), 0.025, 3.0, False, True),
}
# Foreign particles are cut from these (never from the category's own photograph).
_FOREIGN_PHOTOS = ("chelsea", "astronaut", "rocket", "brick", "grass", "coins")
# Stain colours for ``spot`` (rust, oil, milky residue, yellowish film); grey images use the mean.
_STAIN_COLOURS = np.array([[0.45, 0.25, 0.12], [0.05, 0.05, 0.05],
                           [0.92, 0.9, 0.85], [0.7, 0.62, 0.25]], np.float32)


@functools.lru_cache(maxsize=None)
def _photo(name: str) -> np.ndarray:
    """A bundled skimage photograph as float32 (H, W, C) in [0, 1], C = 1 or 3 (alpha dropped)."""
    import skimage.data  # lazy: importing skimage costs about a second

    image = np.asarray(getattr(skimage.data, name)(), dtype=np.float32) / 255.0
    return image[..., None] if image.ndim == 2 else image[..., :3]


@functools.lru_cache(maxsize=None)
def _prior(category: str) -> np.ndarray:
    """Where defects may sit, in photo coordinates (float32 0/1): the object, or everywhere."""
    photo = _photo(CATEGORIES[category].photo)
    h, w = photo.shape[:2]
    if category == "coins":  # brighter than the tray (whose lighting varies): white top-hat
        smooth = ndimage.gaussian_filter(photo[..., 0], 2.0)
        coins = smooth - ndimage.grey_opening(smooth, size=(71, 71)) > 0.15
        coins = ndimage.binary_fill_holes(ndimage.binary_opening(coins, iterations=2))
        return coins.astype(np.float32)
    if category == "coffee":  # saucer and cup: two ellipses measured on the photo
        yy, xx = np.mgrid[0:h, 0:w]
        saucer = ((yy - 230) / 165.0) ** 2 + ((xx - 277) / 203.0) ** 2 <= 1
        cup = ((yy - 135) / 117.0) ** 2 + ((xx - 292) / 122.0) ** 2 <= 1
        return (saucer | cup).astype(np.float32)
    return np.ones((h, w), np.float32)


def _view(category: str, rng: np.random.Generator, size: int) -> tuple[np.ndarray, np.ndarray]:
    """One normal image (float32 (S, S, C) in [0, 1]) and its placement prior (S, S) bool."""
    spec = CATEGORIES[category]
    photo = _photo(spec.photo)
    h, w = photo.shape[:2]
    side = rng.uniform(*spec.crop) * min(h, w)
    angle = np.deg2rad(rng.uniform(-spec.rotate, spec.rotate))
    cos, sin = np.cos(angle), np.sin(angle)
    if spec.center is None:  # keep the whole rotated square inside the photo
        ext = side / 2 * (abs(cos) + abs(sin))
        cy, cx = rng.uniform(ext, h - ext), rng.uniform(ext, w - ext)
    else:  # clamped too: reflected borders would be an artefact seen only in some images
        cy, cx = np.asarray(spec.center) + rng.uniform(-1, 1, 2) * spec.shift * side
        ext = side / 2 * (abs(cos) + abs(sin))
        cy, cx = np.clip(cy, ext, h - ext), np.clip(cx, ext, w - ext)
    fy, fx = (rng.choice([-1.0, 1.0], 2) if spec.flip else (1.0, 1.0))
    u = ((np.arange(size) + 0.5) / size - 0.5) * side
    v, u = np.meshgrid(u * fy, u * fx, indexing="ij")
    coords = np.stack([cy + cos * v - sin * u, cx + sin * v + cos * u])
    sigma = max(0.0, 0.45 * (side / size - 1.0))  # anti-alias before downsampling
    src = ndimage.gaussian_filter(photo, (sigma, sigma, 0)) if sigma > 0 else photo
    image = np.stack([ndimage.map_coordinates(src[..., c], coords, order=1, mode="reflect")
                      for c in range(src.shape[-1])], axis=-1)
    prior = ndimage.map_coordinates(_prior(category), coords, order=0, mode="constant") > 0.5
    gain = rng.uniform(0.94, 1.06) * (rng.uniform(0.98, 1.02, image.shape[-1]) if spec.rgb else 1)
    image = image * gain + rng.uniform(-0.02, 0.02)
    return np.clip(image, 0, 1).astype(np.float32), prior


def _to_u8(image: np.ndarray) -> np.ndarray:
    return np.clip(np.rint(image * 255.0), 0, 255).astype(np.uint8)


def _place(rng: np.random.Generator, prior: np.ndarray) -> tuple[float, float]:
    """A defect centre (row, col): a random prior pixel, away from the border."""
    size = prior.shape[0]
    inner = np.zeros_like(prior)
    lo, hi = int(0.1 * size), int(np.ceil(0.9 * size))
    inner[lo:hi, lo:hi] = prior[lo:hi, lo:hi]
    ys, xs = np.nonzero(inner)
    if len(ys) == 0:
        return tuple(rng.uniform(lo, hi, 2))
    k = rng.integers(len(ys))
    return ys[k] + rng.uniform(), xs[k] + rng.uniform()


def _blob(rng: np.random.Generator, center: tuple[float, float], radius: float,
          size: int) -> np.ndarray:
    """An irregular star-shaped region as anti-aliased alpha (S, S) float32 in [0, 1]."""
    yy, xx = np.mgrid[0:size, 0:size].astype(np.float32) + 0.5
    dy, dx = yy - center[0], xx - center[1]
    theta, dist = np.arctan2(dy, dx), np.hypot(dy, dx)
    r = np.ones_like(theta)
    for k in (2, 3, 4, 5):  # a few low harmonics: lumpy but never self-intersecting
        r += rng.uniform(0, 0.3 / k) * np.cos(k * theta + rng.uniform(0, 2 * np.pi))
    r *= radius * rng.uniform(0.6, 1.0) / r.mean()
    return np.clip(r - dist + 0.5, 0, 1).astype(np.float32)


def _stroke(paths: list[list[tuple[float, float, float]]], size: int) -> np.ndarray:
    """Coverage (S, S) float32 of polylines of (row, col, width) points, drawn supersampled."""
    canvas = Image.new("L", (size * _SS, size * _SS), 0)
    draw = ImageDraw.Draw(canvas)
    for path in paths:
        for (y0, x0, w0), (y1, x1, _) in zip(path, path[1:]):
            width = max(1, int(round(w0 * _SS)))
            draw.line([(x0 * _SS, y0 * _SS), (x1 * _SS, y1 * _SS)], fill=255, width=width)
            r = width / 2  # round joints, so bends do not leave notches
            draw.ellipse([x1 * _SS - r, y1 * _SS - r, x1 * _SS + r, y1 * _SS + r], fill=255)
    cover = np.asarray(canvas, np.float32).reshape(size, _SS, size, _SS).mean(axis=(1, 3))
    return cover / 255.0


def _walk(rng: np.random.Generator, start: tuple[float, float], angle: float, length: float,
          width: float, step: float) -> list[tuple[float, float, float]]:
    """A wandering, tapering polyline: the skeleton of a crack or a branch."""
    n = max(2, int(length / step))
    y, x = start
    points = [(y, x, width)]
    for i in range(n):
        angle += rng.normal(0, 0.3)
        y, x = y + step * np.sin(angle), x + step * np.cos(angle)
        points.append((y, x, width * (1 - 0.6 * (i + 1) / n)))
    return points


def _crack(img: np.ndarray, rng: np.random.Generator, center: tuple[float, float],
           small: bool, prior: np.ndarray) -> np.ndarray:
    """A thin (1-3 px at 256 px) branching dark line that tapers off."""
    size = img.shape[0]
    f = size / 256
    # Floors in pixels keep small defects visible at tiny sizes (tests, 32-64 px previews).
    length = max(6.0, rng.uniform(*((0.08, 0.14) if small else (0.22, 0.4))) * size)
    width = max(1.0, rng.uniform(1.0, 3.0) * f)
    step = max(1.5, 4 * f)
    angle = rng.uniform(0, 2 * np.pi)
    start = (center[0] - length / 2 * np.sin(angle), center[1] - length / 2 * np.cos(angle))
    paths = [_walk(rng, start, angle, length, width, step)]
    for y, x, w in paths[0][1:-1]:
        if rng.uniform() < 0.12 and len(paths) < 4:
            turn = rng.choice([-1, 1]) * rng.uniform(0.4, 1.1)
            paths.append(_walk(rng, (y, x), angle + turn, length * rng.uniform(0.2, 0.45),
                               max(0.7, w * 0.7), step))
    cover = _stroke(paths, size)[..., None]
    return img * (1 - rng.uniform(0.3, 0.75) * cover)


def _spot(img: np.ndarray, rng: np.random.Generator, center: tuple[float, float],
          small: bool, prior: np.ndarray) -> np.ndarray:
    """A soft, irregular, low-contrast stain tinted towards a stain colour."""
    size = img.shape[0]
    sigma = max(1.2, rng.uniform(*((0.008, 0.014) if small else (0.03, 0.06))) * size)
    yy, xx = np.mgrid[0:size, 0:size].astype(np.float32)
    field = np.zeros((size, size), np.float32)
    for _ in range(rng.integers(1, 4)):  # a few overlapping anisotropic lobes
        cy, cx = np.asarray(center) + rng.normal(0, sigma * 0.8, 2)
        sy, sx = sigma * rng.uniform(0.6, 1.4, 2)
        lobe = np.exp(-0.5 * (((yy - cy) / sy) ** 2 + ((xx - cx) / sx) ** 2))
        field += rng.uniform(0.5, 1) * lobe
    noise = ndimage.gaussian_filter(rng.normal(size=(size, size)), max(1.0, sigma / 2))
    field *= np.clip(1 + 0.5 * noise / (noise.std() + 1e-8), 0, None)  # ragged, not round
    field /= field.max() + 1e-8
    colour = _STAIN_COLOURS[rng.integers(len(_STAIN_COLOURS))]
    colour = colour if img.shape[-1] == 3 else colour.mean(keepdims=True)
    # One shift for the whole stain (towards the colour, from the mean under it), not per pixel:
    # the changed pixels then form one soft blob instead of texture-dependent speckle.
    shift = colour - (img * field[..., None]).sum(axis=(0, 1)) / field.sum()
    shift *= max(1.0, 0.2 / (np.abs(shift).max() + 1e-6))  # never a stain of the same colour
    return img + rng.uniform(0.1, 0.35) * field[..., None] * shift


def _missing(img: np.ndarray, rng: np.random.Generator, center: tuple[float, float],
             small: bool, prior: np.ndarray) -> np.ndarray:
    """Material gone: a dark void (textures) or the background showing through (objects)."""
    size = img.shape[0]
    radius = max(2.5, rng.uniform(*((0.02, 0.035) if small else (0.06, 0.11))) * size)
    alpha = _blob(rng, center, radius, size)
    is_object = not prior.all()
    if not is_object and rng.uniform() < 0.5:  # a hole: dark, with a little uneven shading
        fill = rng.uniform(0.03, 0.15) + 0.03 * ndimage.gaussian_filter(
            rng.normal(size=(size, size)), 1.5)[..., None]
    else:  # fill from what surrounds the region (and the object): normalised convolution
        keep = ((alpha == 0) & ~prior if is_object else alpha == 0).astype(np.float32)
        sigma = size / 10 if is_object else max(2.0, radius)
        num = ndimage.gaussian_filter(img * keep[..., None], (sigma, sigma, 0))
        den = ndimage.gaussian_filter(keep, sigma)[..., None]
        fill = np.where(den > 1e-3, num / np.maximum(den, 1e-3), img.mean(axis=(0, 1)))
        fill = fill + 0.012 * ndimage.gaussian_filter(rng.normal(size=(size, size)), 0.7)[..., None]
    if is_object:  # only the object loses material; the background stays as it was
        alpha = alpha * ndimage.gaussian_filter(prior.astype(np.float32), 0.7)
    return img + alpha[..., None] * (fill - img)


def _foreign(img: np.ndarray, rng: np.random.Generator, center: tuple[float, float],
             small: bool, prior: np.ndarray, own_photo: str = "") -> np.ndarray:
    """A particle: a lumpy piece of another photograph, sometimes casting a faint shadow."""
    size = img.shape[0]
    radius = max(2.5, rng.uniform(*((0.015, 0.03) if small else (0.04, 0.08))) * size)
    alpha = _blob(rng, center, radius, size)
    name = rng.choice([p for p in _FOREIGN_PHOTOS if p != own_photo])
    photo = _photo(name)
    if img.shape[-1] == 1:
        photo = photo.mean(axis=-1, keepdims=True)
    elif photo.shape[-1] == 1:
        photo = np.repeat(photo, 3, axis=-1)
    zoom = rng.uniform(0.5, 2.0)  # photo pixels per image pixel
    sy, sx = rng.uniform(0.2, 0.8, 2) * photo.shape[:2]
    yy, xx = np.mgrid[0:size, 0:size].astype(np.float32)
    coords = np.stack([sy + (yy - center[0]) * zoom, sx + (xx - center[1]) * zoom])
    patch = np.stack([ndimage.map_coordinates(photo[..., c], coords, order=1, mode="reflect")
                      for c in range(photo.shape[-1])], axis=-1)
    out = img
    if rng.uniform() < 0.5:
        offset = max(1.0, 2 * size / 256)
        shadow = ndimage.gaussian_filter(ndimage.shift(alpha, (offset, offset), order=1),
                                         offset)
        out = img * (1 - 0.35 * (shadow * (1 - alpha))[..., None])
    return out + alpha[..., None] * (patch - out)


def _smear(img: np.ndarray, rng: np.random.Generator, center: tuple[float, float],
           small: bool, prior: np.ndarray) -> np.ndarray:
    """A long faint streak: the image motion-blurred along a curve, slightly lighter or darker."""
    size = img.shape[0]
    f = size / 256
    length = max(8.0, rng.uniform(*((0.1, 0.18) if small else (0.3, 0.55))) * size)
    width = max(1.5, rng.uniform(2.0, 6.0) * f)
    angle = rng.uniform(0, np.pi)
    d = np.array([np.sin(angle), np.cos(angle)])
    p0, p2 = np.asarray(center) - d * length / 2, np.asarray(center) + d * length / 2
    p1 = np.asarray(center) + np.array([-d[1], d[0]]) * rng.normal(0, 0.15) * length  # bow
    t = np.linspace(0, 1, 24)[:, None]
    curve = (1 - t) ** 2 * p0 + 2 * (1 - t) * t * p1 + t ** 2 * p2
    alpha = _stroke([[(y, x, width) for y, x in curve]], size)
    alpha = ndimage.gaussian_filter(alpha, width * 0.3) * rng.uniform(0.5, 1.0)
    n = max(2, int(round(rng.uniform(3, 8) * f)))
    smudged = np.mean([ndimage.shift(img, (k * d[0], k * d[1], 0), order=1, mode="nearest")
                       for k in range(-n, n + 1)], axis=0)
    offset = rng.choice([-1, 1]) * rng.uniform(0.02, 0.05)  # keeps the streak in one piece
    return img + alpha[..., None] * (smudged + offset - img)


_RENDERERS = {"crack": _crack, "spot": _spot, "missing": _missing, "foreign": _foreign,
              "smear": _smear}


def _commit(clean: np.ndarray, rendered: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Quantise a rendering, revert sub-threshold changes; return (image u8, mask bool)."""
    out = _to_u8(rendered)
    changed = np.abs(out.astype(np.int16) - clean.astype(np.int16)).max(axis=-1) > CHANGE_THRESHOLD
    return np.where(changed[..., None], out, clean), changed


def _rng(seed: int, category: str, defect: str, index: int) -> np.random.Generator:
    # One stream per image, from stable integers (not hash()): any subset of categories or
    # counts reproduces the same images, run after run.
    return np.random.default_rng([seed, zlib.crc32(category.encode()),
                                  zlib.crc32(defect.encode()), index])


def _render_sample(category: str, defect: str, index: int, *, seed: int, size: int,
                   split: str = "test") -> tuple[np.ndarray, np.ndarray | None, np.ndarray | None]:
    """(clean u8 (S, S, C), defective u8 or None, mask bool or None) of one image."""
    rng = _rng(seed, category, f"{split}/{defect}", index)
    image, prior = _view(category, rng, size)
    clean = _to_u8(image)
    if defect == "good":
        return clean, None, None
    base = clean.astype(np.float32) / 255.0
    renderer = _RENDERERS[defect]
    extra = {"own_photo": CATEGORIES[category].photo} if defect == "foreign" else {}
    where = prior
    if defect == "missing" and not prior.all():  # objects lose a bite at their edge
        where = prior & ~ndimage.binary_erosion(prior, iterations=max(1, size // 40))
    for _ in range(_ATTEMPTS):
        rendered = renderer(base, rng, _place(rng, where), index % 2 == 0, prior, **extra)
        out, mask = _commit(clean, rendered)
        if mask.sum() >= _MIN_DEFECT_PX:
            return clean, out, mask
    raise RuntimeError(f"heldout: {category}/{defect}/{index}: no visible defect after "
                       f"{_ATTEMPTS} attempts (size {size} too small?)")


def _save(path: Path, array: np.ndarray) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(array[..., 0] if array.ndim == 3 and array.shape[-1] == 1 else array).save(path)


def _build_category(folder: Path, category: str, settings: dict, bar: tqdm) -> None:
    seed, size = settings["seed"], settings["size"]
    width = max(3, len(str(max(settings["n_train"], settings["n_test_good"],
                               settings["n_test_per_defect"]) - 1)))
    for split, count in (("train", settings["n_train"]), ("test", settings["n_test_good"])):
        for i in range(count):
            clean, _, _ = _render_sample(category, "good", i, seed=seed, size=size, split=split)
            _save(folder / split / "good" / f"{i:0{width}d}.png", clean)
            bar.update()
    for defect in DEFECTS:
        for i in range(settings["n_test_per_defect"]):
            _, image, mask = _render_sample(category, defect, i, seed=seed, size=size)
            _save(folder / "test" / defect / f"{i:0{width}d}.png", image)
            _save(folder / "ground_truth" / defect / f"{i:0{width}d}_mask.png",
                  mask.astype(np.uint8) * 255)
            bar.update()


def generate_heldout(root: Path, *, seed: int = 0, size: int = 256, n_train: int = 60,
                     n_test_good: int = 12, n_test_per_defect: int = 6,
                     categories: list[str] | None = None, progress: bool = False) -> Path:
    """Write the held-out family (MVTec-AD layout) under ``root``; return ``root``.

    Each category is built in a hidden ``root/.tmp-heldout-*`` folder and renamed into place.
    A category whose marker holds the same settings is left alone; one with other settings is
    replaced; a folder of that name without a marker is not ours and raises FileExistsError.
    """
    root = Path(root)
    names = list(CATEGORIES) if categories is None else list(categories)
    unknown = [c for c in names if c not in CATEGORIES]
    if unknown:
        raise ValueError(f"unknown held-out categories {unknown}; known: {list(CATEGORIES)}")
    if size < 32 or n_train < 1 or n_test_good < 0 or n_test_per_defect < 1:
        raise ValueError("need size >= 32, n_train >= 1, n_test_good >= 0, n_test_per_defect >= 1")
    root.mkdir(parents=True, exist_ok=True)
    for category in names:
        settings = {"generator": "diffad-heldout", "version": _VERSION, "category": category,
                    "seed": seed, "size": size, "n_train": n_train, "n_test_good": n_test_good,
                    "n_test_per_defect": n_test_per_defect, "defects": list(DEFECTS)}
        target, marker = root / category, root / category / MARKER_NAME
        if marker.is_file():
            try:
                if json.loads(marker.read_text()) == settings:
                    continue  # already generated with these settings
            except (OSError, ValueError):
                pass  # unreadable marker: regenerate
        elif target.exists():
            raise FileExistsError(f"{target} exists and was not written by generate_heldout")
        tmp = staging_dir(root, ".tmp-heldout-")
        try:
            total = n_train + n_test_good + n_test_per_defect * len(DEFECTS)
            with progress_bar(total=total, desc=f"heldout {category}", enabled=progress) as bar:
                _build_category(tmp, category, settings, bar)
            (tmp / MARKER_NAME).write_text(json.dumps(settings, indent=1, sort_keys=True))
            replace_dir(tmp, target)  # readers never see a mix of old and new files
        finally:
            if tmp.exists():
                shutil.rmtree(tmp, ignore_errors=True)
    return root


__all__ = ["CATEGORIES", "CHANGE_THRESHOLD", "DEFECTS", "MARKER_NAME", "generate_heldout"]
