"""Deployments on a real Prefect server on loopback, with process workers.

Starts ``prefect server start`` (PREFECT_HOME in tmp), creates the ``control`` and ``gpu`` process
work pools, deploys ``train-category`` and ``full-benchmark`` from infra/prefect.yaml, and runs
full-benchmark on the smoke preset with ``executor=deployments``: the parent (on a control
worker) calls run_deployment for each category and two gpu workers (``--limit 1`` each) pull
them. Every subprocess is killed in ``finally``.
"""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

pytestmark = [pytest.mark.integration, pytest.mark.slow]

REPO = Path(__file__).resolve().parents[2]
PREFECT = str(Path(sys.executable).with_name("prefect"))
CATEGORIES = ["weave", "gravel"]
OVERRIDES = [
    "data.synth.n_train=4", "data.synth.n_test_good=1", "data.synth.n_test_per_defect=1",
    "train.iterations=2", "reconstruct.max_images_per_category=1", "reconstruct.rounds=1",
    "runtime.num_threads=1",
]
FINAL = {"COMPLETED", "FAILED", "CRASHED", "CANCELLED"}


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _api(url: str, method: str = "GET", body: Any = None) -> Any:
    data = None if body is None else json.dumps(body).encode()
    req = urllib.request.Request(url, data=data, method=method,
                                 headers={"Content-Type": "application/json"})
    with urllib.request.urlopen(req, timeout=30) as resp:
        return json.loads(resp.read() or b"null")


def _start(cmd: list[str], env: dict[str, str], log: Path) -> subprocess.Popen[bytes]:
    fh = open(log, "wb")  # noqa: SIM115 - closed with the process
    return subprocess.Popen(cmd, env=env, cwd=REPO, stdout=fh, stderr=subprocess.STDOUT,
                            start_new_session=True)


def _stop(proc: subprocess.Popen[bytes]) -> None:
    if proc.poll() is None:
        os.killpg(proc.pid, signal.SIGTERM)
        try:
            proc.wait(timeout=15)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait(timeout=15)


def _tail(log: Path, n: int = 3000) -> str:
    return log.read_text(errors="replace")[-n:] if log.exists() else ""


@pytest.fixture()
def server(tmp_path: Path) -> Iterator[dict[str, Any]]:
    port = _free_port()
    api = f"http://127.0.0.1:{port}/api"
    env = {k: v for k, v in os.environ.items() if not k.startswith(("PREFECT_", "MLFLOW_"))}
    env.update({
        "PREFECT_HOME": str(tmp_path / "prefect-home"), "PREFECT_API_URL": api,
        "PREFECT_SERVER_ANALYTICS_ENABLED": "false", "DO_NOT_TRACK": "1",
        "PREFECT_CLI_PROMPT": "false", "PREFECT_LOGGING_LEVEL": "INFO",
        "DIFFAD_HOME": str(tmp_path / "home"), "DIFFAD_REPO": str(REPO),
        "MLFLOW_TRACKING_URI": f"sqlite:///{tmp_path / 'mlflow' / 'mlflow.db'}",
        "PYTHONUNBUFFERED": "1",
    })
    (tmp_path / "mlflow").mkdir()
    server_env = {**env}
    server_env.pop("PREFECT_API_URL")
    procs: list[subprocess.Popen[bytes]] = []
    log = tmp_path / "server.log"
    procs.append(_start([PREFECT, "server", "start", "--host", "127.0.0.1", "--port", str(port)],
                        server_env, log))
    try:
        deadline = time.monotonic() + 150
        while True:
            try:
                _api(f"{api}/health")
                break
            except (urllib.error.URLError, ConnectionError, TimeoutError):
                if time.monotonic() > deadline or procs[0].poll() is not None:
                    pytest.fail(f"prefect server did not become healthy:\n{_tail(log)}")
                time.sleep(1)
        yield {"api": api, "env": env, "procs": procs, "tmp": tmp_path}
    finally:
        for proc in reversed(procs):
            _stop(proc)


