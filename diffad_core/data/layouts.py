"""Dataset layouts: MVTec-AD, BTAD and any MVTec-style folder (METHOD.md §1).

MVTec-AD (also "folder" and "synthetic")::

    <cat>/train/good/*.png
    <cat>/test/<defect or good>/*.png
    <cat>/ground_truth/<defect>/<stem>_mask.png

BTAD (products ``01``, ``02``, ``03``)::

    <p>/train/ok/*.bmp|png
    <p>/test/ok|ko/*.bmp|png
    <p>/ground_truth/ko/<stem>.png|bmp      (the mask shares the image's stem)

A category is any sub-folder of the root that has a ``train/`` folder; other entries at the
root (MVTec ships ``readme.txt`` and ``license.txt``) are ignored. Every listing is sorted.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from diffad_core.config import DATASET_KINDS

IMAGE_EXTENSIONS: tuple[str, ...] = (".png", ".bmp", ".jpg", ".jpeg", ".tif", ".tiff")
SPLITS: tuple[str, ...] = ("train", "test")


class DataError(Exception):
    """Base class of the data layer's errors; the message names the file and the problem."""


class DatasetLayoutError(DataError):
    """A dataset folder that does not follow its layout (missing folder, unknown category...)."""


@dataclass(frozen=True)
class Sample:
    """One image of a dataset, with its mask where it has one."""

    category: str
    split: str  # "train" | "test"
    label: int  # 0 normal, 1 anomalous
    defect_type: str  # "good" for normal (BTAD "ok" is reported as "good")
    image_path: Path
    mask_path: Path | None
    rel_path: str  # image path relative to the dataset root, posix


@dataclass(frozen=True)
class _Rules:
    normal_dir: str  # the folder name of normal images in train/ and test/
    mask_suffix: str  # appended to the image stem
    mask_exts: tuple[str, ...]


_MVTEC_RULES = _Rules(normal_dir="good", mask_suffix="_mask", mask_exts=(".png",) + tuple(
    e for e in IMAGE_EXTENSIONS if e != ".png"))
_BTAD_RULES = _Rules(normal_dir="ok", mask_suffix="", mask_exts=(".png", ".bmp") + tuple(
    e for e in IMAGE_EXTENSIONS if e not in (".png", ".bmp")))


def _rules(dataset: str) -> _Rules:
    if dataset not in DATASET_KINDS:
        raise DatasetLayoutError(
            f"unknown dataset kind {dataset!r}; choose from {', '.join(DATASET_KINDS)}"
        )
    return _BTAD_RULES if dataset == "btad" else _MVTEC_RULES


def normal_folder(dataset: str) -> str:
    """The folder name of normal images in ``train/`` and ``test/`` ("good", BTAD "ok")."""
    return _rules(dataset).normal_dir


def _is_image(path: Path) -> bool:
    return path.is_file() and not path.name.startswith(".") and path.suffix.lower() in IMAGE_EXTENSIONS


def _images_in(folder: Path) -> list[Path]:
    if not folder.is_dir():
        return []
    return sorted((p for p in folder.iterdir() if _is_image(p)), key=lambda p: p.name)


def _subdirs(folder: Path) -> list[Path]:
    if not folder.is_dir():
        return []
    return sorted(
        (p for p in folder.iterdir() if p.is_dir() and not p.name.startswith(".")),
        key=lambda p: p.name,
    )


def list_categories(root: str | Path, dataset: str = "mvtec") -> list[str]:
    """The categories under ``root``: sorted sub-folders that have a ``train/`` folder."""
    _rules(dataset)
    root = Path(root)
    if not root.is_dir():
        raise DatasetLayoutError(f"dataset root {root} does not exist or is not a folder")
    return [p.name for p in _subdirs(root) if (p / "train").is_dir()]


def mask_candidates(root: str | Path, dataset: str, category: str, defect_dir: str,
                    stem: str) -> list[Path]:
    """Where the mask of test image ``<category>/test/<defect_dir>/<stem>.*`` may be, in order."""
    rules = _rules(dataset)
    folder = Path(root) / category / "ground_truth" / defect_dir
    return [folder / f"{stem}{rules.mask_suffix}{ext}" for ext in rules.mask_exts]


def _find_mask(candidates: list[Path]) -> Path | None:
    for candidate in candidates:
        if candidate.is_file():
            return candidate
    return None


def list_samples(root: str | Path, dataset: str, category: str,
                 split: str | None = None) -> list[Sample]:
    """Every image of ``category`` (train then test, each sorted); ``split`` limits to one.

    Normal images have no mask (``mask_path`` None). An anomalous test image whose mask file is
    missing also gets ``mask_path`` None; ``verify_dataset`` reports it.
    """
    rules = _rules(dataset)
    root = Path(root)
    if split is not None and split not in SPLITS:
        raise DatasetLayoutError(f"unknown split {split!r}; choose from {', '.join(SPLITS)}")
    cat_dir = root / category
    if not (cat_dir / "train").is_dir():
        known = list_categories(root, dataset) if root.is_dir() else []
        raise DatasetLayoutError(
            f"unknown category {category!r}: {cat_dir / 'train'} does not exist "
            f"(categories under {root}: {', '.join(known) or 'none'})"
        )
    samples: list[Sample] = []
    if split in (None, "train"):
        for path in _images_in(cat_dir / "train" / rules.normal_dir):
            samples.append(Sample(category, "train", 0, "good", path, None,
                                  path.relative_to(root).as_posix()))
    if split in (None, "test"):
        for defect_dir in _subdirs(cat_dir / "test"):
            normal = defect_dir.name == rules.normal_dir
            defect_type = "good" if normal else defect_dir.name
            for path in _images_in(defect_dir):
                mask = None
                if not normal:
                    mask = _find_mask(
                        mask_candidates(root, dataset, category, defect_dir.name, path.stem)
                    )
                samples.append(Sample(category, "test", 0 if normal else 1, defect_type, path,
                                      mask, path.relative_to(root).as_posix()))
    return samples
