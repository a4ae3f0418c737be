"""The per-category flow ``train-category``: train (or load) -> reconstruct -> score -> parquet ->
metrics, with a child MLflow run under the benchmark's parent run.

Parameters are plain JSON values, so the same flow runs in-process (local fan-out) or as a
deployment on a worker elsewhere (distributed fan-out); results meet through DIFFAD_HOME and the
MLflow store.
"""

from __future__ import annotations

import traceback
from pathlib import Path
from typing import Any

from prefect import flow

from diffad_core.config import DiffadConfig
from tasks import pipeline as p


def train_or_restore(cfg: DiffadConfig, categories: list[str], label: str, manifest_hash: str,
                     date: str | None) -> tuple[dict[str, Any], bool]:
    """The training task with result persistence under DIFFAD_HOME: a cache hit restores the
    trained model; if its checkpoint was deleted since, the task runs again."""
    train_task = p.train_model_task.with_options(result_storage=p.caching.result_storage_path())
    state = train_task(cfg, categories, label, manifest_hash, date, return_state=True)
    train = state.result()
    cached = state.name == "Cached"
    if cached and not (Path(train["checkpoint_dir"]) / "model.safetensors").is_file():
        state = train_task.with_options(refresh_cache=True)(
            cfg, categories, label, manifest_hash, date, return_state=True)
        train, cached = state.result(), False
    return train, cached


@flow(name="train-category", log_prints=True, validate_parameters=True)
def train_category(
    category: str,
    run_id: str,
    preset: str = "cpu-demo",
    overrides: list[str] | None = None,
    dataset: str | None = None,
    root: str | None = None,
    categories: list[str] | None = None,
    manifest_hash: str | None = None,
    parent_mlflow_run_id: str | None = None,
    checkpoint_dir: str | None = None,
    train_key: str | None = None,
    date: str | None = None,
) -> dict[str, Any]:
    """One category of a benchmark run. With ``checkpoint_dir`` (the unified model) it only
    scores; otherwise it trains the category's own model, or restores it from the cache.
    ``categories``: the whole run's list (so this config and its hash equal the parent's)."""
    cfg = p.make_config(preset, overrides, dataset, root, categories)
    label = "unified" if cfg.mode == "unified" else category
    if manifest_hash is None:
        data = p.prepare_data(cfg)
        manifest_hash = data["manifest_hash"] if label == "unified" \
            else data["category_hashes"][category]
    child = p.open_mlflow_run(cfg, category, manifest_hash,
                              {"category": category, "diffad_run_id": run_id, "label": label},
                              parent_mlflow_run_id)
    try:
        train_seconds = None
        if checkpoint_dir is None:
            # A category's model does not depend on which other categories share the run.
            train_cfg = p.make_config(preset, overrides, dataset, root, [category])
            train, cached = train_or_restore(train_cfg, [category], label, manifest_hash, date)
            p.log_training(child, train, cached=cached)
            checkpoint_dir, train_key = train["checkpoint_dir"], train["train_key"]
            train_seconds = train["seconds"]
        model_version = f"{label}@{train_key}" if train_key else label
        recon = p.reconstruct_task(cfg, checkpoint_dir, category)
        scored = p.score_task(cfg, checkpoint_dir, category, run_id, model_version, recon["images"])
        timings = {"train_seconds": train_seconds, "score_ms_per_image": scored["score_ms_per_image"],
                   "reconstruct_ms_per_image": recon["ms_per_image"], "model_version": model_version}
        metrics = p.category_metrics(cfg, run_id, category, timings)
        p.log_category(child, run_id, category, metrics)
        summary = {"category": category, "status": "done", "error": None, "metrics": metrics,
                   "timings": timings, "checkpoint_dir": checkpoint_dir, "train_key": train_key,
                   "mlflow_run_id": child, "config_hash": cfg.config_hash(),
                   "manifest_hash": manifest_hash, "alpha": scored["alpha"],
                   "alpha_source": scored["alpha_source"]}
        p.write_category_status(run_id, category, summary)
        p.close_mlflow_run(child, "FINISHED")
        return summary
    except Exception as exc:
        p.write_category_status(run_id, category, {
            "category": category, "status": "failed", "error": f"{type(exc).__name__}: {exc}",
            "traceback": traceback.format_exc(limit=8), "mlflow_run_id": child,
            "config_hash": cfg.config_hash(), "manifest_hash": manifest_hash})
        p.close_mlflow_run(child, "FAILED")
        raise
