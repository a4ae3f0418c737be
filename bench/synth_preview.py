"""Write bench/synth_preview.png: a grid of synthetic dataset examples for humans to look at.

One row per category: a normal image, then for each defect type one anomalous image and
its ground-truth mask. Usage: ``python bench/synth_preview.py [--size 128] [--seed 0]
[--index 0] [--out bench/synth_preview.png]``.
"""

from __future__ import annotations

import argparse
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw

from diffad_core.config import SYNTH_CATEGORIES
from diffad_core.data.synth import CATEGORY_DEFECTS
from diffad_core.data.synth.writer import _render_sample

_PAD = 4
_LABEL_H = 14


def _rgb(array: np.ndarray) -> np.ndarray:
    return np.repeat(array, 3, axis=-1) if array.shape[-1] == 1 else array


def _tile(canvas: Image.Image, array: np.ndarray, row: int, col: int, size: int,
          label: str) -> None:
    x = _PAD + col * (size + _PAD)
    y = _PAD + row * (size + _LABEL_H + _PAD)
    canvas.paste(Image.fromarray(_rgb(array)), (x, y + _LABEL_H))
    ImageDraw.Draw(canvas).text((x + 1, y + 1), label, fill=(255, 255, 255))


def build_preview(size: int, seed: int, index: int) -> Image.Image:
    """The preview grid as a PIL image."""
    n_cols = 1 + 2 * max(len(CATEGORY_DEFECTS[c]) for c in SYNTH_CATEGORIES)
    width = _PAD + n_cols * (size + _PAD)
    height = _PAD + len(SYNTH_CATEGORIES) * (size + _LABEL_H + _PAD)
    canvas = Image.new("RGB", (width, height), (40, 40, 40))
    for row, category in enumerate(SYNTH_CATEGORIES):
        _, good, _ = _render_sample(category, size, seed, "test", "good", index)
        _tile(canvas, good, row, 0, size, f"{category} good")
        for k, defect in enumerate(CATEGORY_DEFECTS[category]):
            _, image, mask = _render_sample(category, size, seed, "test", defect, index)
            assert mask is not None
            _tile(canvas, image, row, 1 + 2 * k, size, defect)
            _tile(canvas, mask[..., None], row, 2 + 2 * k, size, f"{defect} mask")
    return canvas


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--size", type=int, default=128)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--index", type=int, default=0)
    parser.add_argument("--out", type=Path, default=Path(__file__).with_name("synth_preview.png"))
    args = parser.parse_args()
    build_preview(args.size, args.seed, args.index).save(args.out)
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
