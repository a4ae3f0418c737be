"""The per-category flow ``train-category``: train (or restore) -> reconstruct -> score -> parquet
-> metrics, with a child MLflow run under the benchmark's parent run.

It takes the run's resolved config as one parameter (a pydantic model: Prefect validates it and
sends it as JSON to a deployment on another worker), so the same flow runs in-process (local
fan-out) or on a worker elsewhere; results meet through DIFFAD_HOME and the MLflow store.
"""

from __future__ import annotations

import traceback
from pathlib import Path

from prefect import flow

from diffad_core.config import DiffadConfig
from diffad_core.data import DatasetProblems, require_verified
from diffad_core.model import MODEL_FILE
from tasks import caching
from tasks import mlflow_logging as ml
from tasks import pipeline as p
from tasks.records import CategoryOutcome, Timings, TrainedModel
from tasks.runs import write_category_status


def train_or_restore(cfg: DiffadConfig, categories: list[str], label: str, manifest_hash: str,
                     date: str | None) -> tuple[TrainedModel, bool]:
    """The training task with result persistence under DIFFAD_HOME: a cache hit restores the
    trained model; if its checkpoint was deleted since, the task runs again."""
    train_task = p.train_model_task.with_options(result_storage=caching.result_storage_path())
    state = train_task(cfg, categories, label, manifest_hash, date, return_state=True)
    train: TrainedModel = state.result()
    cached = state.name == "Cached"
    if cached and not (Path(train.checkpoint_dir) / MODEL_FILE).is_file():
        state = train_task.with_options(refresh_cache=True)(
            cfg, categories, label, manifest_hash, date, return_state=True)
        train, cached = state.result(), False
    return train, cached


def _error_text(exc: Exception) -> str:
    """The error a failed category records: with broken data, one line per bad file too."""
    text = f"{type(exc).__name__}: {exc}"
    if isinstance(exc, DatasetProblems):
        text += "".join(f"\n{line}" for line in exc.problems)
    return text


@flow(name="train-category", log_prints=True, validate_parameters=True)
def train_category(
    config: DiffadConfig,
    category: str,
    run_id: str,
    manifest_hash: str,
    parent_mlflow_run_id: str | None = None,
    unified: TrainedModel | None = None,
    date: str | None = None,
) -> CategoryOutcome:
    """One category of a benchmark run. With ``unified`` (the run's one model) it only scores;
    otherwise it trains the category's own model, or restores it from the cache."""
    cfg = config
    label = "unified" if unified is not None else category
    child = ml.open_mlflow_run(cfg, category, manifest_hash,
                               {"category": category, "diffad_run_id": run_id, "label": label},
                               parent_mlflow_run_id)
    try:
        # The checks of `diffad data verify` (cached per manifest), before any training: a
        # category with broken ground truth fails alone, one line per bad file in its error.
        require_verified(cfg.data.resolved_root(), cfg.data.dataset, [category])
        train = unified
        if train is None:
            # A category's model does not depend on which other categories share the run.
            train_cfg = cfg.with_changes({"data": {"categories": [category]}})
            train, cached = train_or_restore(train_cfg, [category], label, manifest_hash, date)
            ml.log_training(child, train, cached=cached)
        model_version = f"{label}@{train.train_key}"
        recon = p.reconstruct_task(cfg, train.checkpoint_dir, category)
        scored = p.score_task(cfg, train.checkpoint_dir, category, run_id, model_version, recon)
        timings = Timings(train_seconds=None if unified is not None else train.seconds,
                          score_ms_per_image=scored.score_ms_per_image,
                          reconstruct_ms_per_image=recon.ms_per_image)
        metrics = p.category_metrics(cfg, run_id, category,
                                     {**timings.model_dump(), "model_version": model_version,
                                      "alpha": scored.alpha})
        ml.log_category(child, run_id, category, metrics, scored, cfg.data.resolved_root())
        outcome = CategoryOutcome(
            category=category, status="done", metrics=metrics, timings=timings,
            checkpoint_dir=train.checkpoint_dir, train_key=train.train_key,
            model_version=model_version, mlflow_run_id=child, config_hash=cfg.config_hash(),
            manifest_hash=manifest_hash, alpha=scored.alpha, alpha_source=scored.alpha_source)
        write_category_status(run_id, outcome)
        ml.close_mlflow_run(child, "FINISHED")
        return outcome
    except Exception as exc:
        write_category_status(run_id, CategoryOutcome(
            category=category, status="failed", error=_error_text(exc),
            traceback=traceback.format_exc(limit=8), mlflow_run_id=child,
            config_hash=cfg.config_hash(), manifest_hash=manifest_hash))
        ml.close_mlflow_run(child, "FAILED")
        raise
