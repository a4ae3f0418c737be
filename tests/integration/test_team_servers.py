"""Team mode on real servers (issue 12): PostgreSQL behind both the Prefect server and the MLflow
tracking server, process workers pulling categories from deployments.

A throw-away PostgreSQL cluster on 127.0.0.1 (databases ``prefect`` and ``mlflow``), ``prefect
server start`` on it (asyncpg), ``mlflow server`` on it (psycopg2) with its artifacts in a folder
of their own, the deployments of infra/prefect.yaml, one control worker and two gpu process
workers. full-benchmark runs the smoke preset through the deployments and registers the models;
the test then reads back what the servers hold. Everything is stopped by the ``servers`` fixture.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from mlflow import MlflowClient

from tests.integration.servers import Servers, api, client_env, run_benchmark_deployment

pytestmark = [pytest.mark.integration, pytest.mark.slow]

CATEGORIES = ["weave", "gravel"]
RUN_ID = "team"
STEPS = 150
CATEGORY_METRICS = {"pixel_auroc", "pro", "image_auroc", "train_seconds", "train_steps", "final_loss"}


def test_benchmark_on_postgres_backed_prefect_and_mlflow(servers: Servers, tmp_path: Path) -> None:
    pg = servers.postgres(["prefect", "mlflow"])
    env = client_env(tmp_path)
    api_url = servers.prefect_server(env, database_url=pg.url("prefect", driver="asyncpg"))
    # The driver is named: SQLAlchemy >= 2.1 maps a bare postgresql:// to psycopg 3, not psycopg2.
    mlflow_url = servers.mlflow_server(env, backend_store_uri=pg.url("mlflow", driver="psycopg2"))
    # The servers really use PostgreSQL (not a SQLite fallback under PREFECT_HOME).
    assert not list((tmp_path / "prefect-home").glob("*.db"))

    # Long enough (a loss point every step) that both workers train and log at the same time:
    # with 2 steps, a category could finish before the other worker had started its process.
    deployed = run_benchmark_deployment(servers, env, api_url, RUN_ID, [
        f"data.categories=[{','.join(CATEGORIES)}]", "registry.register_models=true",
        "registry.promote=true", f"train.iterations={STEPS}", "train.log_every=1"])

    # Prefect: one train-category flow run per category, pulled by the gpu workers, each with
    # its task-level log lines stored in the server's database (what the UI shows).
    assert len(deployed.children) == len(CATEGORIES)
    assert all(c["state"]["type"] == "COMPLETED" for c in deployed.children)
    assert {c["work_pool_name"] for c in deployed.children} == {"gpu"}
    for child in deployed.children:
        logs = api(f"{api_url}/logs/filter", "POST",
                   {"logs": {"flow_run_id": {"any_": [child["id"]]}}, "limit": 200})
        assert any(entry["task_run_id"] for entry in logs), f"no task logs for {child['name']}"
    record = json.loads((tmp_path / "home" / "results" / RUN_ID / "run.json").read_text())
    assert record["status"] == "completed" and record["categories"] == CATEGORIES

    # MLflow: the parent run and one child run per category under it, from the workers.
    client = MlflowClient(tracking_uri=mlflow_url, registry_uri=mlflow_url)
    exp = client.get_experiment_by_name("diffad-synthetic")
    runs = client.search_runs([exp.experiment_id], f"tags.diffad_run_id = '{RUN_ID}'")
    parents = [r for r in runs if "mlflow.parentRunId" not in r.data.tags]
    assert len(parents) == 1 and parents[0].info.status == "FINISHED"
    parent = parents[0]
    kids = {r.data.tags["category"]: r for r in runs if "mlflow.parentRunId" in r.data.tags}
    assert set(kids) == set(CATEGORIES)
    assert {r.data.tags["mlflow.parentRunId"] for r in kids.values()} == {parent.info.run_id}
    assert {r.data.tags["prefect_flow_run_id"] for r in kids.values()} == \
        {c["id"] for c in deployed.children}

    # Both workers logged at the same time (their child runs overlap), and nothing was lost:
    # every metric, every step of the loss curve, every figure of each category.
    starts = [r.info.start_time for r in kids.values()]
    ends = [r.info.end_time for r in kids.values()]
    assert max(starts) < min(ends), "the two categories did not run concurrently"
    artifact_root = tmp_path / "mlflow-artifacts"
    for cat, run in kids.items():
        assert run.info.status == "FINISHED"
        assert CATEGORY_METRICS <= set(run.data.metrics), (cat, sorted(run.data.metrics))
        curve = client.get_metric_history(run.info.run_id, "train_loss")
        assert sorted(m.step for m in curve) == list(range(1, STEPS + 1)), cat  # one point a step
        figures = client.list_artifacts(run.info.run_id, "figures")
        assert figures and all(f.file_size > 0 for f in figures), cat
        # Artifacts went through the server to its own artifact root, not to DIFFAD_HOME.
        stored = {p.name for p in artifact_root.rglob("*.png")}
        assert {Path(f.path).name for f in figures} <= stored, cat
        for key in ("pixel_auroc", "pro", "image_auroc"):
            assert parent.data.metrics[f"{cat}.{key}"] == pytest.approx(run.data.metrics[key])
    assert not (tmp_path / "home" / "mlartifacts").exists()

    # Registry: version 1 of each category's model, from its child run, is challenger and
    # (no champion before) champion.
    for cat, run in kids.items():
        name = f"diffad-synthetic-{cat}"
        champion = client.get_model_version_by_alias(name, "champion")
        challenger = client.get_model_version_by_alias(name, "challenger")
        assert champion.version == challenger.version == "1", name
        assert champion.run_id == run.info.run_id, name
        assert record["registry"][name].startswith("version 1 promoted to champion"), record["registry"]
