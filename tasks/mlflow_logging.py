"""Prefect tasks that log a run to MLflow: parent and child runs, loss curves, metrics, figures.

The MLflow client helpers are in ``tasks.tracking``; these tasks decide what a run records:
provenance tags (git SHA, dataset manifest hash, seed, library versions, resolved config), the
training curve and initialisation, per-category metrics, alpha and map calibration, figures.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from prefect import task

from diffad_core.config import DiffadConfig, diffad_home
from diffad_core.provenance import provenance_tags as flat_tags
from diffad_core.provenance import run_provenance
from diffad_core.report import category_figure
from diffad_core.usecases import ScoreOutcome
from tasks import caching, tracking
from tasks.records import CategoryMetrics, TrainedModel, WeightsInfo
from tasks.runs import flow_run_id, run_dir

_LOGGED = ("pixel_auroc", "pro", "image_auroc", "n_test", "score_ms_per_image",
           "reconstruct_ms_per_image", "train_seconds", "alpha")


def provenance_tags(cfg: DiffadConfig, manifest_hash: str | None) -> dict[str, Any]:
    """Tags every MLflow run carries: git SHA, manifest hash, seed, library versions, preset,
    config hash, code version and the Prefect flow-run id."""
    prov = run_provenance(cfg, manifest_hash)
    tags: dict[str, Any] = flat_tags(prov)
    tags.update({
        "dataset_manifest_hash": manifest_hash or "unknown",
        "mode": cfg.mode,
        "dataset": cfg.data.dataset,
        "code_version": caching.code_version(),
        "prefect_flow_run_id": flow_run_id() or "none",
        "library_versions": json.dumps(prov.get("versions") or {}, sort_keys=True),
    })
    return tags


@task(name="mlflow-open-run", **caching.TRANSIENT_ONLY)
def open_mlflow_run(cfg: DiffadConfig, run_name: str, manifest_hash: str | None,
                    tags: dict[str, Any], parent_run_id: str | None = None) -> str:
    """Open an MLflow run (a child when ``parent_run_id`` is given) with the resolved config as
    params and the provenance tags."""
    all_tags = {**provenance_tags(cfg, manifest_hash), **tags}
    return tracking.start_run(cfg, run_name, all_tags, parent_run_id=parent_run_id)


@task(name="mlflow-close-run", **caching.TRANSIENT_ONLY)
def close_mlflow_run(mlflow_run_id: str, status: str = "FINISHED") -> None:
    tracking.end_run(mlflow_run_id, status)


@task(name="mlflow-log-weights", **caching.TRANSIENT_ONLY)
def log_weights(mlflow_run_id: str, weights: list[WeightsInfo]) -> None:
    """Which pretrained weights the run used, with their sha256 (the ADM's is recorded on its
    first download: it is not published)."""
    tracking.set_tags(mlflow_run_id, {f"weights.{w.role}": f"{w.name} sha256={w.sha256 or 'n/a'}"
                                      for w in weights})


@task(name="mlflow-log-training", **caching.TRANSIENT_ONLY)
def log_training(mlflow_run_id: str, train: TrainedModel, cached: bool) -> None:
    """The loss curve (step-wise), training time, checkpoint location and the table of tensors
    loaded from / re-initialised after the ImageNet ADM checkpoint."""
    tracking.log_curve(mlflow_run_id, "train_loss", train.losses)
    tracking.log_metrics(mlflow_run_id, {"train_seconds": train.seconds, "train_steps": train.steps,
                                         "final_loss": train.final_loss})
    tracking.set_tags(mlflow_run_id, {"checkpoint_dir": train.checkpoint_dir,
                                      "train_key": train.train_key,
                                      "train_cached": str(bool(cached)).lower(),
                                      "init": "from scratch" if not train.init_report else "ImageNet ADM"})
    if train.init_report:
        tracking.log_dict(mlflow_run_id, {"init_report": train.init_report}, "init_report.json")


@task(name="mlflow-log-category", **caching.TRANSIENT_ONLY)
def log_category(mlflow_run_id: str, run_id: str, category: str, metrics: CategoryMetrics,
                 scored: ScoreOutcome, data_root: Path | None = None) -> None:
    """The three metrics and timings, how alpha was chosen, the map calibration, and the
    category's figure as an artifact (input images read from ``data_root`` where the run's
    partition has none)."""
    values = metrics.model_dump()
    tracking.log_metrics(mlflow_run_id, {k: values.get(k) for k in _LOGGED
                                         if isinstance(values.get(k), (int, float))})
    tracking.set_tags(mlflow_run_id, {"alpha_source": scored.alpha_source})
    if scored.alpha_choice is not None:
        tracking.log_dict(mlflow_run_id, scored.alpha_choice.to_dict(), "alpha_choice.json")
    if scored.calibration is not None:
        tracking.log_dict(mlflow_run_id, scored.calibration.to_dict(), "map_calibration.json")
    # The report's figure of the category (report.category_figure): a few images, then its
    # weakest ones, each as input | ground truth | map overlay | reconstruction.
    made = category_figure(run_dir(run_id), category,
                           diffad_home().resolve() / "figures" / run_id / f"{category}.png",
                           data_root=data_root)
    if made is not None:
        tracking.log_artifacts(mlflow_run_id, made[0], "figures")


@task(name="mlflow-log-run-metrics", **caching.TRANSIENT_ONLY)
def log_run_metrics(mlflow_run_id: str, rows: list[CategoryMetrics]) -> None:
    """Per-category and mean metrics on the parent run (``<category>.<metric>``)."""
    values: dict[str, float | None] = {}
    for row in rows:
        for key in ("pixel_auroc", "pro", "image_auroc"):
            v = getattr(row, key)
            if isinstance(v, (int, float)):
                values[f"{row.category}.{key}"] = float(v)
                if row.category == "mean":
                    values[key] = float(v)
    tracking.log_metrics(mlflow_run_id, values)
