"""Small ScoreRecord sets for the results and report tests."""

from __future__ import annotations

import numpy as np

from diffad_core.score import ScoreRecord


def make_records(category: str, n_good: int = 3, n_bad: int = 3, size: int = 8, seed: int = 0,
                 kinds: tuple[str, ...] = ("bad",)) -> list[ScoreRecord]:
    """Anomalous images (defect kinds in turn) have a 3x3 defect the map highlights, noisily."""
    rng = np.random.default_rng(seed)
    out = []
    for i in range(n_good + n_bad):
        label = int(i >= n_good)
        kind = kinds[(i - n_good) % len(kinds)] if label else "good"
        mask = np.zeros((size, size), np.uint8)
        amap = rng.random((size, size)).astype(np.float32)
        if label:
            r, c = rng.integers(0, size - 3, 2)
            mask[r:r + 3, c:c + 3] = 1
            amap[r:r + 3, c:c + 3] += 0.7
        out.append(ScoreRecord(
            rel_path=f"{category}/test/{kind}/{i:03d}.png", defect_type=kind, label=label,
            image_score=float(np.sort(amap.ravel())[-4:].mean()), anomaly_map=amap,
            kl_map=amap * 2.0, feature_map=rng.random((size, size)).astype(np.float32), mask=mask,
            category=category, alpha=0.5,
            ablation_scores={"kl": float(amap.max()), "rgb": float(rng.random())},
            ablation_maps={"rgb": rng.random((size, size)).astype(np.float32)},
        ))
    return out
