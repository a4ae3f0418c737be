"""Prefect tasks: thin wrappers over ``diffad_core`` plus MLflow logging (DESIGN.md "Prefect").

Each task does one step of the pipeline: prepare data and weights, train (cached by inputs),
reconstruct (Algorithm 1), score and write the parquet partition (Eq. 11), per-category metrics,
and the MLflow bookkeeping around them. Heavy modules (torch, the library) are imported inside the
tasks so that importing this module stays cheap.
"""

from __future__ import annotations

import json
import os
import time
from pathlib import Path
from typing import Any

from prefect import get_run_logger, task
from prefect.cache_policies import NO_CACHE

from diffad_core.config import DiffadConfig, diffad_home
from tasks import caching, tracking

_RETRY = {"retries": 2, "retry_delay_seconds": 2, "retry_condition_fn": caching.retry_condition}
_TRANSIENT_ONLY = {"cache_policy": NO_CACHE, **_RETRY}


def run_dir(run_id: str) -> Path:
    """``<DIFFAD_HOME>/results/<run_id>``."""
    return diffad_home().resolve() / "results" / run_id


def _threads(cfg: DiffadConfig) -> None:
    if cfg.runtime.num_threads:
        import torch

        torch.set_num_threads(int(cfg.runtime.num_threads))


def _flow_run_id() -> str | None:
    from prefect.runtime import flow_run

    value = flow_run.id
    return str(value) if value else None


def provenance_tags(cfg: DiffadConfig, manifest_hash: str | None) -> dict[str, Any]:
    """Tags every MLflow run carries: git SHA, manifest hash, seed, library versions, preset,
    config hash, code version and the Prefect flow-run id."""
    from diffad_core.provenance import provenance_tags as flat_tags
    from diffad_core.provenance import run_provenance

    prov = run_provenance(cfg, manifest_hash)
    tags: dict[str, Any] = flat_tags(prov)
    tags.update({
        "dataset_manifest_hash": manifest_hash or "unknown",
        "mode": cfg.mode,
        "dataset": cfg.data.dataset,
        "code_version": caching.code_version(),
        "prefect_flow_run_id": _flow_run_id() or "none",
        "library_versions": json.dumps(prov.get("versions") or {}, sort_keys=True),
    })
    return tags


# ----------------------------------------------------------------------------- preparation
@task(name="prepare-data", **_TRANSIENT_ONLY)
def prepare_data(cfg: DiffadConfig) -> dict[str, Any]:
    """Synthesize, verify or download the dataset (as the config says) and hash its manifest."""
    from diffad_core.data import dataset_manifest, manifest_hash, resolve_dataset

    root = resolve_dataset(cfg, progress=True)
    categories = cfg.categories()
    manifest = dataset_manifest(root, cfg.data.dataset, categories)
    # Per category too, so a change in one category's files retrains only that category.
    per_category = {}
    for cat in categories:
        files = [f for f in manifest["files"] if f["path"].split("/", 1)[0] == cat]
        per_category[cat] = manifest_hash(files)
    get_run_logger().info("dataset %s at %s: %d files, manifest %s", cfg.data.dataset, root,
                          len(manifest["files"]), manifest["hash"])
    return {"root": str(root), "manifest_hash": manifest["hash"], "categories": categories,
            "category_hashes": per_category}


@task(name="prepare-weights", **_TRANSIENT_ONLY)
def prepare_weights(cfg: DiffadConfig) -> dict[str, Any]:
    """Fetch and verify the backbone weights once, before any training (DESIGN.md "Pretrained
    weights"); returns what the report must say about them."""
    from diffad_core.nets import load_backbone

    out: dict[str, Any] = {}
    for role, section in (("features", cfg.features), ("padim", cfg.padim)):
        load_backbone(section.weights, tuple(section.out_indices))
        w = section.weights
        out[role] = {"timm_name": w.timm_name, "pretrained": w.pretrained, "file": w.file,
                     "sha256": w.sha256}
    return out


# ----------------------------------------------------------------------------- training
@task(name="train-model", cache_key_fn=caching.train_cache_key, persist_result=True,
      task_run_name="train-{label}", **_RETRY)
