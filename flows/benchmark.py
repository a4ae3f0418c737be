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
from typing import Any, Literal

from prefect import flow, get_run_logger

from flows.category import train_category, train_or_restore
from tasks import pipeline as p


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


def _fan_out_local(todo: list[str], common: dict[str, Any], hashes: dict[str, str],
                   workers: int = 1) -> dict[str, dict[str, Any]]:
    """Each category as an in-process subflow, ``workers`` at a time (threads, each carrying
    the parent flow's context); a failure is recorded, never raised."""

    def _one(cat: str) -> dict[str, Any]:
        state = train_category(category=cat, **{**common, "manifest_hash": hashes[cat]},
                               return_state=True)
        if state.is_completed():
            return state.result()
        return {"category": cat, "status": "failed", "error": _error_text(state)}

    if workers <= 1 or len(todo) <= 1:
        return {cat: _one(cat) for cat in todo}
    with ThreadPoolExecutor(max_workers=workers, thread_name_prefix="category") as pool:
        futures = {cat: pool.submit(contextvars.copy_context().run, _one, cat) for cat in todo}
        return {cat: fut.result() for cat, fut in futures.items()}


def _fan_out_deployments(todo: list[str], common: dict[str, Any], hashes: dict[str, str],
                         deployment: str) -> dict[str, dict[str, Any]]:
    """One ``run_deployment`` per category, all at once; workers pull them. The outcome of each
    comes back through ``results/<run_id>/status/<category>.json`` on shared storage."""
    from prefect.deployments.flow_runs import arun_deployment

    async def _all() -> list[Any]:
        calls = [arun_deployment(name=deployment, parameters={**common, "category": c,
                                             "manifest_hash": hashes[c]},
                                 flow_run_name=f"{common['run_id']}-{c}", timeout=None,
                                 poll_interval=2, as_subflow=True) for c in todo]
        return await asyncio.gather(*calls, return_exceptions=True)

    runs = asyncio.run(_all())
    outcomes: dict[str, dict[str, Any]] = {}
    for cat, run in zip(todo, runs):
        status = p.read_category_status(common["run_id"], cat)
        if isinstance(run, BaseException):
            outcomes[cat] = {"category": cat, "status": "failed",
                             "error": f"run_deployment: {type(run).__name__}: {run}"}
        elif run.state is not None and run.state.is_completed() and status \
                and status.get("status") == "done":
            outcomes[cat] = status
        else:
            state = run.state.name if run.state is not None else "unknown"
            error = (status or {}).get("error") or (run.state.message if run.state else None)
            outcomes[cat] = {"category": cat, "status": "failed",
                             "error": f"flow run {run.id} ended {state}: {error}"}
    return outcomes


def _reusable(run_id: str, cat: str, config_hash: str, manifest_hash: str) -> dict[str, Any] | None:
    """A category already done in this run with the same config and data (a retry of the run)."""
    from diffad_core import results

    status = p.read_category_status(run_id, cat)
    if not status or status.get("status") != "done":
        return None
    if status.get("config_hash") != config_hash or status.get("manifest_hash") != manifest_hash:
        return None
    if cat not in results.list_categories_in_run(p.run_dir(run_id)):
        return None
    return {**status, "reused": True}


def _table(outcomes: dict[str, dict[str, Any]], rows: list[dict[str, Any]]) -> str:
    by_cat = {r["category"]: r for r in rows}
    lines = [f"{'category':<14} {'outcome':<8} {'pixAUROC':>8} {'PRO':>7} {'imgAUROC':>8}  error"]
    for cat in sorted(outcomes):
        o, r = outcomes[cat], by_cat.get(cat, {})

        def f(key: str) -> str:
            v = r.get(key)
            return f"{100 * v:.1f}" if isinstance(v, float) else "-"

        lines.append(f"{cat:<14} {o['status']:<8} {f('pixel_auroc'):>8} {f('pro'):>7} "
                     f"{f('image_auroc'):>8}  {(o.get('error') or '')[:160]}")
    mean = by_cat.get("mean")
    if mean:
        lines.append(f"{'mean':<14} {'':<8} " + " ".join(
            f"{100 * mean[k]:.1f}".rjust(w) if isinstance(mean.get(k), float) else "-".rjust(w)
            for k, w in (("pixel_auroc", 8), ("pro", 7), ("image_auroc", 8))))
    return "\n".join(lines)


