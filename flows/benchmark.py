"""The parent flows: ``full-benchmark``, ``nightly-retrain`` and ``rerun-categories``.

full-benchmark: prepare data and weights once -> (unified: train the one model) -> fan out the
categories (in-process subflows, or ``run_deployment`` on workers) -> aggregate from the parquet
files only -> registry (challenger / champion) -> report -> Prefect artifacts. One category's
failure never stops the others; the run ends with a table of done and failed categories and the
flow fails if any category failed.
"""

from __future__ import annotations

import asyncio
import contextvars
import datetime as dt
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Any

from prefect import flow, get_run_logger

from diffad_core import results
from diffad_core.config import DiffadConfig, load_config
from flows.category import train_category, train_or_restore
from flows.guard import run_lock
from tasks import mlflow_logging as ml
from tasks import pipeline as p
from tasks import registry, tracking
from tasks.records import CategoryMetrics, CategoryOutcome, PreparedData, TrainedModel
from tasks.runs import (
    RunRecord,
    new_run_id,
    publish_artifacts,
    read_category_status,
    read_run_config,
    read_run_record,
    run_dir,
    run_record_path,
    summary_markdown,
    write_run_config,
    write_run_record,
)


class CategoriesFailed(RuntimeError):
    """Some categories of a benchmark failed (the others are done and reported)."""


def _error_text(state: Any) -> str:
    try:
        exc = state.result(raise_on_failure=False)
    except Exception as err:  # the state's result could not be read back
        exc = err
    if isinstance(exc, BaseException):
        return f"{type(exc).__name__}: {exc}"
    return state.message or state.name


def _failed(cat: str, error: str) -> CategoryOutcome:
    return CategoryOutcome(category=cat, status="failed", error=error)


def _fan_out_local(todo: list[str], common: dict[str, Any], hashes: dict[str, str],
                   workers: int = 1) -> dict[str, CategoryOutcome]:
    """Each category as an in-process subflow, ``workers`` at a time (threads, each carrying
    the parent flow's context); a failure is recorded, never raised."""

    def _one(cat: str) -> CategoryOutcome:
        state = train_category(category=cat, manifest_hash=hashes[cat], **common, return_state=True)
        if state.is_completed():
            return state.result()
        return _failed(cat, _error_text(state))

    if workers <= 1 or len(todo) <= 1:
        return {cat: _one(cat) for cat in todo}
    with ThreadPoolExecutor(max_workers=workers, thread_name_prefix="category") as pool:
        futures = {cat: pool.submit(contextvars.copy_context().run, _one, cat) for cat in todo}
        return {cat: fut.result() for cat, fut in futures.items()}


def _fan_out_deployments(todo: list[str], common: dict[str, Any], hashes: dict[str, str],
                         deployment: str) -> dict[str, CategoryOutcome]:
    """One ``run_deployment`` per category, all at once; workers pull them. The outcome of each
    comes back through ``results/<run_id>/status/<category>.json`` on shared storage."""
    from prefect.deployments.flow_runs import arun_deployment

    params = {k: (v.model_dump(mode="json") if hasattr(v, "model_dump") else v) for k, v in common.items()}

    async def _all() -> list[Any]:
        calls = [arun_deployment(name=deployment, parameters={**params, "category": c,
                                                              "manifest_hash": hashes[c]},
                                 flow_run_name=f"{common['run_id']}-{c}", timeout=None,
                                 poll_interval=2, as_subflow=True) for c in todo]
        return await asyncio.gather(*calls, return_exceptions=True)

    runs = asyncio.run(_all())
    outcomes: dict[str, CategoryOutcome] = {}
    for cat, run in zip(todo, runs):
        status = read_category_status(common["run_id"], cat)
        if isinstance(run, BaseException):
            outcomes[cat] = _failed(cat, f"run_deployment: {type(run).__name__}: {run}")
        elif run.state is not None and run.state.is_completed() and status and status.status == "done":
            outcomes[cat] = status
        else:
            state = run.state.name if run.state is not None else "unknown"
            error = (status.error if status else None) or (run.state.message if run.state else None)
            outcomes[cat] = _failed(cat, f"flow run {run.id} ended {state}: {error}")
    return outcomes


