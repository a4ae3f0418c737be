"""The use cases, one function each: train, reconstruct and score a category; score given images.

The CLI (``diffad train/score/reconstruct/predict``), the Prefect tasks (``tasks/pipeline.py``)
and the registered MLflow model (``tasks/pyfunc_model.py``) call these; the tasks only add
tracking around them. Each returns a typed record.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch

from diffad_core import results
from diffad_core._atomic import remove_stale_temporaries
from diffad_core.config import DiffadConfig, require_home
from diffad_core.data import load_model_images, prepare_split, require_verified, resolve_dataset
from diffad_core.data_fit import fit_to_data
from diffad_core.locks import file_lock
from diffad_core.model import DiffadModel, checkpoint_dir, load_model
from diffad_core.nets.adm_init import prepare_init_checkpoint
from diffad_core.overlay import to_uint8_image
from diffad_core.reconstruct import reconstruct_split
from diffad_core.runtime import prepare_for_inference, set_threads
from diffad_core.score import MapCalibration, score_batch, score_split
from diffad_core.train import TrainResult, train_model
from diffad_core.validation import AlphaChoice, ScoringFit, fit_scoring, recorded_scoring_fit


class UseCaseError(ValueError):
    """A use case asked for something the model or data cannot give (a user error)."""


@dataclass(frozen=True)
class EvaluationModel:
    """A trained model with the run's evaluation settings: ``cfg`` is the checkpoint's config
    with this run's scoring, reconstruction and metric sections (never written onto the model)."""

    model: DiffadModel
    cfg: DiffadConfig
    checkpoint: Path


@dataclass(frozen=True)
class Reconstruction:
    """One test image and its Algorithm 1 reconstruction, (H, W, 3) uint8 each."""

    input_image: np.ndarray
    reconstruction: np.ndarray


@dataclass
class ReconstructionOutcome:
    images: dict[str, Reconstruction] = field(default_factory=dict)  # rel_path -> images
    ms_per_image: float | None = None


@dataclass
class ScoreOutcome:
    """What scoring one category produced: where its parquet partition is, the alpha used
    (and how it was chosen), the map calibration, and the time per image."""

    category: str
    n_test: int
    score_ms_per_image: float
    alpha: float
    alpha_source: str
    parts: list[Path]
    alpha_choice: AlphaChoice | None = None
    calibration: MapCalibration | None = None


@dataclass(frozen=True)
class Prediction:
    """Eq. 11 on a list of images: ``image_scores`` (N,), ``anomaly_maps`` (N, S, S) and the
    preprocessed ``images`` (N, 3, S, S) in [-1, 1], float32 each, in the order given."""

    image_scores: np.ndarray
    anomaly_maps: np.ndarray
    images: np.ndarray
    alpha: float


def default_checkpoint_dir(cfg: DiffadConfig, categories: list[str]) -> Path:
    """Where ``diffad train`` puts a model: the one layout (``model.checkpoint_dir``), keyed by
    the model-defining config."""
    label = categories[0] if cfg.mode == "per_category" else "unified"
    return checkpoint_dir(cfg, label, cfg.model_hash())


def train_category(cfg: DiffadConfig, categories: list[str], out_dir: Path | None = None, *,
                   resume: bool = True, progress: bool = True,
                   on_log: Callable[[int, dict[str, float]], None] | None = None) -> TrainResult:
    """Train the model of ``categories`` (one, or all for the unified model): check the
    categories, make the data and the ADM initialisation ready, then ``train_model``."""
    require_home()  # a file or read-only DIFFAD_HOME: one line naming it, before any work
    available = cfg.categories()
    unknown = [c for c in categories if c not in available]
    if unknown:
        raise UseCaseError(f"unknown categories {unknown} for this config (choose from {', '.join(available)})")
    cfg = fit_to_data(cfg, resolve_dataset(cfg, progress=progress))
    init = prepare_init_checkpoint(cfg, progress=progress)
    out = Path(out_dir) if out_dir is not None else default_checkpoint_dir(cfg, categories)
    # One trainer per checkpoint folder: a second one waits, then finds the model finished
    # (train_model resumes or reuses it). The lock file sits beside the folder, not in it.
    with file_lock(checkpoint_lock_path(out), f"checkpoint folder {out}", wait=True):
        remove_stale_temporaries(out)  # left by a killed trainer; nobody else writes here now
        return train_model(cfg, categories, out, resume=resume, progress=progress, on_log=on_log,
                           init_weights=init.path if init is not None else None)