def train_model_task(cfg: DiffadConfig, categories: list[str], label: str, manifest_hash: str,
                     date: str | None = None) -> dict[str, Any]:
    """Train (or resume) the model for ``categories``; cached by category, training config,
    dataset manifest, code version and date (see :mod:`tasks.caching`)."""
    from diffad_core.train import train_model

    _threads(cfg)
    key = caching.train_key(cfg, categories, manifest_hash, date)
    out_dir = caching.checkpoint_dir(cfg, label, key)
    result = train_model(cfg, categories, out_dir, resume=True, progress=True)
    return {
        "checkpoint_dir": str(result.checkpoint_dir), "steps": int(result.steps),
        "seconds": float(result.seconds), "final_loss": _float(result.final_loss),
        "losses": [(int(s), float(v)) for s, v in result.losses], "train_key": key,
        "trained_at": time.time(),
    }


def _float(value: Any) -> float | None:
    return None if value is None else float(value)


# ----------------------------------------------------------------------------- per category
def _load_for_evaluation(cfg: DiffadConfig, checkpoint_dir: str) -> Any:
    """The checkpoint's model with this run's scoring/reconstruction settings (a cached model
    trained under other evaluation settings is reused, not retrained)."""
    from diffad_core.train import load_model

    model = load_model(Path(checkpoint_dir))
    model.cfg = model.cfg.with_evaluation_settings(cfg)
    return model


@task(name="reconstruct", task_run_name="reconstruct-{category}", **_TRANSIENT_ONLY)
def reconstruct_task(cfg: DiffadConfig, checkpoint_dir: str, category: str) -> dict[str, Any]:
    """Gradient-denoising reconstruction (Algorithm 1) of the test images, anomalous first,
    at most ``cfg.reconstruct.max_images_per_category`` (all when None)."""
    import numpy as np

    from diffad_core.data import prepare_split
    from diffad_core.overlay import to_uint8_image
    from diffad_core.reconstruct import reconstruct_split

    if not cfg.reconstruct.enabled:
        return {"images": {}, "ms_per_image": None}
    _threads(cfg)
    model = _load_for_evaluation(cfg, checkpoint_dir)
    prepared = prepare_split(cfg, category, "test")
    images: dict[str, dict[str, np.ndarray]] = {}
    start = time.perf_counter()
    for i, recon in reconstruct_split(model, prepared, limit=cfg.reconstruct.max_images_per_category):
        images[prepared.rel_paths[i]] = {
            "reconstruction": to_uint8_image(recon.numpy()),
            "input_image": to_uint8_image(prepared.images[i]),
        }
    seconds = time.perf_counter() - start
    return {"images": images, "ms_per_image": 1000.0 * seconds / len(images) if images else None}


@task(name="score-and-write", task_run_name="score-{category}", **_TRANSIENT_ONLY)
def score_task(cfg: DiffadConfig, checkpoint_dir: str, category: str, run_id: str,
               model_version: str, reconstructions: dict[str, dict[str, Any]]) -> dict[str, Any]:
    """Score the test set (Eq. 11 maps, image scores) and write the category's parquet partition,
    streaming, with the reconstructions attached to their images."""
    from diffad_core import results
    from diffad_core.data import prepare_split
    from diffad_core.score import choose_alpha, score_split

    _threads(cfg)
    model = _load_for_evaluation(cfg, checkpoint_dir)
    alpha, alpha_source, alpha_choice = cfg.score.alpha, "config", None
    if cfg.score.alpha_per_category:
        choice = choose_alpha(model, cfg, category)
        alpha, alpha_source, alpha_choice = choice.alpha, choice.source, choice.to_dict()
    prepared = prepare_split(cfg, category, "test")

    def _records() -> Any:
        for rec in score_split(model, prepared, alpha=alpha, progress=True):
            row = dict(vars(rec))
            row.update(reconstructions.get(rec.rel_path, {}))
            yield row

    start = time.perf_counter()
    parts = results.write_scores(run_dir(run_id), category, _records(), model_version=model_version,
                                 alpha=alpha, alpha_source=alpha_source, preset=cfg.preset)
    seconds = time.perf_counter() - start
    n = len(prepared.labels)
    return {"n_test": n, "score_ms_per_image": 1000.0 * seconds / max(1, n), "alpha": alpha,
            "alpha_source": alpha_source, "alpha_choice": alpha_choice,
            "parts": [str(p) for p in parts]}


@task(name="category-metrics", task_run_name="metrics-{category}", cache_policy=NO_CACHE)
def category_metrics(cfg: DiffadConfig, run_id: str, category: str,
                     timings: dict[str, Any]) -> dict[str, Any]:
    """Pixel AUROC, PRO and image AUROC of one category, from its parquet partition only."""
    from diffad_core import results

    df = results.evaluate_run(run_dir(run_id), {category: timings}, categories=[category],
                              fpr_limit=cfg.metrics.pro_fpr_limit, preset=cfg.preset, write=False)
    row = df[df["category"] == category].iloc[0].to_dict()
    return {k: (None if _isnan(v) else v) for k, v in row.items()}