def _reusable(run_id: str, cat: str, config_hash: str, manifest_hash: str) -> CategoryOutcome | None:
    """A category already done in this run with the same config and data (a retry of the run)."""
    status = read_category_status(run_id, cat)
    if status is None or status.status != "done":
        return None
    if status.config_hash != config_hash or status.manifest_hash != manifest_hash:
        return None
    if cat not in results.list_categories_in_run(run_dir(run_id)):
        return None
    return status.model_copy(update={"reused": True})


def _table(outcomes: dict[str, CategoryOutcome], rows: list[CategoryMetrics]) -> str:
    by_cat = {r.category: r for r in rows}
    lines = [f"{'category':<14} {'outcome':<8} {'pixAUROC':>8} {'PRO':>7} {'imgAUROC':>8}  error"]

    def f(row: CategoryMetrics | None, key: str) -> str:
        v = getattr(row, key) if row is not None else None
        return f"{100 * v:.1f}" if isinstance(v, float) else "-"

    for cat in sorted(outcomes):
        o, r = outcomes[cat], by_cat.get(cat)
        lines.append(f"{cat:<14} {o.status:<8} {f(r, 'pixel_auroc'):>8} {f(r, 'pro'):>7} "
                     f"{f(r, 'image_auroc'):>8}  {(o.error or '')[:160]}")
    mean = by_cat.get("mean")
    if mean is not None:
        lines.append(f"{'mean':<14} {'':<8} {f(mean, 'pixel_auroc'):>8} {f(mean, 'pro'):>7} "
                     f"{f(mean, 'image_auroc'):>8}")
    return "\n".join(lines)


@dataclass(frozen=True)
class _Registration:
    """One model to register: under ``label``, from ``checkpoint``, logged to ``mlflow_run``."""

    label: str
    mlflow_run: str
    checkpoint: str
    metrics: CategoryMetrics
    train_key: str | None


def _register(cfg: DiffadConfig, run_id: str, parent: str, rows: list[CategoryMetrics],
              fresh: list[CategoryOutcome], unified: TrainedModel | None) -> tuple[dict[str, str], list[str]]:
    """Register what this invocation trained or scored; returns (decision per model, problems)."""
    decisions: dict[str, str] = {}
    problems: list[str] = []
    by_cat = {r.category: r for r in rows}
    if unified is not None:
        jobs = [_Registration("unified", parent, unified.checkpoint_dir, by_cat["mean"], unified.train_key)] \
            if fresh else []
    else:
        jobs = [_Registration(o.category, o.mlflow_run_id or parent, o.checkpoint_dir or "",
                              by_cat[o.category], o.train_key) for o in fresh]
    for job in jobs:
        state = p.register_task(cfg, job.mlflow_run, job.checkpoint, job.label, job.metrics, run_id,
                                job.train_key, return_state=True)
        model = registry.model_name(cfg, job.label)
        if state.is_completed():
            d = state.result()
            verdict = ("unchanged" if not d.registered
                       else "promoted to champion" if d.promoted else "stays challenger")
            decisions[model] = f"version {d.version} {verdict} ({d.reason})"
        else:
            decisions[model] = f"registration failed: {_error_text(state)}"
            problems.append(f"registry {model}: {_error_text(state)}")
    return decisions, problems


def _resolve(config: DiffadConfig | None, preset: str, overrides: list[str] | None) -> DiffadConfig:
    """The run's config: ``config`` as given (the CLI resolves it), else ``preset`` plus
    ``overrides`` (deployments and schedules pass those)."""
    if config is None:
        return load_config(preset, overrides=list(overrides or []))
    if overrides:
        raise ValueError("give either a resolved config or preset/overrides, not both")
    return config


