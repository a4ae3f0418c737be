"""Prefect tasks: thin wrappers over the use cases of ``diffad_core.usecases`` (docs/internals.md "Pipeline").

Each task does one step of a category or a run (prepare data and weights, train (cached by its
inputs), reconstruct with Algorithm 1, score with Eq. 11 into the parquet partition, metrics,
registry, report) and returns a typed record of ``tasks.records``. MLflow logging around them
lives in ``tasks.mlflow_logging``.
"""

from __future__ import annotations

import time
from pathlib import Path

import pandas as pd
from prefect import get_run_logger, task
from prefect.cache_policies import NO_CACHE

from diffad_core import results
from diffad_core.config import DiffadConfig, diffad_home
from diffad_core.data import dataset_manifest, list_samples, manifest_hash, resolve_dataset
from diffad_core.data_fit import fit_to_data
from diffad_core.model import checkpoint_dir
from diffad_core.nets import load_backbone
from diffad_core.nets.adm_init import prepare_init_checkpoint
from diffad_core.provenance import run_provenance
from diffad_core.report import build_report
from diffad_core.usecases import (
    ReconstructionOutcome,
    ScoreOutcome,
    load_for_evaluation,
    reconstruct_category,
    score_category,
    train_category,
)
from tasks import caching, registry, tracking
from tasks.records import (
    CategoryMetrics,
    PreparedData,
    RegistryOutcome,
    TrainedModel,
    WeightsInfo,
)
from tasks.runs import run_dir



# ----------------------------------------------------------------------------- preparation
@task(name="prepare-data", **caching.TRANSIENT_ONLY)
def prepare_data(cfg: DiffadConfig) -> PreparedData:
    """Synthesize, verify or download the dataset (as the config says) and hash its manifest."""
    root = resolve_dataset(cfg, progress=True)
    categories = cfg.categories()
    manifest = dataset_manifest(root, cfg.data.dataset, categories)
    # Per category too, so a change in one category's files retrains only that category.
    per_category = {cat: manifest_hash([f for f in manifest["files"] if f["path"].split("/", 1)[0] == cat])
                    for cat in categories}
    get_run_logger().info("dataset %s at %s: %d files, manifest %s", cfg.data.dataset, root,
                          len(manifest["files"]), manifest["hash"])
    return PreparedData(root=str(root), manifest_hash=manifest["hash"], categories=categories,
                        category_hashes=per_category)


@task(name="fit-config", cache_policy=NO_CACHE)
def fit_config(cfg: DiffadConfig, data: PreparedData) -> DiffadConfig:
    """The run's config with the resolved data folder and categories, and (``auto.enabled``,
    the ``cpu`` preset) the settings fitted to the data (``data_fit.fit_to_data``)."""
    located = cfg.with_changes({"data": {"root": data.root, "categories": data.categories}})
    fitted = fit_to_data(located, Path(data.root))
    if fitted is not located:
        get_run_logger().info("fitted to the data: image size %d, feature target at %d px, UNet levels %s, "
                              "%d training steps", fitted.data.image_size,
                              fitted.feature_image_size or fitted.data.image_size, fitted.unet.channel_mult,
                              fitted.train.iterations)
    return fitted


@task(name="prepare-weights", **caching.TRANSIENT_ONLY)
def prepare_weights(cfg: DiffadConfig) -> list[WeightsInfo]:
    """Fetch and verify every pretrained weight once, before any training (docs/method.md
    "Network"): the two backbones and the ImageNet ADM the UNet starts from."""
    out = []
    for role, section in (("features", cfg.features), ("padim", cfg.padim)):
        load_backbone(section.weights, tuple(section.out_indices))
        w = section.weights
        out.append(WeightsInfo(role=role, name=w.timm_name, pretrained=w.pretrained, file=w.file,
                               sha256=w.sha256))
    init = prepare_init_checkpoint(cfg, progress=True)
    if init is None:
        out.append(WeightsInfo(role="adm-init", name="none (trained from scratch)", pretrained=False))
    else:
        out.append(WeightsInfo(role="adm-init", name=init.source, pretrained=True, file=str(init.path),
                               sha256=init.sha256))
    return out


# ----------------------------------------------------------------------------- training
@task(name="train-model", cache_key_fn=caching.train_cache_key, persist_result=True,
      task_run_name="train-{label}", **caching.RETRY)