def checkpoint_lock_path(folder: Path) -> Path:
    """The lock file of a checkpoint folder (``.<name>.lock`` beside it)."""
    folder = Path(folder)
    return folder.parent / f".{folder.name}.lock"


def load_for_evaluation(checkpoint: Path, run_cfg: DiffadConfig | None = None) -> EvaluationModel:
    """Load a checkpoint to score or reconstruct with ``run_cfg``'s evaluation settings (a
    cached model trained under other evaluation settings is reused, not retrained). The model
    loads on ``run_cfg``'s ``runtime.device``; without a run config, anywhere ("auto")."""
    model = load_model(checkpoint, run_cfg.runtime.device if run_cfg is not None else None)
    cfg = model.cfg if run_cfg is None else model.cfg.with_evaluation_settings(run_cfg)
    set_threads(cfg.runtime.num_threads)
    prepare_for_inference(model, cfg.runtime.channels_last, cfg.runtime.compile_unet)
    return EvaluationModel(model=model, cfg=cfg, checkpoint=Path(checkpoint))


def pick_category(model: DiffadModel, category: str | None) -> str:
    """``category``, checked against the model's; the model's only one when None."""
    cats = model.categories
    if category is None:
        if len(cats) != 1:
            raise UseCaseError(f"this checkpoint holds categories {cats}; choose one with --category")
        return cats[0]
    if category not in cats:
        raise UseCaseError(f"category {category!r} is not in this checkpoint (it has {cats})")
    return category


def scoring_fit(ev: EvaluationModel, category: str, *, progress: bool = True) -> ScoringFit:
    """The map calibration and "Ours*" alpha of ``category`` under the run's scoring settings:
    the one recorded with the model, else fitted now on its held-out normals and recorded."""
    recorded = recorded_scoring_fit(ev.model, ev.cfg, category)
    if recorded is not None:
        return recorded
    resolve_dataset(ev.cfg, progress=progress)
    return fit_scoring(ev.model, ev.cfg, category)


def _alpha_of(cfg: DiffadConfig, fit: ScoringFit, alpha: float | None) -> tuple[float, str]:
    """The alpha of Eq. 11 and where it came from: ``alpha`` when given, else the recorded
    "Ours*" choice, else ``score.alpha``."""
    if alpha is not None:
        return float(alpha), "--alpha"
    if fit.alpha_choice is not None:
        return float(fit.alpha_choice.alpha), fit.alpha_choice.source
    return float(cfg.score.alpha), "config"


def reconstruct_category(ev: EvaluationModel, category: str, *, limit: int | None = None,
                         progress: bool = True) -> ReconstructionOutcome:
    """Algorithm 1 on the category's test images, anomalous first, at most ``limit``
    (default ``reconstruct.max_images_per_category``; all when None)."""
    cfg = ev.cfg
    if not cfg.reconstruct.enabled:
        return ReconstructionOutcome()
    resolve_dataset(cfg, progress=progress)
    prepared = prepare_split(cfg, category, "test")
    limit = cfg.reconstruct.max_images_per_category if limit is None else limit
    images: dict[str, Reconstruction] = {}
    start = time.perf_counter()
    for i, recon in reconstruct_split(ev.model, prepared, cfg.reconstruct, limit=limit, seed=cfg.seed,
                                      progress=progress):
        images[prepared.rel_paths[i]] = Reconstruction(
            input_image=to_uint8_image(prepared.images[i]), reconstruction=to_uint8_image(recon.numpy()))
    seconds = time.perf_counter() - start
    return ReconstructionOutcome(images=images,
                                 ms_per_image=1000.0 * seconds / len(images) if images else None)


