"""Check a dataset folder before any work: decode everything, pair masks, count, hash.

``verify_dataset`` decodes every image and mask of the asked categories, checks that every
anomalous test image has a mask of its size, counts images per split and defect type, and
computes the dataset manifest. Each problem is one line naming the file.
"""

from __future__ import annotations

from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from diffad_core.data.io import ImageReadError, load_image, load_mask
from diffad_core.data.layouts import (
    DataError,
    Sample,
    list_categories,
    list_samples,
    mask_candidates,
    normal_folder,
)
from diffad_core.data.manifest import dataset_manifest


@dataclass
class CategoryCounts:
    """Image counts of one category."""

    train_good: int = 0
    test_good: int = 0
    test_anomalous: dict[str, int] = field(default_factory=dict)  # defect type -> count
    masks: int = 0

    def to_dict(self) -> dict[str, Any]:
        return {"train_good": self.train_good, "test_good": self.test_good,
                "test_anomalous": dict(self.test_anomalous), "masks": self.masks}


@dataclass
class VerifyReport:
    """What ``verify_dataset`` found: one line per problem, counts per category, the manifest."""

    root: Path
    dataset: str
    categories: list[str]
    problems: list[str]
    counts: dict[str, CategoryCounts]
    manifest: dict[str, Any] | None

    @property
    def ok(self) -> bool:
        return not self.problems

    def table(self) -> str:
        """A plain-text table: one row per category."""
        header = ("category", "train good", "test good", "test anomalous", "masks")
        rows = []
        for cat in self.categories:
            c = self.counts.get(cat)
            if c is None:
                continue
            anomalous = sum(c.test_anomalous.values())
            detail = ", ".join(f"{k}={v}" for k, v in sorted(c.test_anomalous.items()))
            rows.append((cat, str(c.train_good), str(c.test_good),
                         f"{anomalous} ({detail})" if detail else "0", str(c.masks)))
        widths = [max(len(r[i]) for r in [header, *rows]) for i in range(len(header))]
        lines = ["  ".join(h.ljust(w) for h, w in zip(header, widths)).rstrip()]
        lines.append("  ".join("-" * w for w in widths))
        lines += ["  ".join(v.ljust(w) for v, w in zip(r, widths)).rstrip() for r in rows]
        return "\n".join(lines)


def _check_sample(root: Path, dataset: str, sample: Sample) -> list[str]:
    """Decode one sample's image (and mask); return its problems."""
    problems: list[str] = []
    try:
        image = load_image(sample.image_path)
    except ImageReadError as exc:
        return [f"unreadable image: {exc}"]
    if sample.label == 1:
        if sample.mask_path is None:
            defect_dir = sample.image_path.parent.name
            expected = mask_candidates(root, dataset, sample.category, defect_dir,
                                       sample.image_path.stem)[0]
            problems.append(f"missing mask: {sample.image_path} has no mask (expected {expected})")
        else:
            try:
                mask = load_mask(sample.mask_path, None)
            except ImageReadError as exc:
                problems.append(f"unreadable mask: {exc}")
            else:
                if mask.shape != image.shape[:2]:
                    problems.append(
                        f"size mismatch: mask {sample.mask_path} is {mask.shape[1]}x{mask.shape[0]}"
                        f" but image {sample.image_path} is {image.shape[1]}x{image.shape[0]}"
                    )
    return problems


def verify_dataset(root: str | Path, dataset: str = "mvtec", categories: list[str] | None = None,
                   *, workers: int = 4, with_manifest: bool = True) -> VerifyReport:
    """Decode and check ``categories`` (default: all found) of the dataset at ``root``."""
    root = Path(root)
    normal_dir = normal_folder(dataset)  # also rejects an unknown dataset kind
    problems: list[str] = []
    try:
        found = list_categories(root, dataset)
    except DataError as exc:
        return VerifyReport(root, dataset, list(categories or []), [str(exc)], {}, None)
    if categories:
        unknown = [c for c in categories if c not in found]
        for cat in unknown:
            problems.append(f"unknown category: {cat!r} is not under {root} "
                            f"(found: {', '.join(found) or 'none'})")
        asked = [c for c in categories if c in found]
    else:
        asked = found
        if not found:
            problems.append(f"empty dataset: no category folder with train/ under {root}")

    counts: dict[str, CategoryCounts] = {}
    all_samples: list[Sample] = []
    for cat in asked:
        samples = list_samples(root, dataset, cat)
        c = CategoryCounts()
        for s in samples:
            if s.split == "train":
                c.train_good += 1
            elif s.label == 0:
                c.test_good += 1
            else:
                c.test_anomalous[s.defect_type] = c.test_anomalous.get(s.defect_type, 0) + 1
                c.masks += s.mask_path is not None
        counts[cat] = c
        if c.train_good == 0:
            problems.append(f"empty category: {cat!r} has no training images in "
                            f"{root / cat / 'train' / normal_dir}")
        if c.test_good + sum(c.test_anomalous.values()) == 0:
            problems.append(f"empty category: {cat!r} has no test images in {root / cat / 'test'}")
        all_samples.extend(samples)

    with ThreadPoolExecutor(max_workers=max(1, workers)) as pool:
        for sample_problems in pool.map(lambda s: _check_sample(root, dataset, s), all_samples):
            problems.extend(sample_problems)

    manifest = None
    if with_manifest and asked:
        manifest = dataset_manifest(root, dataset, asked)
    return VerifyReport(root, dataset, asked, problems, counts, manifest)


__all__ = ["CategoryCounts", "VerifyReport", "verify_dataset"]
