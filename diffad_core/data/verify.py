"""Check a dataset folder before any work: decode everything, pair masks, count, hash.

``verify_dataset`` decodes every image and mask of the asked categories, checks that every
anomalous test image has a mask of its size, counts images per split and defect type, and
computes the dataset manifest. Each problem is one line naming the file. ``require_verified``
is the same check for commands about to score (cached per category manifest).
"""

from __future__ import annotations

import contextlib
import hashlib
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from diffad_core._atomic import atomic_write_text
from diffad_core.config import diffad_home
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


def _outside_root(root: Path, sample: Sample) -> list[str]:
    """A problem per file of ``sample`` whose real path (symlinks followed) leaves ``root``."""
    real_root = root.resolve()
    problems = []
    for path in (sample.image_path, sample.mask_path):
        if path is not None and not path.resolve().is_relative_to(real_root):
            problems.append(f"outside the root: {path} is a link to {path.resolve()}, "
                            f"outside {real_root}")
    return problems


def _not_categories(root: Path) -> list[str]:
    """A problem per visible folder at the root that is not a category (no ``train/``)."""
    return [f"not a category: {p} has no train/ folder (empty or misplaced category?)"
            for p in sorted(root.iterdir(), key=lambda p: p.name)
            if p.is_dir() and not p.name.startswith(".") and not (p / "train").is_dir()]


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
        problems.extend(_not_categories(root))
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
        for sample in samples:
            problems.extend(_outside_root(root, sample))

    with ThreadPoolExecutor(max_workers=max(1, workers)) as pool:
        for sample_problems in pool.map(lambda s: _check_sample(root, dataset, s), all_samples):
            problems.extend(sample_problems)

    manifest = None
    if with_manifest and asked:
        manifest = dataset_manifest(root, dataset, asked)
    return VerifyReport(root, dataset, asked, problems, counts, manifest)


class DatasetProblems(DataError):
    """``verify_dataset`` found problems in categories a command needs: ``problems`` holds one
    line per file (the CLI prints each)."""

    def __init__(self, root: Path, categories: list[str], problems: list[str]) -> None:
        self.problems = list(problems)
        super().__init__(f"dataset {root}: {len(problems)} problem(s) in {', '.join(categories)}; "
                         f"refusing to use it (details: diffad data verify --root {root})")


_VERIFIED_VERSION = 1  # bump when verify_dataset checks more


def _verified_marker(dataset: str, category_hash: str) -> Path:
    key = hashlib.sha256(f"{_VERIFIED_VERSION}|{dataset}|{category_hash}".encode()).hexdigest()[:32]
    return diffad_home() / "cache" / "verified" / key


def require_verified(root: str | Path, dataset: str, categories: list[str]) -> None:
    """Raise :class:`DatasetProblems` unless ``verify_dataset`` finds ``categories`` clean.

    Before scoring or benchmarking: a defect image without a mask, a mask of another size, an
    unreadable file or a link out of the root must never be scored. A clean category is
    remembered by its manifest hash (``cache/verified/`` under DIFFAD_HOME), so a rerun on the
    same files only ``stat``s them (the manifest's hash cache); any changed file is checked again.
    """
    root = Path(root)
    found = set(list_categories(root, dataset))
    todo = list(categories)
    if set(categories) <= found:
        todo = [c for c in categories
                if not _verified_marker(dataset, dataset_manifest(root, dataset, [c])["hash"]).is_file()]
    if not todo:
        return
    report = verify_dataset(root, dataset, todo, with_manifest=False)
    if report.problems:
        raise DatasetProblems(root, todo, report.problems)
    for cat in todo:
        marker = _verified_marker(dataset, dataset_manifest(root, dataset, [cat])["hash"])
        with contextlib.suppress(OSError):  # a read-only home only means checking again next time
            atomic_write_text(marker, f"{root / cat}\n")


__all__ = ["CategoryCounts", "DatasetProblems", "VerifyReport", "require_verified", "verify_dataset"]
