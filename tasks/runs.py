"""A benchmark run on disk: its id, folder, run record, per-category outcomes and summary.

``<DIFFAD_HOME>/results/<run_id>/`` holds the parquet partitions (``results.storage``),
``metrics.parquet``, ``config.json`` (the run's resolved config), ``run.json`` (the record
below) and ``status/<category>.json`` (a :class:`~tasks.records.CategoryOutcome` each), so a
retry, a rerun of failed categories or a worker on another machine all read the same state.
"""

from __future__ import annotations

import json
import time
import uuid
from pathlib import Path
from typing import Any

import pandas as pd
from prefect import task
from prefect.artifacts import create_markdown_artifact, create_table_artifact
from prefect.cache_policies import NO_CACHE
from prefect.runtime import flow_run
from pydantic import BaseModel, ConfigDict

from diffad_core._atomic import atomic_write_text
from diffad_core.config import DiffadConfig, config_from_dict, diffad_home
from diffad_core.report import metrics_markdown_table
from tasks.records import CategoryMetrics, CategoryOutcome


class RunRecord(BaseModel):
    """``run.json``: how a run was started and how it ended (categories: their outcome)."""

    model_config = ConfigDict(extra="forbid")

    run_id: str
    status: str = "running"
    mode: str = "per_category"
    executor: str = "local"
    date: str | None = None
    categories: list[str] = []
    mlflow_parent_run_id: str | None = None
    started_utc: str | None = None
    finished_utc: str | None = None
    report: dict[str, str] = {}
    registry: dict[str, str] = {}
    problems: list[str] = []


def run_dir(run_id: str) -> Path:
    """``<DIFFAD_HOME>/results/<run_id>``."""
    return diffad_home().resolve() / "results" / run_id


def flow_run_id() -> str | None:
    value = flow_run.id
    return str(value) if value else None


def new_run_id(date: str | None = None) -> str:
    """A run id ``<date or time>-<8 hex>``. Inside a flow run it derives from the flow run's id
    and scheduled start, so ``prefect flow-run retry`` continues the same run (and redoes only
    what is missing or failed); outside, it is random."""
    current = flow_run_id()
    if current:
        stamp = flow_run.scheduled_start_time.strftime("%Y%m%d-%H%M%S")
        suffix = current.replace("-", "")[:8]
    else:
        stamp, suffix = time.strftime("%Y%m%d-%H%M%S"), uuid.uuid4().hex[:8]
    return f"{date}-{suffix}" if date else f"{stamp}-{suffix}"


# ----------------------------------------------------------------------------- run record
def run_record_path(run_id: str) -> Path:
    return run_dir(run_id) / "run.json"


def read_run_record(run_id: str) -> RunRecord | None:
    """``results/<run_id>/run.json``, or None."""
    path = run_record_path(run_id)
    return RunRecord.model_validate_json(path.read_text()) if path.is_file() else None


def write_run_record(record: RunRecord) -> Path:
    path = run_record_path(record.run_id)
    atomic_write_text(path, record.model_dump_json(indent=2) + "\n")
    return path


def write_run_config(run_id: str, cfg: DiffadConfig) -> Path:
    """The run's resolved config, so a rerun of some categories uses exactly the same."""
    path = run_dir(run_id) / "config.json"
    atomic_write_text(path, json.dumps(cfg.to_dict(), indent=2, sort_keys=True) + "\n")
    return path


def read_run_config(run_id: str) -> DiffadConfig:
    path = run_dir(run_id) / "config.json"
    if not path.is_file():
        raise FileNotFoundError(f"run {run_id}: {path} does not exist")
    return config_from_dict(json.loads(path.read_text()))


# ----------------------------------------------------------------------------- categories
def category_status_path(run_id: str, category: str) -> Path:
    return run_dir(run_id) / "status" / f"{category}.json"


@task(name="write-category-status", cache_policy=NO_CACHE)
def write_category_status(run_id: str, outcome: CategoryOutcome) -> Path:
    """How a category ended, read by the parent flow (also when the category ran in another
    process or machine)."""
    path = category_status_path(run_id, outcome.category)
    atomic_write_text(path, outcome.model_dump_json(indent=2) + "\n")
    return path


def read_category_status(run_id: str, category: str) -> CategoryOutcome | None:
    path = category_status_path(run_id, category)
    return CategoryOutcome.model_validate_json(path.read_text()) if path.is_file() else None


# ----------------------------------------------------------------------------- summary
def summary_markdown(run_id: str, rows: list[CategoryMetrics], outcomes: dict[str, CategoryOutcome],
                     report_path: str | None) -> str:
    """The run's summary: metrics table, done/failed categories, where the outputs are."""
    table = pd.DataFrame([r.model_dump() for r in rows])
    lines = [f"# diffad run `{run_id}`", "", metrics_markdown_table(table), ""]
    lines += ["| category | outcome | error |", "|---|---|---|"]
    for cat, o in sorted(outcomes.items()):
        err = (o.error or "").replace("|", "\\|").replace("\n", " ")[:300]
        lines.append(f"| {cat} | {o.status} | {err} |")
    lines += ["", f"Results: `{run_dir(run_id)}`"]
    if report_path:
        lines.append(f"Report: `{report_path}`")
    return "\n".join(lines)


def _cell(v: Any) -> Any:
    if isinstance(v, float):
        return None if v != v else round(v, 4)
    return v


@task(name="publish-artifacts", cache_policy=NO_CACHE)
def publish_artifacts(run_id: str, rows: list[CategoryMetrics], summary_md: str) -> None:
    """The metrics table as a Prefect table artifact and the summary as a markdown artifact."""
    key = "diffad-" + "".join(c if c.isalnum() else "-" for c in run_id.lower())
    table = [{k: _cell(v) for k, v in r.model_dump().items()} for r in rows]
    create_table_artifact(table=table, key=f"{key}-metrics"[:255],
                          description=f"diffad metrics of run {run_id}")
    create_markdown_artifact(markdown=summary_md, key=f"{key}-summary"[:255],
                             description=f"diffad summary of run {run_id}")
