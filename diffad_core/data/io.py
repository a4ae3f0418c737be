"""Image and mask loading.

Images come back as float32 (H, W, 3) RGB in [0, 1]: grayscale, palette and RGBA files become
RGB (alpha dropped), 16-bit files are scaled by 1/65535. Resizing is antialiased bicubic for
images and nearest-neighbour for masks; a mask pixel is anomalous when its value is > 0
(METHOD.md §1, ours).
"""

from __future__ import annotations

import io
from collections.abc import Sequence
from pathlib import Path

import numpy as np
from PIL import Image, UnidentifiedImageError

from diffad_core.data.layouts import DataError


class ImageReadError(DataError):
    """An image or mask that cannot be decoded (missing, truncated, not an image)."""


class MaskSizeError(DataError):
    """A mask whose size differs from its image's."""


_BITS16_MODES = ("I;16", "I;16B", "I;16L", "I;16N", "I")


def _open(path: Path, data: bytes | None = None) -> Image.Image:
    """Open and fully decode ``path`` (or its already-read bytes), naming the file on failure."""
    try:
        img = Image.open(io.BytesIO(data) if data is not None else path)
        img.load()
    except FileNotFoundError:
        raise ImageReadError(f"{path}: file does not exist") from None
    except UnidentifiedImageError:
        raise ImageReadError(f"{path}: not a readable image") from None
    except (OSError, SyntaxError, ValueError) as exc:
        raise ImageReadError(f"{path}: unreadable or truncated image ({exc})") from None
    return img


def image_size(path: str | Path) -> tuple[int, int]:
    """(width, height) from the file header, without decoding the pixels."""
    path = Path(path)
    try:
        with Image.open(path) as img:
            return img.size
    except FileNotFoundError:
        raise ImageReadError(f"{path}: file does not exist") from None
    except (UnidentifiedImageError, OSError, SyntaxError, ValueError) as exc:
        raise ImageReadError(f"{path}: not a readable image ({exc})") from None


def _to_float_rgb(img: Image.Image, path: Path) -> np.ndarray:
    """Decoded PIL image -> float32 (H, W, 3) in [0, 1]."""
    mode = img.mode
    if mode in _BITS16_MODES:
        # 16-bit grayscale (PIL decodes 16-bit PNGs as I;16 or I): full scale is 65535.
        arr = np.asarray(img).astype(np.float32) / 65535.0
        arr = np.clip(arr, 0.0, 1.0)
        return np.repeat(arr[:, :, None], 3, axis=2)
    if mode == "F":
        arr = np.clip(np.asarray(img, dtype=np.float32), 0.0, 1.0)
        return np.repeat(arr[:, :, None], 3, axis=2)
    if mode not in ("RGB",):
        img = img.convert("RGBA").convert("RGB") if mode in ("P", "PA") else img.convert("RGB")
    arr = np.asarray(img)
    if arr.dtype != np.uint8 or arr.ndim != 3 or arr.shape[2] != 3:
        raise ImageReadError(f"{path}: unsupported image mode {mode!r}")
    return arr.astype(np.float32) / 255.0


def _resize_float(arr: np.ndarray, size: int) -> np.ndarray:
    """Antialiased bicubic resize of a float (H, W, C) array, channel by channel (PIL mode F)."""
    channels = [
        np.asarray(Image.fromarray(np.ascontiguousarray(arr[:, :, c]), mode="F").resize(
            (size, size), Image.Resampling.BICUBIC))
        for c in range(arr.shape[2])
    ]
    return np.clip(np.stack(channels, axis=2), 0.0, 1.0).astype(np.float32)


def load_image(path: str | Path, size: int | None = None, *, data: bytes | None = None) -> np.ndarray:
    """Decode an image to float32 (H, W, 3) RGB in [0, 1]; ``size`` resizes to size x size.

    ``data`` may hold the file's bytes when the caller has already read them.
    """
    path = Path(path)
    img = _open(path, data)
    if size is not None and img.size != (size, size) and img.mode in ("RGB", "L", "P", "PA",
                                                                       "RGBA", "LA", "1", "CMYK"):
        # 8-bit images: resize in PIL's own 8-bit bicubic (antialiased when shrinking).
        rgb = img.convert("RGBA").convert("RGB") if img.mode in ("P", "PA") else img.convert("RGB")
        rgb = rgb.resize((size, size), Image.Resampling.BICUBIC)
        return np.asarray(rgb).astype(np.float32) / 255.0
    arr = _to_float_rgb(img, path)
    if size is not None and arr.shape[:2] != (size, size):
        arr = _resize_float(arr, size)
    return arr


def load_model_images(sources: Sequence[Path | bytes], size: int | None) -> np.ndarray:
    """Image files (or their encoded bytes) as the model's input: float32 (N, 3, S, S) in
    [-1, 1], each decoded by :func:`load_image` at ``size`` (None: as it is)."""
    arrays = [load_image(Path(f"input image {i}"), size, data=source) if isinstance(source, bytes)
              else load_image(Path(source), size)
              for i, source in enumerate(sources)]
    return np.ascontiguousarray(np.stack(arrays).transpose(0, 3, 1, 2)) * 2.0 - 1.0


def _mask_bool(img: Image.Image, path: Path) -> np.ndarray:
    """Decoded mask -> bool (H, W): anomalous where any channel is > 0."""
    if img.mode in ("RGBA", "PA", "P"):
        img = img.convert("RGB")  # alpha dropped; palette indices become colours
    elif img.mode in ("LA", "1"):
        img = img.convert("L")
    arr = np.asarray(img)
    if arr.ndim == 3:
        arr = arr.max(axis=2)
    if arr.ndim != 2:
        raise ImageReadError(f"{path}: unsupported mask mode {img.mode!r}")
    return arr > 0


def load_mask(path: str | Path | None, size: int | None,
              like_image: str | Path | None = None, *, data: bytes | None = None) -> np.ndarray:
    """Decode a mask to uint8 {0, 1} (H, W), anomalous = value > 0; nearest resize to ``size``.

    ``path`` None (a normal image) gives an all-zero mask of ``size``, or of ``like_image``'s
    size when ``size`` is None. With ``like_image`` the mask must have that image's size
    (``MaskSizeError`` otherwise).
    """
    if path is None:
        if size is None:
            if like_image is None:
                raise ValueError("load_mask(None, size=None) needs like_image to know the size")
            w, h = image_size(like_image)
            return np.zeros((h, w), dtype=np.uint8)
        return np.zeros((size, size), dtype=np.uint8)
    path = Path(path)
    img = _open(path, data)
    if like_image is not None:
        expected = image_size(like_image)
        if img.size != expected:
            raise MaskSizeError(
                f"{path}: mask is {img.size[0]}x{img.size[1]} but its image {like_image} is "
                f"{expected[0]}x{expected[1]}"
            )
    mask = _mask_bool(img, path).astype(np.uint8)
    if size is not None and mask.shape != (size, size):
        mask = np.asarray(Image.fromarray(mask * 255, mode="L").resize(
            (size, size), Image.Resampling.NEAREST)) > 0
        mask = mask.astype(np.uint8)
    return mask