def train_model_task(cfg: DiffadConfig, categories: list[str], label: str, manifest_hash: str,
                     date: str | None = None) -> TrainedModel:
    """Train (or resume) the model for ``categories``; cached by category, model-defining
    config, dataset manifest, code version and date (see :mod:`tasks.caching`)."""
    key = caching.train_key(cfg, categories, manifest_hash, date)
    result = train_category(cfg, categories, checkpoint_dir(cfg, label, key), resume=True, progress=True)
    return TrainedModel(
        checkpoint_dir=str(result.checkpoint_dir), steps=int(result.steps), seconds=float(result.seconds),
        final_loss=float(result.final_loss), losses=[(int(s), float(v)) for s, v in result.losses],
        train_key=key, trained_at=time.time(), init_report=list(result.init_report))


# ----------------------------------------------------------------------------- per category
@task(name="reconstruct", task_run_name="reconstruct-{category}", **caching.TRANSIENT_ONLY)
def reconstruct_task(cfg: DiffadConfig, checkpoint: str, category: str) -> ReconstructionOutcome:
    """Gradient-denoising reconstruction (Algorithm 1) of the test images, anomalous first."""
    return reconstruct_category(load_for_evaluation(Path(checkpoint), cfg), category)


@task(name="score-and-write", task_run_name="score-{category}", **caching.TRANSIENT_ONLY)
def score_task(cfg: DiffadConfig, checkpoint: str, category: str, run_id: str, model_version: str,
               reconstructions: ReconstructionOutcome) -> ScoreOutcome:
    """Score the test set (Eq. 11) and write the category's parquet partition, streaming, with
    the reconstructions attached to their images."""
    return score_category(load_for_evaluation(Path(checkpoint), cfg), category, run_dir(run_id),
                          model_version=model_version, reconstructions=reconstructions)


def _rows(table: pd.DataFrame) -> list[CategoryMetrics]:
    return [CategoryMetrics.from_row(row) for row in table.to_dict(orient="records")]


@task(name="category-metrics", task_run_name="metrics-{category}", cache_policy=NO_CACHE)
def category_metrics(cfg: DiffadConfig, run_id: str, category: str,
                     timings: dict[str, float | str | None]) -> CategoryMetrics:
    """Pixel AUROC, PRO and image AUROC of one category, from its parquet partition only."""
    table = results.evaluate_run(run_dir(run_id), {category: timings}, categories=[category],
                                 fpr_limit=cfg.metrics.pro_fpr_limit, preset=cfg.preset, write=False)
    return next(r for r in _rows(table) if r.category == category)


# ----------------------------------------------------------------------------- run level
@task(name="aggregate", cache_policy=NO_CACHE)
def aggregate(cfg: DiffadConfig, run_id: str, timings: dict[str, dict[str, float | str | None]],
              categories: list[str]) -> list[CategoryMetrics]:
    """``metrics.parquet`` of the run from its parquet partitions only (results.evaluate_run)."""
    table = results.evaluate_run(run_dir(run_id), timings, categories=categories,
                                 fpr_limit=cfg.metrics.pro_fpr_limit, preset=cfg.preset, write=True)
    return _rows(table)


def manifest_hash_of_test_set(cfg: DiffadConfig, categories: list[str]) -> str:
    """The manifest hash of the test images and masks of ``categories`` (what a model's metrics
    were measured on; the registry compares two versions only when theirs match)."""
    root = cfg.data.resolved_root()
    samples = [s for c in categories for s in list_samples(root, cfg.data.dataset, c, split="test")]
    paths = {s.rel_path for s in samples} | {s.mask_path.relative_to(root).as_posix()
                                             for s in samples if s.mask_path is not None}
    files = dataset_manifest(root, cfg.data.dataset, categories)["files"]
    return manifest_hash([f for f in files if f["path"] in paths])


