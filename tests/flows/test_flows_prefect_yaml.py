"""infra/prefect.yaml: schema (Prefect's own model plus stricter checks) and consistency with
the flows it points at."""

from __future__ import annotations

import importlib
import inspect
from pathlib import Path
from typing import Any

import pytest
import yaml
from prefect.cli.deploy._models import DeploymentConfig, PrefectYamlModel
from prefect.client.schemas.schedules import CronSchedule

from diffad_core.config import RuntimeConfig

REPO = Path(__file__).resolve().parents[2]
EXPECTED = {
    "full-benchmark": "full-benchmark",
    "nightly-retrain": "nightly-retrain",
    "rerun-categories": "rerun-categories",
    "train-category": "train-category",
}


@pytest.fixture(scope="module")
def spec() -> dict[str, Any]:
    return yaml.safe_load((REPO / "infra" / "prefect.yaml").read_text())


def _flow(entrypoint: str) -> Any:
    path, name = entrypoint.split(":")
    module = importlib.import_module(path.removesuffix(".py").replace("/", "."))
    return getattr(module, name)


def test_schema(spec: dict[str, Any]) -> None:
    model = PrefectYamlModel.model_validate(spec)
    assert {d.name for d in model.deployments} == set(EXPECTED)
    allowed_top = {"name", "prefect-version", "build", "push", "pull", "deployments"}
    assert set(spec) <= allowed_top, set(spec) - allowed_top
    allowed = set(DeploymentConfig.model_fields)
    for dep in spec["deployments"]:
        assert set(dep) <= allowed, (dep["name"], set(dep) - allowed)  # no silently ignored keys
        assert set(dep["work_pool"]) <= {"name", "work_queue_name", "job_variables"}
    pull = spec["pull"]
    assert list(pull[0]) == ["prefect.deployments.steps.set_working_directory"]
    assert pull[0]["prefect.deployments.steps.set_working_directory"]["directory"]


def test_entrypoints_and_parameters(spec: dict[str, Any]) -> None:
    for dep in spec["deployments"]:
        flow = _flow(dep["entrypoint"])
        assert flow.name == EXPECTED[dep["name"]]
        params = set(inspect.signature(flow.fn).parameters)
        assert set(dep.get("parameters", {})) <= params, dep["name"]
        assert (REPO / dep["entrypoint"].split(":")[0]).is_file()
    # The fan-out target is the deployment the parent calls by default.
    assert RuntimeConfig().deployment_name == "train-category/train-category"


def test_nightly_schedule_and_concurrency(spec: dict[str, Any]) -> None:
    nightly = next(d for d in spec["deployments"] if d["name"] == "nightly-retrain")
    (schedule,) = nightly["schedules"]
    cron = CronSchedule(cron=schedule["cron"], timezone=schedule["timezone"])
    assert cron.cron == "0 2 * * *"
    assert nightly["concurrency_limit"] == {"limit": 1, "collision_strategy": "CANCEL_NEW"}
    assert "date" in inspect.signature(_flow(nightly["entrypoint"]).fn).parameters
    pools = {d["name"]: d["work_pool"]["name"] for d in spec["deployments"]}
    # Parents never hold a GPU worker's only slot.
    assert pools["train-category"] == "gpu"
    assert {pools[n] for n in ("full-benchmark", "nightly-retrain", "rerun-categories")} == {"control"}