def _isnan(v: Any) -> bool:
    return isinstance(v, float) and v != v


@task(name="write-category-status", cache_policy=NO_CACHE)
def write_category_status(run_id: str, category: str, summary: dict[str, Any]) -> Path:
    """``results/<run_id>/status/<category>.json``: how a category ended (read by the parent,
    also when the category ran in another process or machine)."""
    path = run_dir(run_id) / "status" / f"{category}.json"
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(f".{os.getpid()}.tmp")
    tmp.write_text(json.dumps(summary, indent=2, sort_keys=True, default=str))
    os.replace(tmp, path)
    return path


def read_category_status(run_id: str, category: str) -> dict[str, Any] | None:
    path = run_dir(run_id) / "status" / f"{category}.json"
    if not path.is_file():
        return None
    return json.loads(path.read_text())


# ----------------------------------------------------------------------------- MLflow
@task(name="mlflow-open-run", **_TRANSIENT_ONLY)
def open_mlflow_run(cfg: DiffadConfig, run_name: str, manifest_hash: str | None,
                    tags: dict[str, Any], parent_run_id: str | None = None) -> str:
    """Open an MLflow run (a child when ``parent_run_id`` is given) with the resolved config as
    params and the provenance tags."""
    all_tags = {**provenance_tags(cfg, manifest_hash), **tags}
    return tracking.start_run(cfg, run_name, all_tags, parent_run_id=parent_run_id)


@task(name="mlflow-close-run", **_TRANSIENT_ONLY)
def close_mlflow_run(mlflow_run_id: str, status: str = "FINISHED") -> None:
    tracking.end_run(mlflow_run_id, status)


@task(name="mlflow-log-training", **_TRANSIENT_ONLY)
def log_training(mlflow_run_id: str, train: dict[str, Any], cached: bool) -> None:
    """The loss curve (step-wise), training time and checkpoint location."""
    tracking.log_curve(mlflow_run_id, "train_loss", train.get("losses", []))
    tracking.log_metrics(mlflow_run_id, {"train_seconds": train.get("seconds"),
                                         "train_steps": train.get("steps"),
                                         "final_loss": train.get("final_loss")})
    tracking.set_tags(mlflow_run_id, {"checkpoint_dir": train["checkpoint_dir"],
                                      "train_key": train.get("train_key"),
                                      "train_cached": str(bool(cached)).lower()})


_LOGGED_METRICS = ("pixel_auroc", "pro", "image_auroc", "n_test", "score_ms_per_image",
                   "reconstruct_ms_per_image", "train_seconds", "alpha")


@task(name="mlflow-log-category", **_TRANSIENT_ONLY)
def log_category(mlflow_run_id: str, run_id: str, category: str, metrics: dict[str, Any]) -> None:
    """The three metrics and timings, plus heat-map / reconstruction figures as artifacts."""
    tracking.log_metrics(mlflow_run_id, {k: metrics.get(k) for k in _LOGGED_METRICS
                                         if isinstance(metrics.get(k), (int, float))})
    figures = _category_figures(run_id, category, diffad_home().resolve() / "figures" / run_id)
    for fig in figures:
        tracking.log_artifacts(mlflow_run_id, fig, "figures")


def _category_figures(run_id: str, category: str, out_dir: Path, limit: int = 4) -> list[Path]:
    """Input | anomaly heat-map overlay | reconstruction, for the images that were reconstructed."""
    from diffad_core import results
    from diffad_core.overlay import overlay, save_png, side_by_side

    out: list[Path] = []
    for row in results.iter_maps(run_dir(run_id), [category],
                                 maps=("anomaly_map", "input_png", "reconstruction")):
        image = row.get("input_png")
        if image is None:
            continue
        panels = [image, overlay(image, row["anomaly_map"])]
        if row.get("reconstruction") is not None:
            panels.append(row["reconstruction"])
        name = f"{category}__" + row["image_path"].replace("/", "__").rsplit(".", 1)[0] + ".png"
        out.append(save_png(side_by_side(panels), out_dir / name))
        if len(out) >= limit:
            break
    return out


