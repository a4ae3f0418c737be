"""Write bench/heldout_preview.png: a grid of held-out family examples for humans to look at.

One row per category and test index (index 0: small defects, index 1: medium ones): the clean
image, then for each defect kind the defective image as written and the same with the mask
outline in red. Usage: ``python bench/heldout_preview.py [--size 128] [--seed 0]
[--indices 0 1] [--out bench/heldout_preview.png]``.
"""

from __future__ import annotations

import argparse
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw
from scipy import ndimage

from diffad_core.data.heldout import CATEGORIES, DEFECTS, _render_sample

_PAD = 4
_LABEL_H = 14


def _rgb(array: np.ndarray) -> np.ndarray:
    return np.repeat(array, 3, axis=-1) if array.shape[-1] == 1 else array


def _outlined(image: np.ndarray, mask: np.ndarray) -> np.ndarray:
    edge = mask & ~ndimage.binary_erosion(mask, border_value=0)
    out = _rgb(image).copy()
    out[edge] = (255, 0, 0)
    return out


def _tile(canvas: Image.Image, array: np.ndarray, row: int, col: int, size: int,
          label: str) -> None:
    x = _PAD + col * (size + _PAD)
    y = _PAD + row * (size + _LABEL_H + _PAD)
    canvas.paste(Image.fromarray(_rgb(array)), (x, y + _LABEL_H))
    ImageDraw.Draw(canvas).text((x + 1, y + 1), label, fill=(255, 255, 255))


def build_preview(size: int, seed: int, indices: list[int]) -> Image.Image:
    """The preview grid as a PIL image; prints each defect's changed-pixel share."""
    n_cols = 1 + 2 * len(DEFECTS)
    rows = [(c, i) for c in CATEGORIES for i in indices]
    canvas = Image.new("RGB", (_PAD + n_cols * (size + _PAD),
                               _PAD + len(rows) * (size + _LABEL_H + _PAD)), (40, 40, 40))
    for row, (category, index) in enumerate(rows):
        clean, _, _ = _render_sample(category, "good", index, seed=seed, size=size)
        _tile(canvas, clean, row, 0, size, f"{category} good #{index}")
        shares = []
        for k, defect in enumerate(DEFECTS):
            _, image, mask = _render_sample(category, defect, index, seed=seed, size=size)
            share = 100 * mask.mean()
            shares.append(f"{defect} {share:.2f}%")
            _tile(canvas, image, row, 1 + 2 * k, size, f"{defect} #{index}")
            _tile(canvas, _outlined(image, mask), row, 2 + 2 * k, size, f"{share:.2f}% of image")
        print(f"{category} #{index}: " + ", ".join(shares))
    return canvas


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--size", type=int, default=128)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--indices", type=int, nargs="+", default=[0, 1])
    parser.add_argument("--out", type=Path,
                        default=Path(__file__).with_name("heldout_preview.png"))
    args = parser.parse_args()
    build_preview(args.size, args.seed, args.indices).save(args.out)
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
