"""Preprocessing cache, the training Dataset, and finding the data a config asks for.

``prepare_split`` resizes a split to ``cfg.data.image_size`` (METHOD.md §1: antialiased bicubic
for images, nearest for masks, anomalous = value > 0), scales images to [-1, 1] and caches the
result under ``$DIFFAD_HOME/cache/<category manifest hash>/<size>/<split>.npz``, so a repeated
run decodes nothing. With ``features.image_size`` it also carries the same images at that size
(``feature_images``: the feature target's input, docs/method.md). ``TrainImages`` adds the random
rotation of METHOD.md §1 (ours).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
import torch.utils.data

from diffad_core._atomic import atomic_write
from diffad_core.config import DiffadConfig, diffad_home
from diffad_core.data.io import load_image, load_mask
from diffad_core.data.layouts import DatasetLayoutError, list_categories, list_samples
from diffad_core.data.manifest import dataset_manifest
from diffad_core.data.symmetry import DIHEDRAL, dihedral

_CACHE_VERSION = 1
_U16 = 65535.0


@dataclass
class PreparedSplit:
    """One split of one category, resized and scaled, ready for the model."""

    category: str
    split: str
    images: np.ndarray  # float32 (N, 3, S, S) in [-1, 1]
    masks: np.ndarray  # uint8 (N, S, S) in {0, 1}
    labels: np.ndarray  # int64 (N,)
    defect_types: list[str]
    rel_paths: list[str]
    manifest_hash: str = ""
    # The same images at ``features.image_size`` (float32 (N, 3, F, F)); None when the feature
    # target sees ``images`` themselves.
    feature_images: np.ndarray | None = None

    def __len__(self) -> int:
        return len(self.rel_paths)

    def subset(self, idx: np.ndarray) -> PreparedSplit:
        """The same split restricted to rows ``idx`` (in that order)."""
        idx = np.asarray(idx, dtype=np.int64)
        return PreparedSplit(
            self.category, self.split, self.images[idx], self.masks[idx], self.labels[idx],
            [self.defect_types[i] for i in idx], [self.rel_paths[i] for i in idx],
            self.manifest_hash, None if self.feature_images is None else self.feature_images[idx],
        )


def split_train_validation(n: int, fraction: float, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """Deterministic (train_idx, validation_idx) over ``n`` train/good images, both sorted.

    ``round(n * fraction)`` images (at least 1 when fraction > 0, and never all of them) are
    held out, chosen by ``numpy.random.default_rng(seed).permutation(n)``: the normal images
    that calibrate the maps and choose alpha ("Ours*") and that training never sees.
    """
    if n < 0:
        raise ValueError(f"n must be >= 0, got {n}")
    if not 0.0 <= float(fraction) < 1.0:
        raise ValueError(f"validation fraction must be in [0, 1), got {fraction}")
    n_val = 0
    if fraction > 0 and n >= 2:
        n_val = min(max(1, int(round(n * float(fraction)))), n - 1)
    perm = np.random.default_rng(int(seed)).permutation(n)
    return np.sort(perm[n_val:]).astype(np.int64), np.sort(perm[:n_val]).astype(np.int64)


def cache_path(manifest_hash: str, size: int, split: str) -> Path:
    """Where ``prepare_split`` caches a split."""
    return diffad_home() / "cache" / manifest_hash[:32] / str(size) / f"{split}-v{_CACHE_VERSION}.npz"


def _decode(samples: list, size: int) -> tuple[np.ndarray, np.ndarray]:
    """Images as uint16 (N, 3, S, S) (value * 65535: exact for 8-bit files) and masks."""
    images = np.empty((len(samples), 3, size, size), dtype=np.uint16)
    masks = np.empty((len(samples), size, size), dtype=np.uint8)
    for i, sample in enumerate(samples):
        img = load_image(sample.image_path, size)
        images[i] = np.round(img.transpose(2, 0, 1) * _U16).astype(np.uint16)
        masks[i] = load_mask(sample.mask_path, size)
    return images, masks


def _write_npz(path: Path, arrays: dict[str, np.ndarray]) -> None:
    """Write an .npz atomically (temporary file in the same folder, then rename)."""

    def _save(tmp: Path) -> None:
        with tmp.open("wb") as fh:
            np.savez(fh, **arrays)

    atomic_write(path, _save)


def prepare_split(cfg: DiffadConfig, category: str, split: str) -> PreparedSplit:
    """The ``split`` ("train" | "test") of ``category`` at ``cfg.data.image_size``, cached; with
    ``features.image_size`` also its images at that size (``feature_images``)."""
    if split not in ("train", "test"):
        raise ValueError(f"split must be 'train' or 'test', got {split!r}")
    root = cfg.data.resolved_root()
    dataset = cfg.data.dataset
    samples = list_samples(root, dataset, category, split)
    if not samples:
        raise DatasetLayoutError(f"category {category!r} has no {split} images under {root}")
    manifest_hash = dataset_manifest(root, dataset, [category])["hash"]
    prepared = _prepared_at(cfg, samples, manifest_hash, cfg.data.image_size, category, split)
    if cfg.feature_image_size is not None:
        prepared.feature_images = _prepared_at(cfg, samples, manifest_hash, cfg.feature_image_size,
                                               category, split).images
    return prepared


def _prepared_at(cfg: DiffadConfig, samples: list, manifest_hash: str, size: int, category: str,
                 split: str) -> PreparedSplit:
    """``samples`` at ``size``: from the cache when it holds them, else decoded (and cached)."""
    path = cache_path(manifest_hash, size, split)
    rel_paths = [s.rel_path for s in samples]
    if cfg.data.cache and path.is_file():
        try:
            with np.load(path, allow_pickle=False) as z:
                cached_paths = [str(p) for p in z["rel_paths"]]
                if cached_paths == rel_paths:
                    images16, masks = z["images"], z["masks"]
                    labels = z["labels"].astype(np.int64)
                    defect_types = [str(d) for d in z["defect_types"]]
                    return _as_split(category, split, images16, masks, labels, defect_types,
                                     rel_paths, manifest_hash)
        except (OSError, ValueError, KeyError):
            pass  # a damaged cache file is rebuilt below
    images16, masks = _decode(samples, size)
    labels = np.array([s.label for s in samples], dtype=np.int64)
    defect_types = [s.defect_type for s in samples]
    if cfg.data.cache:
        _write_npz(path, {"images": images16, "masks": masks, "labels": labels,
                          "defect_types": np.array(defect_types), "rel_paths": np.array(rel_paths)})
    return _as_split(category, split, images16, masks, labels, defect_types, rel_paths, manifest_hash)


def _as_split(category: str, split: str, images16: np.ndarray, masks: np.ndarray,
              labels: np.ndarray, defect_types: list[str], rel_paths: list[str],
              manifest_hash: str) -> PreparedSplit:
    images = images16.astype(np.float32) * np.float32(2.0 / _U16) - np.float32(1.0)  # [0,1] -> [-1,1]
    return PreparedSplit(category, split, images, masks.astype(np.uint8), labels,
                         defect_types, rel_paths, manifest_hash)


# ----------------------------------------------------------------------------- training Dataset
def rotate(image: torch.Tensor, degrees: float, padding: str = "reflection") -> torch.Tensor:
    """Rotate (C, H, W) or (B, C, H, W) counter-clockwise by ``degrees`` about the centre.

    Bilinear sampling; ``padding`` ("reflection", "border" or "zeros") fills the corners.
    """
    x = image.unsqueeze(0) if image.dim() == 3 else image
    b, _, h, w = x.shape
    rad = math.radians(degrees)
    cos, sin = math.cos(rad), math.sin(rad)
    # affine_grid maps output coords to input coords in normalised [-1, 1] space; scale by the
    # aspect ratio so the rotation is rigid in pixels for non-square images.
    theta = torch.tensor([[cos, -sin * h / w, 0.0], [sin * w / h, cos, 0.0]],
                         dtype=x.dtype, device=x.device).expand(b, 2, 3)
    grid = F.affine_grid(theta, list(x.shape), align_corners=False)
    out = F.grid_sample(x, grid, mode="bilinear", padding_mode=padding, align_corners=False)
    return out.squeeze(0) if image.dim() == 3 else out


class TrainImages(torch.utils.data.Dataset):
    """Training images of one or more categories as a torch Dataset.

    ``__getitem__`` returns (image (3, S, S) float32 in [-1, 1], the feature target's input,
    class index). The target's input is the same image at ``features.image_size`` when the
    splits carry ``feature_images``, else the image itself. With ``augment`` each access rotates
    the image (and its target input, by the same angle) by an angle uniform in
    +-``rotation_degrees`` (METHOD.md §1, ours), reflection-padded; ``transforms`` (one tuple of
    ``symmetry.DIHEDRAL`` names per prepared split, ``data.augment_dihedral``) first shows it as
    it is or under one of its split's transforms, with equal probability (no draw for a split
    without any). With ``crop`` it then returns
    a random ``crop`` x ``crop`` window of the image (``data.train_crop``). Angles and windows
    come from a torch Generator (``generator``, else one seeded with ``seed``); each DataLoader
    worker reseeds from its own worker seed, and ``set_epoch(e)`` reseeds from (seed, e), so a
    run (and a resumed run) is reproducible.
    """

    def __init__(self, prepared_splits: list[PreparedSplit], rotation_degrees: float,
                 augment: bool, class_index: dict[str, int], *, seed: int = 0,
                 generator: torch.Generator | None = None, padding: str = "reflection",
                 crop: int | None = None, transforms: list[tuple[str, ...]] | None = None) -> None:
        if not prepared_splits:
            raise ValueError("TrainImages needs at least one prepared split")
        transforms = [()] * len(prepared_splits) if transforms is None else list(transforms)
        if len(transforms) != len(prepared_splits):
            raise ValueError(f"{len(transforms)} transform lists for {len(prepared_splits)} prepared splits")
        unknown = sorted({name for names in transforms for name in names} - set(DIHEDRAL))
        if unknown:
            raise ValueError(f"unknown transforms {unknown}; known: {list(DIHEDRAL)}")
        missing = [p.category for p in prepared_splits if p.category not in class_index]
        if missing:
            raise KeyError(f"categories {missing} are not in class_index {class_index}")
        self.images = torch.from_numpy(np.concatenate([p.images for p in prepared_splits]))
        with_targets = {p.feature_images is not None for p in prepared_splits}
        if len(with_targets) > 1:
            raise ValueError("either every prepared split carries feature_images or none does")
        self.feature_images = (torch.from_numpy(np.concatenate([p.feature_images for p in prepared_splits]))
                               if with_targets == {True} else None)
        self.classes = torch.tensor(
            [class_index[p.category] for p in prepared_splits for _ in range(len(p))],
            dtype=torch.long)
        self.transforms = [tuple(names) for p, names in zip(prepared_splits, transforms) for _ in range(len(p))]
        self.rotation_degrees = float(rotation_degrees)
        self.augment = bool(augment) and self.rotation_degrees > 0
        self.padding = padding
        side = min(self.images.shape[-2:])
        if crop is not None and not 1 <= crop <= side:
            raise ValueError(f"crop={crop} must be between 1 and the image side {side}")
        if crop is not None and self.feature_images is not None:
            raise ValueError("a training crop with feature_images is not defined")
        self.crop = crop
        self.seed = seed
        self.generator = generator if generator is not None else torch.Generator().manual_seed(seed)
        self._worker_id: int | None = None

    def set_epoch(self, epoch: int) -> None:
        """Reseed the rotation angles from (seed, epoch): epoch e draws the same angles in any run."""
        self.generator.manual_seed(self.seed * 1_000_003 + int(epoch))
        self._worker_id = None

    def __len__(self) -> int:
        return int(self.images.shape[0])

    def _rng(self) -> torch.Generator:
        info = torch.utils.data.get_worker_info()
        if info is not None and self._worker_id != info.id:
            self._worker_id = info.id
            self.generator.manual_seed(info.seed % (2**63))
        return self.generator

    def __getitem__(self, index: int) -> tuple[torch.Tensor, torch.Tensor, int]:
        image = self.images[index]
        target_input = image if self.feature_images is None else self.feature_images[index]
        choices = self.transforms[index]
        if choices:
            pick = int(torch.randint(len(choices) + 1, (), generator=self._rng()))
            if pick:  # 0: as it is
                image = dihedral(image, choices[pick - 1])
                target_input = image if self.feature_images is None else dihedral(target_input, choices[pick - 1])
        if self.augment:
            u = torch.rand((), generator=self._rng()).item()
            degrees = (2.0 * u - 1.0) * self.rotation_degrees
            image = rotate(image, degrees, self.padding)
            target_input = image if self.feature_images is None else rotate(target_input, degrees, self.padding)
        if self.crop is not None:
            h, w = image.shape[-2:]
            top = int(torch.randint(h - self.crop + 1, (), generator=self._rng()))
            left = int(torch.randint(w - self.crop + 1, (), generator=self._rng()))
            image = image[..., top:top + self.crop, left:left + self.crop].contiguous()
            target_input = image
        return image, target_input, int(self.classes[index])


# ----------------------------------------------------------------------------- resolve
def resolve_dataset(cfg: DiffadConfig, progress: bool = True) -> Path:
    """The dataset root for ``cfg``, making it exist as the config says.

    synthetic: generate what is missing or stale; mvtec/btad: an existing folder with the
    categories is used as is, else download; folder: must exist and hold the categories.
    """
    data = cfg.data
    root = data.resolved_root()
    wanted = cfg.categories()
    if data.dataset == "synthetic":
        from diffad_core.data.synth import generate_dataset

        # Idempotent: categories whose marker matches the settings are left alone.
        generate_dataset(root, data.synth.model_copy(update={"categories": wanted}),
                         progress=progress)
    elif data.dataset in ("mvtec", "btad"):
        if not (root.is_dir() and set(wanted) <= set(list_categories(root, data.dataset))):
            from diffad_core.data.download import download_dataset

            source = data.sources.get(data.dataset)
            if source is None:
                raise DatasetLayoutError(f"no download source for {data.dataset!r} in data.sources")
            download_dataset(data.dataset, root, source, progress=progress)
    elif not root.is_dir():
        raise DatasetLayoutError(f"dataset folder {root} does not exist (data.root)")
    found = list_categories(root, data.dataset)
    missing = [c for c in wanted if c not in found]
    if missing:
        raise DatasetLayoutError(f"categories {missing} are not under {root} "
                                 f"(found: {', '.join(found) or 'none'})")
    return root