# ----------------------------------------------------------------------------- run level
@task(name="aggregate", cache_policy=NO_CACHE)
def aggregate(cfg: DiffadConfig, run_id: str, timings: dict[str, dict[str, Any]],
              categories: list[str]) -> list[dict[str, Any]]:
    """``metrics.parquet`` of the run from its parquet partitions only (results.evaluate_run)."""
    from diffad_core import results

    df = results.evaluate_run(run_dir(run_id), timings, categories=categories,
                              fpr_limit=cfg.metrics.pro_fpr_limit, preset=cfg.preset, write=True)
    return [{k: (None if _isnan(v) else v) for k, v in row.items()}
            for row in df.to_dict(orient="records")]


@task(name="register-model", **_TRANSIENT_ONLY)
def register_task(cfg: DiffadConfig, mlflow_run_id: str, checkpoint_dir: str, label: str,
                  metrics: dict[str, Any], promote: bool, run_id: str,
                  train_key: str | None = None) -> dict[str, Any]:
    """Register the checkpoint as ``diffad-<dataset>-<label>`` (alias challenger) and decide on
    promotion to champion (cfg.registry.tolerance). A checkpoint that is already registered
    (same train key: a cached training rescored) is not registered twice."""
    from tasks import registry

    name = registry.model_name(cfg.data.dataset, label)
    if train_key:
        existing = registry.find_version(name, "train_key", train_key)
        if existing is not None:
            tracking.set_tags(mlflow_run_id, {"registered_model": name, "model_version": existing})
            return {"name": name, "version": existing, "promoted": False, "registered": False,
                    "reason": f"same checkpoint as version {existing} (train key {train_key}); "
                              "not registered again", "champion_version": None}
    compared = {k: metrics.get(k) for k in ("pixel_auroc", "pro", "image_auroc")}
    tags = {"diffad_run_id": run_id, "preset": cfg.preset, "mode": cfg.mode,
            "config_hash": cfg.config_hash()}
    if train_key:
        tags["train_key"] = train_key
    version = registry.register_checkpoint(mlflow_run_id, Path(checkpoint_dir), name, compared,
                                           tags=tags)
    decision = registry.promote(name, version, cfg.registry.tolerance, apply=promote)
    tracking.set_tags(mlflow_run_id, {"registered_model": name, "model_version": version,
                                      "promotion_decision": "promoted" if decision.promoted
                                      else "kept_challenger"})
    return {**decision.to_dict(), "registered": True}


@task(name="publish-artifacts", cache_policy=NO_CACHE)
def publish_artifacts(run_id: str, rows: list[dict[str, Any]], summary_md: str) -> None:
    """The metrics table as a Prefect table artifact and the summary as a markdown artifact."""
    from prefect.artifacts import create_markdown_artifact, create_table_artifact

    key = "diffad-" + "".join(c if c.isalnum() else "-" for c in run_id.lower())
    cols = ("category", "status", "pixel_auroc", "pro", "image_auroc", "n_test",
            "score_ms_per_image", "reconstruct_ms_per_image", "train_seconds", "model_version")
    table = [{c: _cell(r.get(c)) for c in cols} for r in rows]
    create_table_artifact(table=table, key=f"{key}-metrics"[:255],
                          description=f"diffad metrics of run {run_id}")
    create_markdown_artifact(markdown=summary_md, key=f"{key}-summary"[:255],
                             description=f"diffad summary of run {run_id}")


def _cell(v: Any) -> Any:
    if isinstance(v, float):
        return None if v != v else round(v, 4)
    return v


# ----------------------------------------------------------------------------- helpers for flows
def make_config(preset: str, overrides: list[str] | None = None, dataset: str | None = None,
                root: str | None = None, categories: list[str] | None = None) -> DiffadConfig:
    """The run's config: preset, then the flow's dataset/root/categories, then ``key=value``
    overrides (which win)."""
    from diffad_core.config import load_config

    data: dict[str, Any] = {}
    if dataset:
        data["dataset"] = dataset
    if root:
        data["root"] = root
    if categories:
        data["categories"] = list(categories)
    return load_config(preset, overrides=list(overrides or []), extra={"data": data} if data else None)


def new_run_id(date: str | None = None) -> str:
    """A run id ``<date or time>-<8 hex>``. Inside a flow run it derives from the flow run's id
    and scheduled start, so ``prefect flow-run retry`` continues the same run (and redoes only
    what is missing or failed); outside, it is random."""
    import uuid

    flow_run_id = _flow_run_id()
    if flow_run_id:
        from prefect.runtime import flow_run

        stamp = flow_run.scheduled_start_time.strftime("%Y%m%d-%H%M%S")
        suffix = flow_run_id.replace("-", "")[:8]
    else:
        stamp, suffix = time.strftime("%Y%m%d-%H%M%S"), uuid.uuid4().hex[:8]
    return f"{date}-{suffix}" if date else f"{stamp}-{suffix}"


