"""Benchmark diffad_core.metrics on 100 maps of 256x256 with blob masks, single-threaded.

Times pixel_auroc against scikit-learn's roc_auc_score (and checks they agree), pro_score at
the default FPR limit 0.3 and at 1.0 (no truncation), and image_auroc. Reports the best and
the median CPU time of several repeats (and the best wall time).
Run: .venv/bin/python bench/bench_metrics.py > bench/bench_metrics.txt
"""

from __future__ import annotations

import os

for _var in ("OMP_NUM_THREADS", "OPENBLAS_NUM_THREADS", "MKL_NUM_THREADS"):
    os.environ[_var] = "1"

import platform  # noqa: E402
import statistics  # noqa: E402
import time  # noqa: E402
from collections.abc import Callable  # noqa: E402

import numpy as np  # noqa: E402
from scipy import ndimage  # noqa: E402
from sklearn.metrics import roc_auc_score  # noqa: E402

from diffad_core.metrics import image_auroc, pixel_auroc, pro_score  # noqa: E402

N_IMAGES, SIZE, REPEATS, SEED = 100, 256, 5, 0


def _make_data(rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
    """Blob masks (1/3 of the images all-normal) and smooth noisy maps that favour the blobs."""
    yy, xx = np.mgrid[:SIZE, :SIZE]
    masks = np.zeros((N_IMAGES, SIZE, SIZE), dtype=np.uint8)
    for i in range(N_IMAGES):
        if i % 3 == 0:
            continue
        for _ in range(int(rng.integers(1, 4))):
            cy, cx = rng.integers(16, SIZE - 16, size=2)
            ry, rx = rng.integers(2, 32, size=2)
            masks[i][((yy - cy) / ry) ** 2 + ((xx - cx) / rx) ** 2 <= 1.0] = 1
    noise = ndimage.gaussian_filter(rng.normal(size=masks.shape), sigma=(0, 2, 2))
    signal = ndimage.gaussian_filter(masks.astype(np.float64), sigma=(0, 3, 3))
    maps = (noise / noise.std() + 2.0 * signal).astype(np.float32)
    return maps, masks


def _time(fn: Callable[[], float]) -> tuple[float, float, float, float]:
    """Value, best and median CPU seconds of this process, best wall seconds."""
    cpu, wall, value = [], [], 0.0
    for _ in range(REPEATS):
        c0, w0 = time.process_time(), time.perf_counter()
        value = fn()
        cpu.append(time.process_time() - c0)
        wall.append(time.perf_counter() - w0)
    return value, min(cpu), statistics.median(cpu), min(wall)


def main() -> None:
    rng = np.random.default_rng(SEED)
    maps, masks = _make_data(rng)
    image_scores = maps.reshape(N_IMAGES, -1).max(axis=1)
    image_labels = (masks.reshape(N_IMAGES, -1).max(axis=1) > 0).astype(int)
    print(f"bench_metrics: {N_IMAGES} maps of {SIZE}x{SIZE} float32, seed {SEED}, {REPEATS} repeats, 1 thread")
    print(f"python {platform.python_version()}, numpy {np.__version__}, {platform.machine()}")
    print(f"anomalous pixels: {int((masks > 0).sum())} of {masks.size}, "
          f"regions (8-conn): {sum(ndimage.label(m, np.ones((3, 3)))[1] for m in masks)}")
    rows = [
        ("pixel_auroc (diffad)", lambda: pixel_auroc(maps, masks)),
        ("roc_auc_score (sklearn)", lambda: float(roc_auc_score(masks.ravel() > 0, maps.ravel()))),
        ("pro_score fpr_limit=0.3", lambda: pro_score(maps, masks, 0.3)),
        ("pro_score fpr_limit=1.0", lambda: pro_score(maps, masks, 1.0)),
        ("image_auroc (100 images)", lambda: image_auroc(image_scores, image_labels)),
    ]
    results = {}
    print("CPU s = process CPU time (the machine may be shared); wall s = best elapsed time")
    print(f"{'metric':<28}{'value':>14}{'best CPU s':>12}{'median CPU s':>14}{'best wall s':>13}")
    for name, fn in rows:
        value, best, median, wall = _time(fn)
        results[name] = value
        print(f"{name:<28}{value:>14.10f}{best:>12.3f}{median:>14.3f}{wall:>13.3f}")
    diff = abs(results["pixel_auroc (diffad)"] - results["roc_auc_score (sklearn)"])
    print(f"|pixel_auroc - sklearn| = {diff:.2e}")


if __name__ == "__main__":
    main()