@flow(name="full-benchmark", log_prints=True, validate_parameters=True)
def full_benchmark(
    dataset: str | None = None,
    root: str | None = None,
    categories: list[str] | None = None,
    preset: str = "cpu-demo",
    overrides: list[str] | None = None,
    executor: Literal["local", "deployments"] | None = None,
    register_models: bool | None = None,
    promote: bool | None = None,
    run_id: str | None = None,
    date: str | None = None,
    only: list[str] | None = None,
    force: bool = False,
) -> dict[str, Any]:
    """Benchmark every category (default: all of the dataset). ``only``: (re)run just these
    categories of the run (the others keep their results); ``force``: redo them even when this
    run already has them done (else a retry of the run redoes only what is missing or failed).
    ``register_models``/``promote``/``executor`` default to the config's registry and runtime
    sections."""
    logger = get_run_logger()
    cfg = p.make_config(preset, overrides, dataset, root, categories)
    run_id = run_id or p.new_run_id(date)
    executor = executor or cfg.runtime.executor
    register = cfg.registry.register_models if register_models is None else register_models
    promote = cfg.registry.promote if promote is None else promote

    data = p.prepare_data(cfg)
    weights = p.prepare_weights(cfg)
    cats: list[str] = data["categories"]
    # From here on the config names the resolved data folder and category list, exactly as each
    # category flow builds it from ``common`` (so their config hashes agree).
    cfg = p.make_config(preset, overrides, cfg.data.dataset, data["root"], cats)
    unknown = sorted(set(only or []) - set(cats))
    if unknown:
        raise ValueError(f"categories {unknown} are not in this run's categories {cats}")
    manifest = data["manifest_hash"]
    label = "unified" if cfg.mode == "unified" else "per-category"
    parent = p.open_mlflow_run(cfg, f"benchmark {run_id}", manifest,
                               {"diffad_run_id": run_id, "executor": executor, "kind": "benchmark",
                                "categories": ",".join(cats), "label": label, "date": date})
    params = {"dataset": cfg.data.dataset, "root": data["root"], "categories": cats,
              "preset": preset, "overrides": list(overrides or []), "executor": executor,
              "register": register, "promote": promote, "date": date}
    p.write_run_record(run_id, {"run_id": run_id, "parameters": params, "status": "running",
                                "mlflow_parent_run_id": parent, "mode": cfg.mode,
                                "started_utc": dt.datetime.now(dt.timezone.utc).isoformat()})
    common: dict[str, Any] = {
        "run_id": run_id, "preset": preset, "overrides": list(overrides or []),
        "dataset": cfg.data.dataset, "root": data["root"], "categories": cats,
        "manifest_hash": manifest, "parent_mlflow_run_id": parent, "date": date,
    }
    # Per-category models depend only on their own category's files (METHOD.md §1 layout).
    hashes = {c: manifest if cfg.mode == "unified" else data["category_hashes"][c] for c in cats}
    try:
        unified: dict[str, Any] | None = None
        if cfg.mode == "unified":
            # One class-conditional model over all categories (METHOD.md §2, "Unified model").
            unified, cached = train_or_restore(cfg, cats, "unified", manifest, date)
            p.log_training(parent, unified, cached=cached)
            common.update(checkpoint_dir=unified["checkpoint_dir"], train_key=unified["train_key"])

        wanted = list(only) if only else cats
        outcomes: dict[str, dict[str, Any]] = {}
        todo = []
        for cat in wanted:
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
        record = p.read_run_record(run_id) or {}
        all_cats = list(dict.fromkeys(list(record.get("parameters", {}).get("categories", []))
                                      + cats))
        timings: dict[str, dict[str, Any]] = {}
        for cat in all_cats:
            status = outcomes.get(cat) or p.read_category_status(run_id, cat) or {}
            if status.get("status") == "done":
                timings[cat] = {k: v for k, v in (status.get("timings") or {}).items()
                                if v is not None}
        rows = p.aggregate(cfg, run_id, timings, all_cats)
        p.log_run_metrics(parent, rows)

        decisions: dict[str, str] = {}
        problems: list[str] = []
        if register:
            fresh = [c for c in todo if outcomes[c]["status"] == "done"]
            jobs: list[tuple[str, str, str, dict[str, Any], str | None]] = []
            if unified is not None and fresh:
                mean = next(r for r in rows if r["category"] == "mean")
                jobs.append(("unified", parent, unified["checkpoint_dir"], mean,
                             unified["train_key"]))
            elif unified is None:
                by_cat = {r["category"]: r for r in rows}
                jobs += [(c, outcomes[c]["mlflow_run_id"], outcomes[c]["checkpoint_dir"], by_cat[c],
                          outcomes[c].get("train_key")) for c in fresh]
            for name, mlflow_run, ckpt, metrics, key in jobs:
                state = p.register_task(cfg, mlflow_run, ckpt, name, metrics, promote, run_id,
                                        key, return_state=True)
                model = f"diffad-{cfg.data.dataset}-{name}"
                if state.is_completed():
                    d = state.result()
                    verdict = ("unchanged" if not d.get("registered", True)
                               else "promoted to champion" if d["promoted"] else "stays challenger")
                    decisions[model] = f"version {d['version']} {verdict} ({d['reason']})"
                else:
                    decisions[model] = f"registration failed: {_error_text(state)}"
                    problems.append(f"registry {model}: {_error_text(state)}")

        report = p.report_task(cfg, run_id, manifest, decisions, weights, data["root"], parent)
        all_outcomes = {**{c: s for c in all_cats
                           if (s := p.read_category_status(run_id, c)) is not None}, **outcomes}
        summary_md = p.summary_markdown(run_id, rows, all_outcomes, report["markdown"])
        if decisions:
            summary_md += "\n\n## Registry\n" + "\n".join(f"- {k}: {v}" for k, v in decisions.items())
        p.publish_artifacts(run_id, rows, summary_md)
        failed = sorted(c for c, o in all_outcomes.items() if o.get("status") != "done")
        record_update = {
            "status": "failed" if failed or problems else "completed",
            "categories": {c: {"status": o.get("status"), "error": o.get("error"),
                               "mlflow_run_id": o.get("mlflow_run_id")}
                           for c, o in outcomes.items()},
            "report": report, "registry": decisions, "problems": problems,
            "finished_utc": dt.datetime.now(dt.timezone.utc).isoformat(),
        }
        p.write_run_record(run_id, record_update)
        print(f"run {run_id} ({label}, preset {preset}):\n" + _table(all_outcomes, rows))
        p.close_mlflow_run(parent, "FAILED" if failed or problems else "FINISHED")
    except BaseException:
        p.write_run_record(run_id, {"status": "failed"})
        p.close_mlflow_run(parent, "FAILED")
        raise
    if failed or problems:
        errors = "; ".join(f"{c}: {all_outcomes[c].get('error')}" for c in failed)
        raise CategoriesFailed(f"run {run_id}: {len(failed)} of {len(all_outcomes)} categories "
                               f"failed ({errors}){'; ' + '; '.join(problems) if problems else ''}")
    return {"run_id": run_id, "outcomes": all_outcomes, "metrics": rows, "report": report,
            "registry": decisions, "mlflow_parent_run_id": parent}