def run_record_path(run_id: str) -> Path:
    return run_dir(run_id) / "run.json"


def read_run_record(run_id: str) -> dict[str, Any] | None:
    """``results/<run_id>/run.json`` (parameters and per-category outcome), or None."""
    path = run_record_path(run_id)
    return json.loads(path.read_text()) if path.is_file() else None


@task(name="write-run-record", cache_policy=NO_CACHE)
def write_run_record(run_id: str, record: dict[str, Any]) -> Path:
    """Write ``run.json``; category outcomes of earlier invocations of the same run are kept
    unless this invocation has a newer outcome for them."""
    path = run_record_path(run_id)
    path.parent.mkdir(parents=True, exist_ok=True)
    old = read_run_record(run_id) or {}
    merged = {**old, **record}
    merged["categories"] = {**old.get("categories", {}), **record.get("categories", {})}
    tmp = path.with_suffix(f".{os.getpid()}.tmp")
    tmp.write_text(json.dumps(merged, indent=2, sort_keys=True, default=str))
    os.replace(tmp, path)
    return path


# ----------------------------------------------------------------------------- report
def _weights_note(weights: dict[str, Any]) -> str:
    parts = []
    for role, w in weights.items():
        source = (w.get("file") or "timm hub") if w.get("pretrained") else "random init (no pretrained weights)"
        parts.append(f"{role}: {w.get('timm_name')} ({source}"
                     f"{', sha256 ' + w['sha256'][:12] if w.get('sha256') else ''})")
    return "; ".join(parts)


@task(name="build-report", cache_policy=NO_CACHE)
def report_task(cfg: DiffadConfig, run_id: str, manifest_hash: str | None,
                decisions: dict[str, str], weights: dict[str, Any], data_root: str | None,
                mlflow_run_id: str | None) -> dict[str, str]:
    """report.md / report.html / figures under ``<DIFFAD_HOME>/reports/<run_id>``, also logged
    to the parent MLflow run."""
    from diffad_core.provenance import run_provenance
    from diffad_core.report import build_report

    out_dir = diffad_home().resolve() / "reports" / run_id
    label = "unified" if cfg.mode == "unified" else "per-category"
    paths = build_report(run_dir(run_id), out_dir, dataset=cfg.data.dataset,
                         title=f"diffad {cfg.data.dataset} ({label}, preset {cfg.preset})",
                         registry_decisions=decisions or None,
                         provenance=run_provenance(cfg, manifest_hash),
                         weights_note=_weights_note(weights), data_root=data_root)
    if mlflow_run_id:
        tracking.log_artifacts(mlflow_run_id, out_dir, "report")
    return {"markdown": str(paths["markdown"]), "html": str(paths["html"]), "dir": str(out_dir)}


@task(name="mlflow-log-run-metrics", **_TRANSIENT_ONLY)
def log_run_metrics(mlflow_run_id: str, rows: list[dict[str, Any]]) -> None:
    """Per-category and mean metrics on the parent run (``<category>.<metric>``)."""
    values: dict[str, float | None] = {}
    for row in rows:
        for key in ("pixel_auroc", "pro", "image_auroc"):
            v = row.get(key)
            if isinstance(v, (int, float)):
                values[f"{row['category']}.{key}"] = float(v)
                if row["category"] == "mean":
                    values[key] = float(v)
    tracking.log_metrics(mlflow_run_id, values)


def summary_markdown(run_id: str, rows: list[dict[str, Any]], outcomes: dict[str, dict[str, Any]],
                     report_path: str | None) -> str:
    """The run's summary: metrics table, done/failed categories, where the outputs are."""
    import pandas as pd

    from diffad_core.report import metrics_markdown_table

    lines = [f"# diffad run `{run_id}`", "", metrics_markdown_table(pd.DataFrame(rows)), ""]
    lines += ["| category | outcome | error |", "|---|---|---|"]
    for cat, o in sorted(outcomes.items()):
        err = (o.get("error") or "").replace("|", "\\|").replace("\n", " ")[:300]
        lines.append(f"| {cat} | {o.get('status')} | {err} |")
    lines += ["", f"Results: `{run_dir(run_id)}`"]
    if report_path:
        lines.append(f"Report: `{report_path}`")
    return "\n".join(lines)
