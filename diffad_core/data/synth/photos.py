"""Four photo categories of the synthetic generator: the photo tuning family (docs/tuning.md).

Real photographs bundled in the scikit-image wheel that the held-out family does not use as a
category, with the synthetic painters that work on any image (``defects.ANY_IMAGE_DEFECTS``)
placed anywhere in the picture:

| category | kind | photograph | normal images |
|---|---|---|---|
| moon | texture, 1-channel | ``moon`` | random crops, flips, quarter turns, brightness jitter |
| tissue | texture, RGB | ``immunohistochemistry`` | the same |
| cameraman | object, 1-channel | ``camera`` | one framing, shifted up to 3 %, turned up to 2 deg |
| retina | object, RGB | ``retina`` (downsampled to 512 px) | the same |

Settings are chosen on these with our own painters (bench/tune_cpu_photo_rule.md), so that the
held-out family (other photographs, other defect code) stays a family nobody tuned on.
"""

from __future__ import annotations

from collections.abc import Callable
from functools import lru_cache

import numpy as np
import skimage.data
from scipy import ndimage
from skimage.transform import SimilarityTransform, resize, warp

from diffad_core.data.synth.canvas import Scene, dark_backing

_PHOTO_SIDE = 512  # every photograph is used at 512 x 512 (only retina is larger)


@lru_cache(maxsize=8)
def _photo(name: str) -> np.ndarray:
    """A bundled photograph, float32 (512, 512, C) in [0, 1], C = 1 or 3."""
    image = np.asarray(getattr(skimage.data, name)(), np.float32) / 255.0
    image = image[..., None] if image.ndim == 2 else image[..., :3]
    if image.shape[:2] != (_PHOTO_SIDE, _PHOTO_SIDE):
        image = resize(image, (_PHOTO_SIDE, _PHOTO_SIDE), anti_aliasing=True).astype(np.float32)
    return image


def _shrink(crop: np.ndarray, size: int) -> np.ndarray:
    """A square crop (side >= size) resized to (size, size, C), anti-aliased."""
    if crop.shape[0] == size:
        return crop
    return resize(crop, (size, size), anti_aliasing=True, order=1).astype(np.float32)


def _jitter(rng: np.random.Generator, image: np.ndarray) -> np.ndarray:
    """Brightness and (RGB) colour-balance jitter plus faint sensor noise."""
    gain = rng.uniform(0.95, 1.05) * rng.uniform(0.98, 1.02, image.shape[-1])
    noisy = image * gain + rng.uniform(-0.02, 0.02) + rng.normal(0, 0.005, image.shape)
    return np.clip(noisy, 0, 1).astype(np.float32)


def _texture_view(rng: np.random.Generator, name: str, size: int, crop_frac: float) -> np.ndarray:
    """A random crop of ``crop_frac`` of the photo's side, flipped and quarter-turned."""
    photo = _photo(name)
    side = min(_PHOTO_SIDE, int(round(_PHOTO_SIDE * crop_frac * rng.uniform(0.94, 1.06))))
    y0, x0 = (int(rng.integers(0, _PHOTO_SIDE - side + 1)) for _ in range(2))
    crop = photo[y0:y0 + side, x0:x0 + side]
    if rng.random() < 0.5:
        crop = crop[:, ::-1]
    crop = np.rot90(crop, int(rng.integers(0, 4)))
    return _shrink(np.ascontiguousarray(crop), size)


def _object_view(rng: np.random.Generator, name: str, size: int, crop_frac: float) -> np.ndarray:
    """The photo's central ``crop_frac`` framing, shifted up to 3 % and turned up to 2 degrees."""
    photo = _photo(name)
    side = _PHOTO_SIDE * crop_frac
    centre = _PHOTO_SIDE / 2 + rng.uniform(-0.03, 0.03, 2) * side
    # Output pixel (col, row) -> photo (x, y): scale to the crop, turn about the output centre.
    to_photo = (SimilarityTransform(translation=(-size / 2, -size / 2))
                + SimilarityTransform(scale=side / size, rotation=np.deg2rad(rng.uniform(-2, 2)))
                + SimilarityTransform(translation=(centre[1], centre[0])))
    sigma = 0.4 * max(0.0, side / size - 1.0)  # anti-alias before sampling
    source = ndimage.gaussian_filter(photo, (sigma, sigma, 0)) if sigma > 0 else photo
    return warp(source, to_photo, output_shape=(size, size), order=1, mode="edge").astype(np.float32)


def _scene(rng: np.random.Generator, image: np.ndarray) -> Scene:
    size, channels = image.shape[0], image.shape[-1]
    return Scene(_jitter(rng, image), np.ones((size, size), bool), dark_backing(rng, size, channels))


def _render_moon(rng: np.random.Generator, size: int) -> Scene:
    return _scene(rng, _texture_view(rng, "moon", size, 0.5))


def _foreign_moon(rng: np.random.Generator, size: int) -> np.ndarray:
    # Moon surface magnified about threefold (larger craters: subtle), or gravel.
    return _texture_view(rng, "moon" if rng.random() < 0.5 else "gravel", size, 0.15)


def _render_tissue(rng: np.random.Generator, size: int) -> Scene:
    return _scene(rng, _texture_view(rng, "immunohistochemistry", size, 0.4))


def _foreign_tissue(rng: np.random.Generator, size: int) -> np.ndarray:
    # The same tissue at another scale with its stains' colours swapped.
    view = _texture_view(rng, "immunohistochemistry", size, float(rng.choice([0.15, 0.9])))
    return np.ascontiguousarray(view[..., rng.permutation(3)])


def _render_cameraman(rng: np.random.Generator, size: int) -> Scene:
    return _scene(rng, _object_view(rng, "camera", size, 0.85))


def _foreign_cameraman(rng: np.random.Generator, size: int) -> np.ndarray:
    return _texture_view(rng, "moon", size, 0.3)


def _render_retina(rng: np.random.Generator, size: int) -> Scene:
    return _scene(rng, _object_view(rng, "retina", size, 0.9))


def _foreign_retina(rng: np.random.Generator, size: int) -> np.ndarray:
    return _texture_view(rng, "immunohistochemistry", size, 0.3)


# (renderer, foreign material, channels) per category; defects: the painters for any image.
PHOTO_CATEGORIES: dict[str, tuple[Callable[[np.random.Generator, int], Scene],
                                  Callable[[np.random.Generator, int], np.ndarray], int]] = {
    "moon": (_render_moon, _foreign_moon, 1),
    "tissue": (_render_tissue, _foreign_tissue, 3),
    "cameraman": (_render_cameraman, _foreign_cameraman, 1),
    "retina": (_render_retina, _foreign_retina, 3),
}