@flow(name="full-benchmark", log_prints=True, validate_parameters=True)
def full_benchmark(
    config: DiffadConfig | None = None,
    preset: str = "cpu-demo",
    overrides: list[str] | None = None,
    run_id: str | None = None,
    date: str | None = None,
    only: list[str] | None = None,
    force: bool = False,
) -> dict[str, Any]:
    """Benchmark every category of ``config`` (or of ``preset`` + ``overrides``). ``only``:
    (re)run just these categories of the run (the others keep their results); ``force``: redo
    them even when this run already has them done (else a retry of the run redoes only what is
    missing or failed). Executor, registration and promotion come from the config's
    ``runtime`` and ``registry`` sections."""
    cfg = _resolve(config, preset, overrides)
    run_id = run_id or new_run_id(date)
    with run_lock(run_id):  # a second process with this run id refuses (flows/guard.py)
        return _benchmark(cfg, run_id, date, only, force)


def _benchmark(cfg: DiffadConfig, run_id: str, date: str | None, only: list[str] | None,
               force: bool) -> dict[str, Any]:
    """The body of ``full_benchmark``, run while holding the run lock."""
    logger = get_run_logger()
    data: PreparedData = p.prepare_data(cfg)
    # From here on the config names the resolved data folder and category list (and, for the
    # cpu preset, the settings fitted to that data).
    cfg = p.fit_config(cfg, data)
    weights = p.prepare_weights(cfg)
    cats = data.categories
    unknown = sorted(set(only or []) - set(cats))
    if unknown:
        raise ValueError(f"categories {unknown} are not in this run's categories {cats}")
    manifest = data.manifest_hash
    label = "unified" if cfg.mode == "unified" else "per-category"
    executor = cfg.runtime.executor
    parent = ml.open_mlflow_run(cfg, f"benchmark {run_id}", manifest,
                                {"diffad_run_id": run_id, "executor": executor, "kind": "benchmark",
                                 "categories": ",".join(cats), "label": label, "date": date})
    # Runs of this run id still RUNNING belong to a process that died (we hold the run lock).
    tracking.close_superseded_runs(tracking.experiment_name(cfg), run_id, parent)
    ml.log_weights(parent, weights)
    record = read_run_record(run_id) or RunRecord(run_id=run_id)
    record = record.model_copy(update={
        "status": "running", "mode": cfg.mode, "executor": executor, "date": date,
        "categories": list(dict.fromkeys(record.categories + cats)), "mlflow_parent_run_id": parent,
        "started_utc": dt.datetime.now(dt.timezone.utc).isoformat()})
    write_run_record(record)
    write_run_config(run_id, cfg)
    # Per-category models depend only on their own category's files (METHOD.md §1 layout).
    hashes = {c: manifest if cfg.mode == "unified" else data.category_hashes[c] for c in cats}
    try:
        unified: TrainedModel | None = None
        if cfg.mode == "unified":
            # One class-conditional model over all categories (METHOD.md §2, "Unified model").
            unified, cached = train_or_restore(cfg, cats, "unified", manifest, date)
            ml.log_training(parent, unified, cached=cached)
        common: dict[str, Any] = {"config": cfg, "run_id": run_id, "parent_mlflow_run_id": parent,
                                  "unified": unified, "date": date}

        outcomes: dict[str, CategoryOutcome] = {}
        todo = []
        for cat in (list(only) if only else cats):
            reused = None if force else _reusable(run_id, cat, cfg.config_hash(), hashes[cat])
            if reused is not None:
                logger.info("category %s already done in run %s: kept", cat, run_id)
                outcomes[cat] = reused
            else:
                todo.append(cat)
        if executor == "deployments":
            outcomes.update(_fan_out_deployments(todo, common, hashes, cfg.runtime.deployment_name))
        else:
            outcomes.update(_fan_out_local(todo, common, hashes, cfg.runtime.local_workers))

        # Aggregate over every category of the run, from the parquet files only.
        all_outcomes = {c: s for c in record.categories if (s := read_category_status(run_id, c)) is not None}
        all_outcomes.update(outcomes)
        timings = {c: {**(o.timings.model_dump() if o.timings else {}), "model_version": o.model_version,
                       "alpha": o.alpha}
                   for c, o in all_outcomes.items() if o.status == "done"}
        rows = p.aggregate(cfg, run_id, timings, record.categories)
        ml.log_run_metrics(parent, rows)

        decisions: dict[str, str] = {}
        problems: list[str] = []
        if cfg.registry.register_models:
            fresh = [outcomes[c] for c in todo if outcomes[c].status == "done"]
            decisions, problems = _register(cfg, run_id, parent, rows, fresh, unified)

        report = p.report_task(cfg, run_id, manifest, decisions, weights, data.root, parent)
        summary_md = summary_markdown(run_id, rows, all_outcomes, report["markdown"])
        if decisions:
            summary_md += "\n\n## Registry\n" + "\n".join(f"- {k}: {v}" for k, v in decisions.items())
        publish_artifacts(run_id, rows, summary_md)
        failed = sorted(c for c, o in all_outcomes.items() if o.status != "done")
        write_run_record(record.model_copy(update={
            "status": "failed" if failed or problems else "completed", "report": report,
            "registry": decisions, "problems": problems,
            "finished_utc": dt.datetime.now(dt.timezone.utc).isoformat()}))
        print(f"run {run_id} ({label}, preset {cfg.preset}):\n" + _table(all_outcomes, rows))
        ml.close_mlflow_run(parent, "FAILED" if failed or problems else "FINISHED")
    except BaseException:
        write_run_record(record.model_copy(update={"status": "failed"}))
        ml.close_mlflow_run(parent, "FAILED")
        raise
    if failed or problems:
        errors = "; ".join(f"{c}: {all_outcomes[c].error}" for c in failed)
        raise CategoriesFailed(f"run {run_id}: {len(failed)} of {len(all_outcomes)} categories "
                               f"failed ({errors}){'; ' + '; '.join(problems) if problems else ''}")
    return {"run_id": run_id, "outcomes": {c: o.model_dump() for c, o in all_outcomes.items()},
            "metrics": [r.model_dump() for r in rows], "report": report, "registry": decisions,
            "mlflow_parent_run_id": parent}