@task(name="register-model", **caching.TRANSIENT_ONLY)
def register_task(cfg: DiffadConfig, mlflow_run_id: str, checkpoint: str, label: str,
                  metrics: CategoryMetrics, run_id: str, train_key: str | None = None) -> RegistryOutcome:
    """Register the checkpoint as ``registry.model_name(cfg, label)`` (an MLflow pyfunc model,
    alias challenger) and decide on promotion to champion (``registry.tolerance``; applied when
    ``registry.promote``; only against a champion measured on the same test manifest). A
    checkpoint already registered (same train key: a cached training rescored) is not
    registered twice."""
    name = registry.model_name(cfg, label)
    if train_key:
        existing = registry.find_version(name, "train_key", train_key)
        if existing is not None:
            tracking.set_tags(mlflow_run_id, {"registered_model": name, "model_version": existing})
            return RegistryOutcome(name=name, version=existing, registered=False, promoted=False,
                                   reason=f"same checkpoint as version {existing} (train key "
                                          f"{train_key}); not registered again")
    compared = {"pixel_auroc": metrics.pixel_auroc, "pro": metrics.pro, "image_auroc": metrics.image_auroc}
    categories = cfg.categories() if label == "unified" else [label]
    tags = {"diffad_run_id": run_id, "preset": cfg.preset, "mode": cfg.mode,
            "config_hash": cfg.config_hash(), "dataset": cfg.data.dataset,
            "dataset_id": registry.dataset_id(cfg),
            registry.TEST_MANIFEST_TAG: manifest_hash_of_test_set(cfg, categories)}
    if train_key:
        tags["train_key"] = train_key
    version = registry.register_checkpoint(mlflow_run_id, Path(checkpoint), name, compared, tags=tags)
    decision = registry.promote(name, version, cfg.registry.tolerance, apply=cfg.registry.promote)
    if decision.decision == registry.NOT_COMPARED:
        get_run_logger().warning("%s version %s: %s (`diffad registry promote %s %s --reason ...` "
                                 "makes it champion by hand)", name, version, decision.reason,
                                 name, version)
    tracking.set_tags(mlflow_run_id, {"registered_model": name, "model_version": version,
                                      "promotion_decision": decision.decision})
    return RegistryOutcome(name=name, version=version, registered=True, promoted=decision.promoted,
                           reason=decision.reason, champion_version=decision.champion_version)


def _weights_note(weights: list[WeightsInfo]) -> str:
    parts = []
    for w in weights:
        source = (w.file or "timm hub") if w.pretrained else "random init / none"
        sha = f", sha256 {w.sha256[:12]}" if w.sha256 else ""
        parts.append(f"{w.role}: {w.name} ({source}{sha})")
    return "; ".join(parts)


def _computation(cfg: DiffadConfig) -> str:
    """Which of the two scorings a run's numbers come from (docs/method.md), and the sizes when
    the feature target sees larger images than the UNet and PaDiM."""
    s = cfg.score
    official = s.official_timestep_quirk and s.feature_map_size == 16 and s.kl_unbiased_std
    text = "the official code's computation" if official else "refined scoring"
    if s.calibrate_maps:
        text += ", maps calibrated on held-out normals"
    if s.feature_whitening != "none":
        text += f", feature residual whitened ({s.feature_whitening})"
    if s.kl_scale != "per_image":
        text += f", KL term in {s.kl_scale.replace('_', ' ')} (not normalised per image)"
    if cfg.feature_image_size is not None:
        text += (f"; feature target on {cfg.feature_image_size} px images, "
                 f"UNet and PaDiM on {cfg.data.image_size} px")
    return text


@task(name="build-report", cache_policy=NO_CACHE)
def report_task(cfg: DiffadConfig, run_id: str, manifest: str | None, decisions: dict[str, str],
                weights: list[WeightsInfo], data_root: str | None, mlflow_run_id: str | None) -> dict[str, str]:
    """report.md / report.html / figures under ``<DIFFAD_HOME>/reports/<run_id>``, also logged
    to the parent MLflow run."""
    out_dir = diffad_home().resolve() / "reports" / run_id
    label = "unified" if cfg.mode == "unified" else "per-category"
    paths = build_report(run_dir(run_id), out_dir, dataset=cfg.data.dataset,
                         title=f"diffad {cfg.data.dataset} ({label}, preset {cfg.preset}: "
                               f"{_computation(cfg)})",
                         registry_decisions=decisions or None,
                         provenance=run_provenance(cfg, manifest),
                         weights_note=_weights_note(weights), data_root=data_root)
    if mlflow_run_id:
        tracking.log_artifacts(mlflow_run_id, out_dir, "report")
    return {"markdown": str(paths["markdown"]), "html": str(paths["html"]), "dir": str(out_dir)}
