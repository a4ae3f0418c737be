"""The ``gpu-kubernetes`` work pool (infra/gpu-kubernetes.json) on a real Prefect server.

Creates the pool from the template with ``prefect work-pool create --type kubernetes`` against
``prefect server start`` on 127.0.0.1 (the server validates the template), deploys the same
``train-category`` deployment of infra/prefect.yaml into it (the server validates its job
variables against the pool's schema), and renders the Kubernetes Job a worker would submit for
one flow run with prefect-kubernetes' own job configuration. No cluster is needed.
"""

from __future__ import annotations

import asyncio
import json
import subprocess
from pathlib import Path
from typing import Any

import pytest
import yaml
from prefect.client.orchestration import PrefectClient

from diffad_core.config import load_config
from tests.integration.servers import PREFECT, REPO, Servers, api, client_env, prefect_cli

pytestmark = [pytest.mark.integration, pytest.mark.slow]
k8s_worker = pytest.importorskip("prefect_kubernetes.worker",
                                 reason="prefect-kubernetes (a test extra) is not installed")

TEMPLATE = REPO / "infra" / "gpu-kubernetes.json"
POOL = "gpu-kubernetes"
IMAGE = "registry.example/diffad-gpu-worker:0.1.0"


def _rendered_job(api_url: str, flow_run_id: str) -> dict[str, Any]:
    """The Job manifest the Kubernetes worker would create for this flow run (its own code path:
    the pool's template and the deployment's job variables, then the flow run's settings)."""
    async def _render() -> dict[str, Any]:
        async with PrefectClient(api_url) as client:
            run = await client.read_flow_run(flow_run_id)
            deployment = await client.read_deployment(run.deployment_id)
            pool = await client.read_work_pool(POOL)
            flow = await client.read_flow(run.flow_id)
            config = await k8s_worker.KubernetesWorkerJobConfiguration.from_template_and_values(
                pool.base_job_template, deployment.job_variables or {}, client=client)
            config.prepare_for_flow_run(run, deployment=deployment, flow=flow, work_pool=pool)
            return config.job_manifest

    return asyncio.run(_render())


def test_gpu_kubernetes_pool_from_template(servers: Servers, tmp_path: Path) -> None:
    env = client_env(tmp_path, mlflow_uri=f"sqlite:///{tmp_path / 'mlflow.db'}")
    api_url = servers.prefect_server(env)
    template = json.loads(TEMPLATE.read_text())

    # The server rejects a template whose placeholders name no variable: the check below is real.
    broken = json.loads(TEMPLATE.read_text())
    del broken["variables"]["properties"]["diffad_home_claim"]
    (tmp_path / "broken.json").write_text(json.dumps(broken))
    out = subprocess.run([PREFECT, "work-pool", "create", "broken", "--type", "kubernetes",
                          "--base-job-template", str(tmp_path / "broken.json")],
                         env=env, cwd=REPO, capture_output=True, text=True, timeout=120)
    assert out.returncode != 0 and "diffad_home_claim" in out.stdout + out.stderr, out.stdout

    prefect_cli(["work-pool", "create", POOL, "--type", "kubernetes",
                 "--base-job-template", str(TEMPLATE)], env)
    pool = api(f"{api_url}/work_pools/{POOL}")
    assert pool["type"] == "kubernetes" and pool["base_job_template"] == template

    # The pool's default image is the one built from infra/Dockerfile.gpu-worker (the compose
    # file names its tag); a team deploys with its registry's copy (README "Teams").
    compose = yaml.safe_load((REPO / "infra" / "docker-compose.yml").read_text())
    assert compose["x-gpu-worker"]["build"]["dockerfile"] == "infra/Dockerfile.gpu-worker"
    assert template["variables"]["properties"]["image"]["default"] == compose["x-gpu-worker"]["image"]

    # The same train-category deployment as the process pools', pointed at this pool.
    prefect_cli(["deploy", "--prefect-file", "infra/prefect.yaml", "--name", "train-category",
                 "--pool", POOL, "--job-variable", f"image={IMAGE}"], env, timeout=180)
    deployment = api(f"{api_url}/deployments/name/train-category/train-category")
    assert deployment["work_pool_name"] == POOL
    spec = next(d for d in yaml.safe_load((REPO / "infra" / "prefect.yaml").read_text())["deployments"]
                if d["name"] == "train-category")
    assert deployment["entrypoint"] == spec["entrypoint"] == "flows/category.py:train_category"

    # One category's flow run, as full-benchmark's fan-out creates it (no worker picks it up).
    params = {"config": load_config("smoke").model_dump(mode="json"), "category": "weave",
              "run_id": "k8s", "manifest_hash": "0" * 64}
    run = api(f"{api_url}/deployments/{deployment['id']}/create_flow_run", "POST",
              {"parameters": params})
    job = _rendered_job(api_url, run["id"])
    assert job["kind"] == "Job" and job["metadata"]["namespace"] == "diffad"
    pod = job["spec"]["template"]["spec"]
    (container,) = pod["containers"]
    assert container["resources"]["limits"]["nvidia.com/gpu"] == 1
    assert container["image"] == IMAGE
    assert container["args"][:3] == ["prefect", "flow-run", "execute"]
    env_vars = {e["name"]: e.get("value") for e in container["env"]}
    assert env_vars["MLFLOW_TRACKING_URI"] == "http://mlflow:5000"
    assert env_vars["PREFECT__FLOW_RUN_ID"] == run["id"]
    # DIFFAD_HOME: the shared claim at /diffad in every pod.
    mounts = {m["name"]: m["mountPath"] for m in container["volumeMounts"]}
    claims = {v["name"]: v["persistentVolumeClaim"]["claimName"]
              for v in pod["volumes"] if "persistentVolumeClaim" in v}
    assert mounts["diffad-home"] == "/diffad" and claims == {"diffad-home": "diffad-home"}
