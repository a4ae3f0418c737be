"""Tiny dataset builders for the data-layer tests (imported by conftest and the tests)."""

from __future__ import annotations

from pathlib import Path

import numpy as np
from PIL import Image


def write_image(path: Path, value: int | tuple[int, ...] = 128, size: int = 8,
                mode: str = "RGB", fmt: str | None = None) -> Path:
    """A constant image (with a bright top-left pixel so files differ by value)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    channels = {"RGB": 3, "L": 1, "RGBA": 4}[mode]
    arr = np.empty((size, size, channels), dtype=np.uint8)
    arr[:] = value
    arr[0, 0] = 255
    img = Image.fromarray(arr[:, :, 0] if channels == 1 else arr, mode=mode)
    img.save(path, format=fmt)
    return path


def write_mask(path: Path, size: int = 8, box: tuple[int, int, int, int] = (2, 2, 5, 5)) -> Path:
    """A 0/255 mask with a rectangle ``box`` = (y0, x0, y1, x1) set."""
    path.parent.mkdir(parents=True, exist_ok=True)
    arr = np.zeros((size, size), dtype=np.uint8)
    y0, x0, y1, x1 = box
    arr[y0:y1, x0:x1] = 255
    Image.fromarray(arr, mode="L").save(path)
    return path


def build_mvtec(root: Path, categories: tuple[str, ...] = ("bottle", "grid"), n_train: int = 3,
                size: int = 8, defects: tuple[str, ...] = ("broken", "crack")) -> Path:
    """A tiny MVTec-AD folder (with readme.txt and license.txt at the root, as MVTec ships)."""
    root.mkdir(parents=True, exist_ok=True)
    (root / "readme.txt").write_text("MVTec AD\n")
    (root / "license.txt").write_text("CC BY-NC-SA 4.0\n")
    for ci, cat in enumerate(categories):
        for i in range(n_train):
            write_image(root / cat / "train" / "good" / f"{i:03d}.png", 10 * i + ci, size)
        write_image(root / cat / "test" / "good" / "000.png", 50, size)
        for di, defect in enumerate(defects):
            write_image(root / cat / "test" / defect / "000.png", 100 + di, size)
            write_mask(root / cat / "ground_truth" / defect / "000_mask.png", size)
    return root


def build_btad(root: Path, products: tuple[str, ...] = ("01", "03"), size: int = 8) -> Path:
    """A tiny BTAD folder: .bmp and .png images, masks named like their image."""
    for p in products:
        write_image(root / p / "train" / "ok" / "0000.bmp", 20, size, fmt="BMP")
        write_image(root / p / "train" / "ok" / "0001.png", 21, size)
        write_image(root / p / "test" / "ok" / "0000.bmp", 30, size, fmt="BMP")
        write_image(root / p / "test" / "ko" / "0000.bmp", 40, size, fmt="BMP")
        write_image(root / p / "test" / "ko" / "0001.png", 41, size)
        write_mask(root / p / "ground_truth" / "ko" / "0000.png", size)
        mask = write_mask(root / p / "ground_truth" / "ko" / "0001.tmp.png", size)
        Image.open(mask).save(mask.parent / "0001.bmp", format="BMP")
        mask.unlink()
    return root