@flow(name="nightly-retrain", log_prints=True, validate_parameters=True)
def nightly_retrain(
    preset: str = "paper",
    overrides: list[str] | None = None,
    date: str | None = None,
) -> dict[str, Any]:
    """The nightly benchmark: carries its date (default: today, UTC) so the training cache key
    changes and the models really retrain; registers challengers and promotes."""
    date = date or dt.datetime.now(dt.timezone.utc).strftime("%Y-%m-%d")
    cfg = load_config(preset, overrides=[*(overrides or []), "registry.register_models=true",
                                         "registry.promote=true"])
    return full_benchmark(config=cfg, date=date)


def failed_categories(run_id: str) -> list[str]:
    """The categories of run ``run_id`` that did not finish: from their status files, else the
    categories that have no ``ok`` row in its metrics.parquet."""
    record = read_run_record(run_id)
    if record is None:
        raise FileNotFoundError(f"run {run_id}: {run_record_path(run_id)} does not exist")
    out = []
    for cat in record.categories:
        status = read_category_status(run_id, cat)
        if status is None or status.status != "done":
            out.append(cat)
    try:
        df = results.read_metrics(run_dir(run_id))
        ok = set(df.loc[df["status"] == "ok", "category"])
        out += [c for c in record.categories if c not in ok and c not in out]
    except FileNotFoundError:
        pass
    return [c for c in record.categories if c in out]


@flow(name="rerun-categories", log_prints=True, validate_parameters=True)
def rerun_categories(
    run_id: str,
    categories: list[str] | None = None,
    failed: bool = False,
) -> dict[str, Any]:
    """Redo some categories of run ``run_id`` with its own resolved config: the given list, or
    (with ``failed``) the ones that failed. Only those run; the run is then re-aggregated and
    re-reported."""
    record = read_run_record(run_id)
    if record is None:
        raise FileNotFoundError(f"run {run_id}: {run_record_path(run_id)} does not exist")
    todo = list(categories or [])
    if failed:
        todo += [c for c in failed_categories(run_id) if c not in todo]
    if not todo:
        print(f"run {run_id}: nothing to rerun")
        return {"run_id": run_id, "outcomes": {}, "rerun": []}
    return full_benchmark(config=read_run_config(run_id), run_id=run_id, date=record.date,
                          only=todo, force=True)