@flow(name="nightly-retrain", log_prints=True, validate_parameters=True)
def nightly_retrain(
    dataset: str | None = None,
    root: str | None = None,
    categories: list[str] | None = None,
    preset: str = "paper",
    overrides: list[str] | None = None,
    executor: Literal["local", "deployments"] | None = None,
    date: str | None = None,
) -> dict[str, Any]:
    """The nightly benchmark: carries its date (default: today, UTC) so the training cache key
    changes and the models really retrain; registers challengers and promotes."""
    date = date or dt.datetime.now(dt.timezone.utc).strftime("%Y-%m-%d")
    return full_benchmark(dataset=dataset, root=root, categories=categories, preset=preset,
                          overrides=overrides, executor=executor, register_models=True,
                          promote=True, date=date)


def failed_categories(run_id: str) -> list[str]:
    """The categories of run ``run_id`` that did not finish: from its run.json outcomes, else the
    categories that have no ``ok`` row in its metrics.parquet."""
    from diffad_core import results

    record = p.read_run_record(run_id)
    if record is None:
        raise FileNotFoundError(f"run {run_id}: {p.run_record_path(run_id)} does not exist")
    cats = record.get("parameters", {}).get("categories", [])
    out = []
    for cat in cats:
        status = p.read_category_status(run_id, cat) or record.get("categories", {}).get(cat)
        if not status or status.get("status") != "done":
            out.append(cat)
    try:
        df = results.read_metrics(p.run_dir(run_id))
        ok = set(df.loc[df["status"] == "ok", "category"])
        out += [c for c in cats if c not in ok and c not in out]
    except FileNotFoundError:
        pass
    return [c for c in cats if c in out]


@flow(name="rerun-categories", log_prints=True, validate_parameters=True)
def rerun_categories(
    run_id: str,
    categories: list[str] | None = None,
    failed: bool = False,
    executor: Literal["local", "deployments"] | None = None,
) -> dict[str, Any]:
    """Redo some categories of run ``run_id`` with its own parameters: the given list, or (with
    ``failed``) the ones that failed. Only those run; the run is then re-aggregated and
    re-reported."""
    record = p.read_run_record(run_id)
    if record is None:
        raise FileNotFoundError(f"run {run_id}: {p.run_record_path(run_id)} does not exist")
    todo = list(categories or [])
    if failed:
        todo += [c for c in failed_categories(run_id) if c not in todo]
    if not todo:
        print(f"run {run_id}: nothing to rerun")
        return {"run_id": run_id, "outcomes": {}, "rerun": []}
    prm = record["parameters"]
    return full_benchmark(dataset=prm["dataset"], root=prm["root"], categories=prm["categories"],
                          preset=prm["preset"], overrides=prm["overrides"],
                          executor=executor or prm["executor"], register_models=prm["register"],
                          promote=prm["promote"], run_id=run_id, date=prm["date"], only=todo,
                          force=True)
