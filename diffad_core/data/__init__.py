"""The data layer: layouts, loading, verification, manifest, download, preprocessing.

Names are imported lazily (on first use) so that ``import diffad_core.data`` stays cheap and
pulls in torch only when ``TrainImages`` or ``prepare_split`` is asked for.
"""

from __future__ import annotations

import importlib
from typing import Any

_EXPORTS: dict[str, str] = {
    "DataError": "layouts",
    "DatasetLayoutError": "layouts",
    "DATASET_KINDS": "layouts",
    "Sample": "layouts",
    "list_categories": "layouts",
    "list_samples": "layouts",
    "mask_candidates": "layouts",
    "ImageReadError": "io",
    "MaskSizeError": "io",
    "image_size": "io",
    "load_image": "io",
    "load_mask": "io",
    "load_model_images": "io",
    "dataset_manifest": "manifest",
    "manifest_hash": "manifest",
    "sha256_file": "manifest",
    "CategoryCounts": "verify",
    "VerifyReport": "verify",
    "verify_dataset": "verify",
    "DatasetProblems": "verify",
    "require_verified": "verify",
    "DownloadError": "download",
    "UnsafeArchiveError": "download",
    "download_file": "download",
    "download_dataset": "download",
    "safe_extract": "download",
    "PreparedSplit": "prepare",
    "TrainImages": "prepare",
    "cache_path": "prepare",
    "prepare_split": "prepare",
    "resolve_dataset": "prepare",
    "rotate": "prepare",
    "split_train_validation": "prepare",
    "DIHEDRAL": "symmetry",
    "allowed_transforms": "symmetry",
    "dihedral": "symmetry",
    "generate_dataset": "synth.writer",
    "paint_defects": "synth.defects",
}

__all__ = sorted(_EXPORTS)


def __getattr__(name: str) -> Any:
    module = _EXPORTS.get(name)
    if module is None:
        raise AttributeError(f"module 'diffad_core.data' has no attribute {name!r}")
    value = getattr(importlib.import_module(f"diffad_core.data.{module}"), name)
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(_EXPORTS))
