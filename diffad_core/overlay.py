"""Heat-map overlays and side-by-side panels as PNG (numpy + PIL only, no matplotlib)."""

from __future__ import annotations

from pathlib import Path

import numpy as np
from PIL import Image


def jet(values: np.ndarray) -> np.ndarray:
    """A jet-like colormap: values in [0, 1] (any shape) -> uint8 RGB (..., 3).

    Piecewise linear: dark blue -> blue -> cyan -> yellow -> red -> dark red.
    """
    v = np.clip(np.asarray(values, dtype=np.float64), 0.0, 1.0)
    r = np.clip(1.5 - np.abs(4.0 * v - 3.0), 0.0, 1.0)
    g = np.clip(1.5 - np.abs(4.0 * v - 2.0), 0.0, 1.0)
    b = np.clip(1.5 - np.abs(4.0 * v - 1.0), 0.0, 1.0)
    return (np.stack([r, g, b], axis=-1) * 255.0 + 0.5).astype(np.uint8)


def to_uint8_image(image: np.ndarray) -> np.ndarray:
    """A (3, H, W) or (H, W, 3) image in [-1, 1] -> uint8 (H, W, 3)."""
    a = np.asarray(image, dtype=np.float32)
    if a.ndim != 3:
        raise ValueError(f"expected a 3-D image, got shape {a.shape}")
    if a.shape[0] == 3 and a.shape[-1] != 3:
        a = a.transpose(1, 2, 0)
    if a.shape[-1] != 3:
        raise ValueError(f"expected 3 channels, got shape {a.shape}")
    return ((np.clip(a, -1.0, 1.0) + 1.0) * 127.5 + 0.5).astype(np.uint8)


def normalise_map(anomaly_map: np.ndarray, vmin: float | None = None,
                  vmax: float | None = None) -> np.ndarray:
    """Scale a map to [0, 1] with the given (or its own) min and max."""
    m = np.asarray(anomaly_map, dtype=np.float64)
    lo = float(m.min()) if vmin is None else float(vmin)
    hi = float(m.max()) if vmax is None else float(vmax)
    if hi <= lo:
        return np.zeros_like(m)
    return np.clip((m - lo) / (hi - lo), 0.0, 1.0)


def overlay(image: np.ndarray, anomaly_map: np.ndarray, opacity: float = 0.5,
            vmin: float | None = None, vmax: float | None = None) -> np.ndarray:
    """Blend the jet-coloured anomaly map (H, W) over the image; uint8 (H, W, 3)."""
    rgb = to_uint8_image(image)
    m = np.asarray(anomaly_map)
    if m.shape != rgb.shape[:2]:
        raise ValueError(f"map shape {m.shape} does not match image shape {rgb.shape[:2]}")
    heat = jet(normalise_map(m, vmin, vmax)).astype(np.float32)
    out = (1.0 - opacity) * rgb.astype(np.float32) + opacity * heat
    return np.clip(out + 0.5, 0, 255).astype(np.uint8)


def side_by_side(panels: list[np.ndarray], gap: int = 4) -> np.ndarray:
    """Concatenate uint8 (H, W, 3) panels horizontally with a white gap."""
    if not panels:
        raise ValueError("no panels to join")
    h = panels[0].shape[0]
    for p in panels:
        if p.shape[0] != h or p.ndim != 3 or p.shape[2] != 3:
            raise ValueError(f"panels must all be (H={h}, W, 3), got {p.shape}")
    spacer = np.full((h, gap, 3), 255, dtype=np.uint8)
    parts: list[np.ndarray] = []
    for i, p in enumerate(panels):
        if i:
            parts.append(spacer)
        parts.append(p)
    return np.concatenate(parts, axis=1)


def save_png(array: np.ndarray, path: Path | str) -> Path:
    """Write a uint8 (H, W, 3) array as PNG, creating the parent folder."""
    p = Path(path)
    p.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(np.asarray(array, dtype=np.uint8)).save(p, format="PNG")
    return p
