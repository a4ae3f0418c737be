"""MLflow tracking: where the store is, params flattening, parent/child runs."""

from __future__ import annotations

import http.server
import os
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest

from diffad_core.config import load_config
from tasks import tracking
from tests.reliability.test_locks import _holder


def test_default_store_is_under_diffad_home(home: Path) -> None:
    uri = tracking.tracking_uri()
    assert uri == f"sqlite:///{home.resolve() / 'mlflow.db'}"
    assert tracking.local_artifact_root(uri) == home.resolve() / "mlartifacts"


def test_env_uri_wins_and_artifacts_go_beside_the_db(home: Path, tmp_path: Path,
                                                     monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("MLFLOW_TRACKING_URI", f"sqlite:///{tmp_path}/other/ml.db")
    assert tracking.tracking_uri() == f"sqlite:///{tmp_path}/other/ml.db"
    assert tracking.local_artifact_root() == (tmp_path / "other" / "mlartifacts").resolve()
    assert tracking.local_artifact_root("http://127.0.0.1:5000") is None


def test_health_probe_of_a_real_server() -> None:
    """One /health probe for MLflow's and Prefect's servers: 200 is healthy; another status or
    no server is a reason the preflight puts in its one-line error."""
    class Handler(http.server.BaseHTTPRequestHandler):
        def do_GET(self) -> None:  # noqa: N802 (http.server's name)
            self.send_response(200 if self.path == "/ok/health" else 503)
            self.end_headers()

        def log_message(self, *args: object) -> None:
            pass

    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    base = f"http://127.0.0.1:{server.server_port}"
    try:
        assert tracking.health_problem(base + "/ok/", 5.0) is None
        assert tracking.health_problem(base + "/down", 5.0) == "answered HTTP 503 on /health"
    finally:
        server.shutdown()
        server.server_close()
    assert tracking.health_problem(base, 5.0).startswith("is unreachable (")


def test_flatten_config_cuts_long_values() -> None:
    flat = tracking.flatten_config({"a": {"b": 1, "c": {"d": "x"}}, "long": "y" * 900, "e": [1, 2]})
    assert flat == {"a.b": "1", "a.c.d": "x", "long": "y" * 497 + "...", "e": "[1, 2]"}
    assert all(len(v) <= tracking.PARAM_LIMIT for v in flat.values())


def test_parent_and_child_runs(home: Path) -> None:
    cfg = load_config("smoke")
    parent = tracking.start_run(cfg, "parent", {"diffad_run_id": "r1"})
    child = tracking.start_run(cfg, "weave", {"category": "weave"}, parent_run_id=parent)
    tracking.log_curve(child, "train_loss", [(0, 1.5), (1, 1.25), (2, float("nan")), (3, 1.0)])
    tracking.log_metrics(child, {"pro": 0.5, "missing": None, "nan": float("nan")})
    tracking.end_run(child)
    client = tracking.get_client()
    run = client.get_run(child)
    assert run.data.tags[tracking.PARENT_TAG] == parent
    assert run.data.tags["parent_run_id"] == parent
    assert run.data.params["train.iterations"] == str(cfg.train.iterations)
    assert run.data.metrics == {"train_loss": 1.0, "pro": 0.5}
    history = client.get_metric_history(child, "train_loss")
    assert [(m.step, m.value) for m in history] == [(0, 1.5), (1, 1.25), (3, 1.0)]
    assert run.info.status == "FINISHED"
    assert run.info.artifact_uri.startswith((home.resolve() / "mlartifacts").as_uri())
    assert not (Path.cwd() / "mlruns").exists()
    assert not (Path.cwd() / "mlflow.db").exists()


_OPEN_STORE = ("import sys, time\nfrom tasks import tracking\n"
               "time.sleep(max(0.0, float(sys.argv[1]) - time.time()))\n"  # all start at one instant
               "client = tracking.get_client()\n"
               "tracking.ensure_experiment(client, 'diffad-race')\n"
               "print(client.search_registered_models(max_results=1) == [], flush=True)\n")


def test_processes_opening_a_new_store_at_once_all_succeed(home: Path) -> None:
    """Several processes opening one new sqlite store at the same instant (two benchmarks
    started together): MLflow creates the schema when a store is first opened, and without the
    lock beside the database the late ones fail with "table ... already exists"."""
    start = time.time() + 3.0  # time for every interpreter to import MLflow first
    env = dict(os.environ, DIFFAD_HOME=str(home))
    procs = [subprocess.Popen([sys.executable, "-c", _OPEN_STORE, str(start)], env=env, text=True,
                              stdout=subprocess.PIPE, stderr=subprocess.PIPE) for _ in range(4)]
    outs = [proc.communicate(timeout=240) for proc in procs]
    assert [proc.returncode for proc in procs] == [0] * 4, [err[-2000:] for _, err in outs]
    assert [out.strip() for out, _ in outs] == ["True"] * 4


def test_a_new_store_is_created_under_the_lock_beside_it(home: Path) -> None:
    """While another process holds the store's lock, opening the store waits and writes
    nothing; once released it creates the schema."""
    db = home.resolve() / "mlflow.db"
    holder = _holder(home.resolve() / ".mlflow.db.lock", 3)
    opened: list[float] = []
    thread = threading.Thread(target=lambda: (tracking.get_client(), opened.append(time.monotonic())))
    began = time.monotonic()
    thread.start()
    time.sleep(1.5)
    try:
        assert not opened and (not db.exists() or db.stat().st_size == 0)
    finally:
        thread.join(timeout=60)
        holder.wait()
    assert opened and opened[0] - began > 2.0
    assert tracking.get_client().search_experiments(max_results=1)[0].name == "Default"
