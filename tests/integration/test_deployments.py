"""Deployments on a real Prefect server on loopback, with process workers (solo stores).

Starts ``prefect server start`` (its own SQLite database, PREFECT_HOME in tmp), creates the
``control`` and ``gpu`` process work pools, deploys ``train-category`` and ``full-benchmark`` from
infra/prefect.yaml, and runs full-benchmark on the smoke preset with ``executor=deployments``:
the parent (on a control worker) calls run_deployment for each category and two gpu workers
(``--limit 1`` each) pull them. MLflow is a SQLite file here; test_team_servers.py runs the same
on PostgreSQL-backed servers. Every subprocess is stopped by the ``servers`` fixture.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from mlflow import MlflowClient

from tests.integration.servers import Servers, client_env, run_benchmark_deployment

pytestmark = [pytest.mark.integration, pytest.mark.slow]

CATEGORIES = ["weave", "gravel"]


def test_full_benchmark_fans_out_to_two_workers(servers: Servers, tmp_path: Path) -> None:
    (tmp_path / "mlflow").mkdir()
    env = client_env(tmp_path, f"sqlite:///{tmp_path / 'mlflow' / 'mlflow.db'}")
    api_url = servers.prefect_server(env)
    done = run_benchmark_deployment(servers, env, api_url, "deployed", [
        "registry.register_models=false", f"data.categories=[{','.join(CATEGORIES)}]"]).children

    assert len(done) == len(CATEGORIES)
    assert all(c["state"]["type"] == "COMPLETED" for c in done)
    # The category runs were pulled by the gpu workers (not run in the parent's process).
    assert {c.get("work_pool_name") for c in done} == {"gpu"}
    results = tmp_path / "home" / "results" / "deployed"
    record = json.loads((results / "run.json").read_text())
    assert record["status"] == "completed"
    assert record["categories"] == CATEGORIES
    statuses = {c: json.loads((results / "status" / f"{c}.json").read_text())["status"]
                for c in CATEGORIES}
    assert statuses == {c: "done" for c in CATEGORIES}
    for cat in CATEGORIES:
        assert (results / "scores" / f"category={cat}").is_dir()
    # Each category logged its MLflow child run from its worker process under the parent's run.
    client = MlflowClient(tracking_uri=env["MLFLOW_TRACKING_URI"])
    exp = client.get_experiment_by_name("diffad-synthetic")
    runs = client.search_runs([exp.experiment_id], "tags.diffad_run_id = 'deployed'")
    parents = [r for r in runs if "mlflow.parentRunId" not in r.data.tags]
    assert len(parents) == 1 and parents[0].info.status == "FINISHED"
    kids = {r.data.tags["category"]: r for r in runs if "mlflow.parentRunId" in r.data.tags}
    assert set(kids) == set(CATEGORIES)
    assert {r.data.tags["mlflow.parentRunId"] for r in kids.values()} == {parents[0].info.run_id}
    assert {r.data.tags["prefect_flow_run_id"] for r in kids.values()} == {c["id"] for c in done}