def score_category(ev: EvaluationModel, category: str, run_dir: Path, *, model_version: str,
                   alpha: float | None = None, reconstructions: ReconstructionOutcome | None = None,
                   progress: bool = True) -> ScoreOutcome:
    """Eq. 11 over the category's test split, written as its parquet partition of ``run_dir``.

    Alpha: ``alpha`` when given, else "Ours*" when ``score.alpha_per_category``, else
    ``score.alpha``. With ``score.calibrate_maps`` both terms are first standardised on the
    held-out normal training images. Both come from ``scoring_fit``.
    """
    cfg, model = ev.cfg, ev.model
    root = resolve_dataset(cfg, progress=progress)  # the test split
    # Never score on broken ground truth (a defect without its mask, a stretched mask, ...).
    require_verified(root, cfg.data.dataset, [category])
    fit = scoring_fit(ev, category, progress=progress)
    calibration, choice = fit.calibration, fit.alpha_choice
    alpha, source = _alpha_of(cfg, fit, alpha)
    prepared = prepare_split(cfg, category, "test")
    recon = reconstructions.images if reconstructions is not None else {}
    start = time.perf_counter()
    records = score_split(model, prepared, cfg.score, alpha=alpha, calibration=calibration,
                          seed=cfg.seed, progress=progress)
    parts = results.write_scores(
        run_dir, category, records, model_version=model_version, alpha=alpha,
        alpha_source=source, preset=cfg.preset,
        reconstructions={k: r.reconstruction for k, r in recon.items()},
        input_images={k: r.input_image for k, r in recon.items()})
    seconds = time.perf_counter() - start
    n = len(prepared.labels)
    return ScoreOutcome(category=category, n_test=n, score_ms_per_image=1000.0 * seconds / max(1, n),
                        alpha=float(alpha), alpha_source=source, parts=list(parts),
                        alpha_choice=choice, calibration=calibration)


def predict_images(ev: EvaluationModel, category: str, images: Sequence[Path | bytes], *,
                   alpha: float | None = None) -> Prediction:
    """Eq. 11 and the image score of each image (a file, or an encoded file's bytes), scored in
    batches of ``score.batch_size`` with noise drawn from ``seed`` in order, so the same images
    in the same order give the same numbers (``diffad predict``, and the registered MLflow model
    of tasks/pyfunc_model.py). ``alpha``: default the "Ours*" alpha recorded with the model, else
    ``score.alpha``. That alpha and the map calibration come from :func:`scoring_fit` (recorded
    with the model; fitted on the training data when missing).
    """
    if not images:
        raise UseCaseError("no images to score")
    cfg = ev.cfg
    fit = scoring_fit(ev, category, progress=False)
    alpha, _source = _alpha_of(cfg, fit, alpha)
    calibration = fit.calibration
    inputs = load_model_images(images, int(cfg.data.image_size))
    # The feature target's input, when the model computes it at its own size.
    targets = None if cfg.feature_image_size is None else load_model_images(images, cfg.feature_image_size)
    generator = torch.Generator().manual_seed(int(cfg.seed))
    batch_size = max(1, int(cfg.score.batch_size))
    scores, maps = [], []
    for lo in range(0, len(inputs), batch_size):
        rows = slice(lo, lo + batch_size)
        batch = score_batch(ev.model, torch.from_numpy(inputs[rows]), category, cfg.score, alpha=alpha,
                            calibration=calibration, generator=generator,
                            feature_images=None if targets is None else torch.from_numpy(targets[rows]))
        scores.append(batch.image_score.float().numpy())
        maps.append(batch.anomaly.float().numpy())
    return Prediction(image_scores=np.concatenate(scores), anomaly_maps=np.concatenate(maps),
                      images=inputs, alpha=alpha)