def _cli(args: list[str], env: dict[str, str], timeout: int = 120) -> str:
    out = subprocess.run([PREFECT, *args], env=env, cwd=REPO, capture_output=True, text=True,
                         timeout=timeout)
    assert out.returncode == 0, f"prefect {' '.join(args)} failed:\n{out.stdout}\n{out.stderr}"
    return out.stdout


def test_full_benchmark_fans_out_to_two_workers(server: dict[str, Any]) -> None:
    env, api, tmp = server["env"], server["api"], server["tmp"]
    for pool in ("control", "gpu"):
        _cli(["work-pool", "create", pool, "--type", "process"], env)
    _cli(["deploy", "--prefect-file", "infra/prefect.yaml", "--name", "train-category",
          "--name", "full-benchmark"], env, timeout=180)
    deployment = _api(f"{api}/deployments/name/full-benchmark/full-benchmark")
    assert deployment["work_pool_name"] == "control"
    child = _api(f"{api}/deployments/name/train-category/train-category")
    assert child["work_pool_name"] == "gpu"

    run = _api(f"{api}/deployments/{deployment['id']}/create_flow_run", "POST", {
        "parameters": {"preset": "smoke", "run_id": "deployed",
                       "overrides": [*OVERRIDES, "runtime.executor=deployments",
                                     "registry.register_models=false",
                                     f"data.categories=[{','.join(CATEGORIES)}]"]},
    })
    logs = [tmp / "worker-control.log", tmp / "worker-gpu-0.log", tmp / "worker-gpu-1.log"]
    server["procs"].append(_start([PREFECT, "worker", "start", "--pool", "control"], env, logs[0]))
    for i in (0, 1):
        server["procs"].append(_start([PREFECT, "worker", "start", "--pool", "gpu", "--limit", "1",
                                       "--name", f"gpu-{i}"], env, logs[i + 1]))

    deadline = time.monotonic() + 240
    state = None
    while time.monotonic() < deadline:
        state = _api(f"{api}/flow_runs/{run['id']}")["state"]
        if state and state["type"] in FINAL:
            break
        time.sleep(3)
    details = "\n".join(f"--- {p.name}\n{_tail(p)}" for p in logs)
    assert state is not None and state["type"] == "COMPLETED", f"{state}\n{details}"

    children = _api(f"{api}/flow_runs/filter", "POST", {
        "flow_runs": {"parent_flow_run_id": {"any_": [run["id"]]}}, "limit": 50})
    done = [c for c in children if c["deployment_id"] == child["id"]]
    assert len(done) == len(CATEGORIES), details
    assert all(c["state"]["type"] == "COMPLETED" for c in done)
    # The category runs were pulled by the gpu workers (not run in the parent's process).
    workers = {c.get("work_pool_name") for c in done}
    assert workers == {"gpu"}
    record = json.loads((tmp / "home" / "results" / "deployed" / "run.json").read_text())
    assert record["status"] == "completed"
    assert record["categories"] == CATEGORIES
    statuses = {c: json.loads((tmp / "home" / "results" / "deployed" / "status" / f"{c}.json")
                              .read_text())["status"] for c in CATEGORIES}
    assert statuses == {c: "done" for c in CATEGORIES}
    for cat in CATEGORIES:
        assert (tmp / "home" / "results" / "deployed" / "scores" / f"category={cat}").is_dir()
    # Each category logged its MLflow child run from its worker process under the parent's run.
    from mlflow import MlflowClient

    client = MlflowClient(tracking_uri=env["MLFLOW_TRACKING_URI"])
    exp = client.get_experiment_by_name("diffad-synthetic")
    runs = client.search_runs([exp.experiment_id], "tags.diffad_run_id = 'deployed'")
    parents = [r for r in runs if "mlflow.parentRunId" not in r.data.tags]
    assert len(parents) == 1 and parents[0].info.status == "FINISHED"
    kids = {r.data.tags["category"]: r for r in runs if "mlflow.parentRunId" in r.data.tags}
    assert set(kids) == set(CATEGORIES)
    assert {r.data.tags["mlflow.parentRunId"] for r in kids.values()} == {parents[0].info.run_id}
    flow_run_ids = {r.data.tags["prefect_flow_run_id"] for r in kids.values()}
    assert flow_run_ids == {c["id"] for c in done}
